"""The exactness check a user runs before trusting a model family (`fthss verify`).

Random stages and random chains, then two comparisons:
- shared mode, decoded incrementally, against the one-pass masked forward over the same tokens
  (the training forward): same logits for every generated token;
- text mode, and text-cached mode (a prefix cache per stage), against a plain Hugging Face
  forward of the re-encoded text under the stage's prompt (prompt embeddings prepended, or the
  prefix as past K/V; the model's own causal mask).
The text view is written out here a second time on purpose, as an independent oracle.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from fthss.engine.engine import ChainEngine, ChainResult
from fthss.layout.chain import ChainSample, Step
from fthss.layout.sequence import TokenChain, build_layout
from fthss.layout.visibility import Kind
from fthss.models.base import BaseModel
from fthss.models.lora import LORA_TARGETS, module_paths
from fthss.prompts.stage import KINDS, Stage, StageConfig
from fthss.training.forward import one_pass_logits

_WORDS = "the a of city river who where born works capital company lake 1987 north Ada".split()


def random_text(rnd: random.Random, max_words: int) -> str:
    return " ".join(rnd.choice(_WORDS) for _ in range(rnd.randint(0, max_words)))


def random_stages(base: BaseModel, rnd: random.Random, max_stages: int = 3,
                  max_tokens: int = 6, kinds: tuple[str, ...] = KINDS) -> list[Stage]:
    """Up to `max_stages` stages of random kinds, prompt lengths and initialisations. A lora
    stage gets random deltas on a random subset of the targets (a new one's are zero: it would
    compute what the base computes, and hide a token routed to the wrong stage)."""
    stages = []
    for i in range(rnd.randint(1, max_stages)):
        kind = rnd.choice(kinds)
        targets = tuple(rnd.sample(LORA_TARGETS, rnd.randint(1, len(LORA_TARGETS))))
        rank = rnd.randint(1, 4)
        # alpha near r: deltas of the size of the base's own weights, so float noise stays at
        # the tolerance the other kinds are held to
        config = StageConfig(f"S{i}", kind, rnd.randint(0 if kind == "lora" else 1, max_tokens),
                             rnd.choice(["random", "vocab"]), lora_rank=rank,
                             lora_alpha=rank * rnd.uniform(0.5, 2.0), lora_targets=targets)
        stage = Stage.create(config, base, seed=rnd.randrange(2**31))
        generator = torch.Generator().manual_seed(rnd.randrange(2**31))
        with torch.no_grad():
            for b in stage.lora_B.values():
                b.copy_(torch.randn(b.shape, generator=generator) * 0.1)
        stages.append(stage)
    return stages


def random_chains(stages: list[Stage], rnd: random.Random, count: int, max_steps: int = 4,
                  max_new_tokens: int = 5, given_share: float = 0.25) -> list[ChainSample]:
    """`count` chains over the stages, of up to `max_steps` steps of random stages, inputs
    and visibility; a `given_share` of the steps have their output given (a step that only
    encodes, as a gold upstream or an active-RAG step's tool output), the others generate up
    to `max_new_tokens`."""
    names = [s.name for s in stages]

    def step() -> Step:
        stage, text = rnd.choice(names), rnd.choice([None, random_text(rnd, 4)])
        visible, given = rnd.random() < 0.3, rnd.random() < given_share
        if given:
            return Step(stage, input=text, input_visible=visible, output=random_text(rnd, 3))
        return Step(stage, input=text, input_visible=visible,
                    max_new_tokens=rnd.randint(1, max_new_tokens))
    return [ChainSample(random_text(rnd, 4), [step() for _ in range(rnd.randint(1, max_steps))],
                        id=str(i)) for i in range(count)]


def generated_scores(result: ChainResult, vocab_size: int) -> torch.Tensor:
    """The logits each generated token of a run with `output_scores` was chosen from, over its
    steps in order (steps with a given output have none): `[tokens, vocab_size]`."""
    scores = [s.scores for s in result.steps if s.scores is not None]
    return torch.cat(scores) if scores else torch.zeros(0, vocab_size)


def output_logits_one_pass(engine: ChainEngine, results: list[ChainResult]) -> list[torch.Tensor]:
    """Per result (of a run with `output_scores`), the one-pass forward's logits predicting
    each generated output token, in order (`generated_scores`' reference)."""
    names = list(dict.fromkeys(s.stage for r in results for s in r.tokens.steps))
    prompts = engine.prompt_caches(names)
    layout = build_layout([r.tokens for r in results], {n: i for i, n in enumerate(names)},
                          [engine.stages[n].num_virtual_tokens for n in names], engine.codec.pad_id)
    if not bool(layout.mask.any(dim=-1).all()):
        raise AssertionError("a visibility row is empty")
    with torch.no_grad():
        logits = one_pass_logits(engine.base, prompts, layout, engine.lora_bank(names))
    rows = []
    for i, result in enumerate(results):
        generated = torch.tensor([k for k, step in enumerate(result.steps)
                                  if step.scores is not None], dtype=torch.long)
        targets = ((layout.meta.kind[i] == Kind.OUTPUT)
                   & torch.isin(layout.meta.step[i], generated)).nonzero().squeeze(1)
        rows.append(logits[i, targets.to(logits.device) - 1].float().cpu())
    return rows


def text_view(tokens: TokenChain, k: int) -> list[int]:
    """What step k re-encodes in text mode: shared, earlier outputs and visible inputs, then
    its own input."""
    ids = list(tokens.shared_ids)
    for step in tokens.steps[:k]:
        ids += (step.input_ids if step.input_visible else []) + step.output_ids
    return ids + tokens.steps[k].input_ids


def plain_forward(base: BaseModel, stage: Stage, input_ids: list[int]) -> torch.Tensor:
    """Logits of a standalone model of `stage` over `input_ids`, as PEFT computes them: the
    prompt's embeddings prepended, or the prefix as past K/V; a lora stage's deltas merged into
    the weights (a LoRA model applies them to every token)."""
    ids = torch.tensor([input_ids], device=base.device)
    n = stage.num_virtual_tokens
    weight = stage.weight.detach().to(base.device, base.dtype)
    with torch.no_grad():
        if stage.config.kind != "prefix":
            embeds = torch.cat([weight[None], base.embed(ids)], dim=1)
            return merged_forward(base, stage, inputs_embeds=embeds).logits[0, n:].float().cpu()
        cache = DynamicCache()
        for i, (k, v) in enumerate(stage.prompt_cache(base, n)):
            cache.update(k, v, i)
        positions = torch.arange(n, n + ids.shape[1], device=base.device)[None]
        return base.forward(cache, positions, input_ids=ids)[0].float().cpu()


def merged_forward(base: BaseModel, stage: Stage, **inputs):
    """The base's HF forward with a lora stage's deltas merged into its weights (no other
    change: the base's own weights are left as they are)."""
    lora = stage.lora_weights
    if lora is None:
        return base.model(**inputs)
    merged = {}
    for (layer, name), path in module_paths(base.model).items():
        if name in lora.A:
            weight = base.model.get_submodule(path).weight
            merged[f"{path}.weight"] = weight + lora.delta(name, layer).to(weight)
    return torch.func.functional_call(base.model, merged, kwargs=inputs, strict=False)


def _largest(difference: torch.Tensor) -> float:
    """The largest absolute value (0 for a chain that generated nothing)."""
    return float(difference.abs().max()) if difference.numel() else 0.0


@dataclass
class VerifyReport:
    shared_vs_one_pass: float
    text_vs_plain: float
    batch_vs_alone: float
    greedy_outputs_match: bool
    chains: int


def verify(base: BaseModel, chains: int = 8, seed: int = 0, batch_size: int = 4) -> VerifyReport:
    rnd = random.Random(seed)
    stages = random_stages(base, rnd)
    requests = random_chains(stages, rnd, chains)
    engine = ChainEngine(base, stages, batch_size=batch_size)
    shared = engine.run(requests, "shared", output_scores=True)
    one_pass = output_logits_one_pass(engine, shared)
    shared_diff = max(_largest(generated_scores(r, base.vocab_size) - ref)
                      for r, ref in zip(shared, one_pass, strict=True))
    text_diff = 0.0
    for r in (r for mode in ("text", "text-cached")
              for r in engine.run(requests, mode, output_scores=True)):
        for k, step in enumerate(r.tokens.steps):
            if r.steps[k].scores is None:  # a given output: nothing generated
                continue
            view = text_view(r.tokens, k)
            ref = plain_forward(base, engine.stages[step.stage], view + step.output_ids[:-1])
            text_diff = max(text_diff, float((r.steps[k].scores - ref[len(view) - 1:]).abs().max()))
    alone = ChainEngine(base, stages, batch_size=1).run(requests, "shared", output_scores=True)
    batch_diff = max(float((a.scores - b.scores).abs().max())
                     for ra, rb in zip(alone, shared, strict=True)
                     for a, b in zip(ra.steps, rb.steps, strict=False)
                     if a.scores is not None and a.scores.shape == b.scores.shape)
    same = all(a.output_ids == b.output_ids
               for ra, rb in zip(alone, shared, strict=True)
               for a, b in zip(ra.steps, rb.steps, strict=False))
    return VerifyReport(shared_diff, text_diff, batch_diff, same, len(requests))

