"""Training checkpoints: written atomically, resumed exactly.

A checkpoint is a folder `checkpoints/step-NNNNNN/` holding the trainable parameters
(`stages.safetensors`, reparameterisation included), the optimizer and scheduler states, the RNG
state and `state.json` (the step; the data position follows from it). It is written under a
temporary name and renamed into place, and `checkpoints/latest` names the newest complete one,
so a run killed at any moment resumes from the last checkpoint with nothing half-written.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fthss.atomic import atomic_write_text


def save(directory: Path, step: int, stage_set, base, optimizer, scheduler, keep: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{step:06d}"
    partial = directory / f".partial-step-{step:06d}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    tensors = {k: v.detach().cpu().contiguous() for k, v in stage_set.state_dict().items()}
    save_file(tensors, partial / "stages.safetensors")
    torch.save(optimizer.state_dict(), partial / "optimizer.pt")
    torch.save(scheduler.state_dict(), partial / "scheduler.pt")
    torch.save(torch.get_rng_state(), partial / "rng.pt")
    (partial / "state.json").write_text(json.dumps({"step": step, "base": base.fingerprint}))
    for path in partial.iterdir():  # contents on disk before the folder becomes visible
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    atomic_write_text(directory / "latest", final.name)
    for old in sorted(directory.glob("step-*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_latest(directory: Path, stage_set, optimizer, scheduler) -> dict | None:
    """Restore the newest complete checkpoint into the given objects; None if there is none."""
    pointer = directory / "latest"
    if not pointer.is_file():
        return None
    folder = directory / pointer.read_text().strip()
    try:
        state = json.loads((folder / "state.json").read_text())
        fingerprint = state["base"]
        if fingerprint != stage_set.frozen.base.fingerprint:
            raise ValueError(f"{folder}: checkpoint was made on another base model")
        missing, unexpected = stage_set.load_state_dict(load_file(folder / "stages.safetensors"),
                                                        strict=False)
        if missing or unexpected:
            raise ValueError(f"{folder}/stages.safetensors: trained stages differ from this run "
                             f"(missing {missing}, unexpected {unexpected})")
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
        torch.set_rng_state(torch.load(folder / "rng.pt", weights_only=True))
    except (OSError, KeyError, json.JSONDecodeError) as err:
        raise ValueError(f"{folder}: unreadable checkpoint ({err})") from err
    return state


def enable_layer_recompute(base) -> None:
    """Gradient checkpointing per decoder layer. Transformers' own switch drops the KV cache
    under checkpointing, which would drop the prompt caches; the training forward's cache only
    reads (`PrefixOnlyCache`), so recomputing a layer is safe."""
    from torch.utils.checkpoint import checkpoint

    for layer in base.model.base_model.layers:
        if getattr(layer, "_fthss_recompute", False):
            continue
        forward = layer.forward

        def recomputed(*args, _forward=forward, **kwargs):
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        layer.forward = recomputed
        layer._fthss_recompute = True
