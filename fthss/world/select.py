"""Choosing the demo's base among several pretraining draws, by held-out loss.

At 3.6M parameters one pretraining run of a world is one sample of a wide spread: three draws of
world seed 0's base, same recipe and data, only the seed changed, gave its compress_qa text
chain 28.8, 55.1 and 36.0 EM (docs/experiments.md measures it and this selection). So the
demo's recipe pretrains a few draws and keeps the one that predicts the world's *dev*
instructions best: the mean loss per output token of every dev chain's steps, as the `chain`
method trains them (text mode, the gold outputs), and of their `single` views. The test split is
never read, and the criterion looks at no FTHSS stage: it picks the base that serves the text
baseline best, which FTHSS is then measured against. It is blind to the gap either way: on one world
it picked the draw with the widest FTHSS − chain gap, on another the narrowest.

`fthss base select` runs it; the chosen base is copied to `--out` with the candidates and their
losses added to its `recipe.json`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from fthss.atomic import atomic_write_text
from fthss.errors import EmptyDataError, OutputExistsError
from fthss.world.pretrain import load_world_base, step_sequences

CRITERION = "mean loss per output token on the dev splits' text-mode step sequences"


@torch.no_grad()
def held_out_loss(model, tokenizer, tasks_dir: Path, batch_size: int = 64,
                  split: str = "dev") -> float:
    """Mean cross-entropy per output token of `split`'s step sequences (inputs are context,
    not scored), each sequence on its own at contiguous positions."""
    sequences = sorted(((i, o) for i, o, _ in step_sequences(tokenizer, tasks_dir, split)),
                       key=lambda s: len(s[0]) + len(s[1]))
    if not sequences:
        raise EmptyDataError(f"{tasks_dir}: no */{split}.jsonl with chains to score")
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for b in range(0, len(sequences), batch_size):
        batch = sequences[b:b + batch_size]
        width = max(len(i) + len(o) for i, o in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        for row, (input_ids, output_ids) in enumerate(batch):
            ids[row, :len(input_ids) + len(output_ids)] = torch.tensor(input_ids + output_ids)
            labels[row, len(input_ids):len(input_ids) + len(output_ids)] = torch.tensor(output_ids)
        ids, labels = ids.to(device), labels.to(device)
        # right padding and a causal model: real tokens never attend to the pads after them
        logits = model(input_ids=ids).logits[:, :-1].float()
        targets = labels[:, 1:]
        total += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
            reduction="sum").item()
        count += (targets != -100).sum().item()
    return total / count


def select_base(world_dir: str | Path, candidates: list[str | Path], out: str | Path,
                device: str | None = None) -> dict:
    """Score every candidate base of `world_dir` with `held_out_loss` and copy the best to
    `out` (written whole or not at all), its recipe gaining a `selection` record."""
    world_dir, out = Path(world_dir), Path(out)
    if out.exists() and any(out.iterdir()):
        raise OutputExistsError(f"{out}: exists and is not empty; choose another --out")
    from transformers import AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(world_dir / "tokenizer")
    scored = []
    for path in map(Path, candidates):
        model, recipe = load_world_base(path, world_dir, tokenizer)
        loss = held_out_loss(model.to(device).eval(), tokenizer, world_dir / "tasks")
        scored.append({"base": str(path), "seed": recipe["config"]["seed"], "held_out_loss": loss})
        print(f"[select] {path}: {CRITERION} {loss:.4f}")
    best = min(scored, key=lambda s: s["held_out_loss"])
    recipe = json.loads((Path(best["base"]) / "recipe.json").read_text())
    recipe["selection"] = {"criterion": CRITERION, "candidates": scored, "chosen": best["base"]}

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial"  # what an interrupted selection left is redone
    shutil.rmtree(staging, ignore_errors=True)
    try:
        shutil.copytree(best["base"], staging)
        atomic_write_text(staging / "recipe.json", json.dumps(recipe, indent=2))
        os.replace(staging, out)  # `out` is absent or empty (checked above): one rename
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return recipe
