"""`fthss world build`: write the synthetic world to a folder, reproducibly from a seed.

    world.json                every entity and fact
    corpus.jsonl              the retrieval corpus (one canonical passage per entity)
    pretrain.txt              pretraining documents, one per line (several renderings each)
    tasks/<task>/{train,dev,test}.jsonl   chain samples for the four tasks
    tokenizer/                a byte-level BPE tokenizer trained on pretrain.txt and the
                              train splits (never a dev or test question)
    manifest.json             seed, sizes and recipe
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict
from pathlib import Path

from fthss.atomic import atomic_write_text
from fthss.world.datasets import BUILDERS, SAME_QUESTIONS, split
from fthss.world.entities import RELATIONS, build_world
from fthss.world.render import TEMPLATES, corpus, pretraining_documents

SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (every string encodes; nothing is unknown), trained with `tokenizers`.

    Every text is encoded as if it followed a space (`add_prefix_space`, as SentencePiece does
    for Llama): an entity is then the same token at the start of an output segment as inside a
    passage, so copying it is copying, not translating ("Lamiford" and " Lamiford" were two
    unrelated tokens otherwise)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")


def _jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def build(out: str | Path, seed: int = 0, renderings: int = 8, test_size: int = 1000,
          dev_size: int = 200, vocab_size: int = 2048, sizes: dict | None = None) -> dict:
    out = Path(out)
    world = build_world(seed, **(sizes or {}))
    atomic_write_text(out / "world.json", json.dumps(
        {"seed": seed, "entities": [asdict(e) for e in world.entities.values()]}))
    atomic_write_text(out / "corpus.jsonl", _jsonl(corpus(world)))
    documents = pretraining_documents(world, renderings, seed)
    atomic_write_text(out / "pretrain.txt", "\n".join(documents) + "\n")
    counts, train_texts = {}, []
    tasks = list(BUILDERS)
    for task, builder in BUILDERS.items():
        # tasks that ask the same questions draw and split them alike: a question tested in
        # one is never trained on (or pretrained on) in the other
        rnd = random.Random(seed * 1000 + tasks.index(SAME_QUESTIONS.get(task, task)))
        splits = split(builder(world, rnd), rnd, test_size, dev_size)
        for name, samples in splits.items():
            atomic_write_text(out / "tasks" / task / f"{name}.jsonl",
                              _jsonl(s.to_json() for s in samples))
        counts[task] = {name: len(samples) for name, samples in splits.items()}
        train_texts += [" ".join([s.shared]
                                 + [t for st in s.steps for t in (st.input, st.output) if t])
                        for s in splits["train"]]
    tokenizer = train_tokenizer(documents + train_texts, vocab_size)
    tokenizer.save_pretrained(out / "tokenizer")
    manifest = {"seed": seed, "entities": len(world.entities), "relations": len(RELATIONS),
                "phrasings_per_relation": min(len(t) for t in TEMPLATES.values()),
                "pretraining_documents": len(documents), "renderings": renderings,
                "vocab_size": len(tokenizer), "tasks": counts}
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2))
    return manifest
