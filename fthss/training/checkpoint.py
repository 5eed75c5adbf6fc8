"""Training checkpoints: written atomically, resumed exactly.

A checkpoint is a folder `checkpoints/step-NNNNNN/` holding the trainable parameters
(`stages.safetensors`, reparameterisation included), the optimizer and scheduler states, the RNG
state and `state.json` (the step, from which the data position follows; the base's fingerprint;
the sha256 of every other file, so a byte changed in any of them is refused). It is written under a
temporary name and renamed into place, and `checkpoints/latest` names the newest complete one,
so a run killed at any moment resumes from the last checkpoint with nothing half-written.
Resuming refuses (CheckpointError, saying what differs) a checkpoint made on another base,
for other stages (names, virtual tokens, widths), holding NaN or inf, or unreadable; tensors
are read with safetensors and the optimizer, scheduler and RNG states with `torch.load`'s
`weights_only`, so a checkpoint from elsewhere runs no code.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fthss.atomic import atomic_write_text, file_sha256
from fthss.datafiles import json_document
from fthss.errors import FthssError
from fthss.training.settings import check_settings

STAGES = "stages.safetensors"
FILES = (STAGES, "optimizer.pt", "scheduler.pt", "rng.pt")  # state.json holds their sha256
_FOLDER = re.compile(r"step-(\d{6})")


class CheckpointError(FthssError):
    """A checkpoint this run cannot resume from; the message names the file and what differs."""


def save(directory: Path, step: int, stage_set, base, optimizer, scheduler, keep: int,
         settings: dict | None = None) -> Path:
    """Write the checkpoint of `step` (with the run's `settings`, `fthss.training.settings`)
    and point `latest` at it; keep the newest `keep`."""
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(".partial-step-*"):  # left by a run killed while saving
        shutil.rmtree(stale, ignore_errors=True)
    final = directory / f"step-{step:06d}"
    partial = directory / f".partial-step-{step:06d}"
    partial.mkdir()
    tensors = {k: v.detach().cpu().contiguous() for k, v in stage_set.state_dict().items()}
    save_file(tensors, partial / STAGES)
    torch.save(optimizer.state_dict(), partial / "optimizer.pt")
    torch.save(scheduler.state_dict(), partial / "scheduler.pt")
    torch.save(torch.get_rng_state(), partial / "rng.pt")
    digests = {f: file_sha256(partial / f) for f in FILES}
    (partial / "state.json").write_text(json.dumps({"step": step, "base": base.fingerprint,
                                                    "sha256": digests, "settings": settings}))
    for path in partial.iterdir():  # contents on disk before the folder becomes visible
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    atomic_write_text(directory / "latest", final.name)
    for old in sorted(directory.glob("step-*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_latest(directory: Path, stage_set, optimizer, scheduler, settings: dict | None = None,
                extend: bool = False) -> dict | None:
    """Restore the newest complete checkpoint into the given objects; None if there is none.
    Everything is read and checked before anything is restored, `settings` (this run's)
    against the checkpoint's (`fthss.training.settings.check_settings`)."""
    pointer = directory / "latest"
    if not pointer.exists():
        return None
    try:
        name = pointer.read_bytes().decode("utf-8", "replace").strip()
    except OSError as err:  # a folder in its place: not "no checkpoint", which starts over
        raise CheckpointError(f"{pointer}: cannot read: {err.strerror or err}") from err
    found = _FOLDER.fullmatch(name)
    if not found:  # a path from a file: never follow it out of the checkpoints folder
        raise CheckpointError(f"{pointer}: names {name!r}, not a checkpoint folder step-NNNNNN")
    folder = directory / name
    state = _read_state(folder / "state.json", int(found.group(1)))
    _check_digests(folder, state)
    differs = stage_set.frozen.base.fingerprint_differences(state["base"], "checkpoint")
    if differs:
        raise CheckpointError(f"{folder / 'state.json'}: made on another base model ("
                              + "; ".join(differs) + ")")
    tensors = _read_tensors(folder / STAGES, stage_set.state_dict())
    if settings is not None:  # after what is wrong with the files, the least of the errors
        check_settings(state.get("settings"), settings, extend, str(folder / "state.json"))
    states = {f: _torch_load(folder / f) for f in ("optimizer.pt", "scheduler.pt", "rng.pt")}
    try:
        optimizer.load_state_dict(states["optimizer.pt"])
        scheduler.load_state_dict(states["scheduler.pt"])
        torch.set_rng_state(states["rng.pt"])
    except (ValueError, TypeError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"{folder}: optimizer, scheduler or RNG state does not fit this "
                              f"run ({err})") from err
    stage_set.load_state_dict(tensors)
    return state


def _read_state(path: Path, step: int) -> dict:
    state = json_document(path, CheckpointError)
    if not isinstance(state, dict) or not isinstance(state.get("base"), dict):
        raise CheckpointError(f"{path}: no base model fingerprint")
    if state.get("step") != step:
        raise CheckpointError(f"{path}: says step {state.get('step')!r}, its folder {step}")
    return state


def _check_digests(folder: Path, state: dict) -> None:
    """Each file's sha256 against state.json's (checkpoints written before they were kept have
    none: then only the checks of each file's contents apply)."""
    digests = state.get("sha256")
    if digests is None:
        return
    if not isinstance(digests, dict) or set(digests) != set(FILES):
        raise CheckpointError(f"{folder / 'state.json'}: sha256 must map each of {list(FILES)} "
                              "to its digest")
    for name in FILES:
        try:
            found = file_sha256(folder / name)
        except OSError as err:
            raise CheckpointError(f"{folder / name}: cannot read: {err.strerror or err}") from err
        if found != digests[name]:
            raise CheckpointError(f"{folder / name}: its sha256 is not the one state.json holds: "
                                  "the file was changed or corrupted after it was saved")


def _read_tensors(path: Path, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The trained parameters, checked against this run's: same names, shapes, finite."""
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: unreadable or truncated safetensors file ({err})") from err
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path}: trained parameters differ from this run's (missing "
                              f"{missing}, unexpected {unexpected})")
    for key, tensor in tensors.items():
        if tensor.shape != expected[key].shape:
            raise CheckpointError(f"{path}: {key} has shape {tuple(tensor.shape)}, this run's "
                                  f"{tuple(expected[key].shape)} (another number of virtual "
                                  "tokens or another width)")
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"{path}: {key} holds NaN or inf values")
    return tensors


def _torch_load(path: Path):
    """weights_only: tensors and plain containers; a pickle naming code to run is refused."""
    try:
        return torch.load(path, weights_only=True)
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError) as err:
        summary = str(err).partition("\n")[0]  # torch's messages run to many lines
        raise CheckpointError(
            f"{path}: unreadable, truncated or not plain data ({summary})") from err


def enable_layer_recompute(base) -> None:
    """Gradient checkpointing per decoder layer. Transformers' own switch drops the KV cache
    under checkpointing, which would drop the prompt caches; the training forward's cache only
    reads (`fthss.training.forward.PrefixOnlyCache`), so recomputing a layer is safe."""
    from torch.utils.checkpoint import checkpoint

    for layer in base.model.base_model.layers:
        if getattr(layer, "_fthss_recompute", False):
            continue
        forward = layer.forward

        def recomputed(*args, _forward=forward, **kwargs):
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            # the backward pass recomputes the layer after the routed forward has returned:
            # bind the lora stages' route in effect now, or the recompute would differ
            return checkpoint(base.lora.bound(_forward), *args, use_reentrant=False, **kwargs)

        layer.forward = recomputed
        layer._fthss_recompute = True
