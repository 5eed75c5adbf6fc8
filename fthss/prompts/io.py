"""Stages on disk, in PEFT's adapter format plus one file of fthss's own.

    adapter_config.json         PEFT's config: PROMPT_TUNING (a `prompt` stage) or PREFIX_TUNING
                                with prefix_projection false (a `prefix` stage)
    adapter_model.safetensors   `prompt_embeddings`: [N, hidden] or [N, layers*2*kv_heads*head_dim]
    fthss_stage.json            name, kind, init, the base model's fingerprint, and the sha256
                                of adapter_model.safetensors (`weights_sha256`): a byte changed
                                in a tensor is refused. Files written before it was kept have
                                none, and their weights are checked only for shape and NaN/inf.

PEFT loads such a folder unchanged, and a PEFT prompt-learning adapter loads as a stage (its
base cannot then be checked beyond shapes). That includes PREFIX_TUNING with
prefix_projection true: PEFT saves such a prefix already projected, so it loads as a plain
prefix. Only safetensors are read: no pickle runs.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load

from fthss.atomic import atomic_save_safetensors, atomic_write_text
from fthss.datafiles import json_document
from fthss.errors import FthssError
from fthss.models.base import BaseModel
from fthss.prompts.stage import Stage, StageConfig, prefix_width

CONFIG, WEIGHTS, FTHSS_FILE = "adapter_config.json", "adapter_model.safetensors", "fthss_stage.json"
PEFT_TYPES = {"prompt": "PROMPT_TUNING", "prefix": "PREFIX_TUNING"}


class StageLoadError(FthssError):
    """A stage folder that cannot be used; the message names the file and what differs."""


def save_stage(stage: Stage, directory: str | Path, base: BaseModel) -> Path:
    """Write `stage` (made for `base`) to `directory`, creating it; each file atomically."""
    stage.check_fits(base)
    directory = Path(directory)
    kind, n = stage.config.kind, stage.num_virtual_tokens
    common = {
        "task_type": "CAUSAL_LM", "peft_type": PEFT_TYPES[kind], "auto_mapping": None,
        "base_model_name_or_path": getattr(base.config, "_name_or_path", None) or None,
        "revision": None, "inference_mode": True, "num_virtual_tokens": n,
        "num_transformer_submodules": 1, "num_layers": base.num_layers, "modules_to_save": None,
    }
    if kind == "prompt":
        specific = {"token_dim": base.hidden_size,
                    "num_attention_heads": base.config.num_attention_heads,
                    # RANDOM: PEFT then needs no tokenizer to load it; the real init is ours
                    "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None,
                    "tokenizer_name_or_path": None, "tokenizer_kwargs": None}
    else:  # PEFT's GQA convention: one "head" per KV head
        width = base.num_kv_heads * base.head_dim
        specific = {"token_dim": width, "num_attention_heads": base.num_kv_heads,
                    "encoder_hidden_size": width, "prefix_projection": False,
                    "init_weights": None}
    digest = atomic_save_safetensors(
        {"prompt_embeddings": stage.current_weight.detach().float().cpu()}, directory / WEIGHTS)
    ours = {"format": "fthss-stage", "version": 1, "name": stage.name, "kind": kind,
            "num_virtual_tokens": n, "init": stage.config.init,
            "init_text": stage.config.init_text, "base": base.fingerprint,
            "weights_sha256": digest}
    atomic_write_text(directory / CONFIG, json.dumps({**common, **specific}, indent=2))
    atomic_write_text(directory / FTHSS_FILE, json.dumps(ours, indent=2))
    return directory


def _read_json(path: Path, types: dict[str, type | tuple[type, ...]]) -> dict:
    """A JSON object file (unreadable, a folder, not UTF-8, malformed or nested too deep:
    StageLoadError naming it), each field in `types` present only with its type."""
    if not path.exists():
        raise StageLoadError(f"{path}: missing")
    value = json_document(path, StageLoadError)
    if not isinstance(value, dict):
        raise StageLoadError(f"{path}: expected a JSON object")
    for key, expected in types.items():
        found = value.get(key)
        # bool is an int to isinstance; `true` is no count
        if found is not None and (not isinstance(found, expected)
                                  or (isinstance(found, bool) and expected is not bool)):
            raise StageLoadError(f"{path}: field '{key}' has the wrong type "
                                 f"{type(found).__name__}")
    return value


_CONFIG_TYPES = {"peft_type": str, "num_virtual_tokens": int, "num_transformer_submodules": int,
                 "token_dim": int, "num_layers": int, "prefix_projection": bool}
_OURS_TYPES = {"format": str, "version": int, "name": str, "kind": str, "num_virtual_tokens": int,
               "init": str, "init_text": str, "base": dict, "weights_sha256": str}


def load_stage(directory: str | Path, base: BaseModel | None = None,
               name: str | None = None) -> Stage:
    """The stage saved in `directory` (by fthss or by PEFT). With `base`, also check that it
    was made for that base: its width always, its fingerprint when fthss_stage.json is there."""
    directory = Path(directory)
    if not directory.is_dir():
        raise StageLoadError(f"{directory}: no such stage folder")
    config = _read_json(directory / CONFIG, _CONFIG_TYPES)
    kind = _kind(directory / CONFIG, config)
    # exists, not is_file: a folder in its place is a broken stage, not a plain PEFT adapter
    ours = _read_ours(directory / FTHSS_FILE) if (directory / FTHSS_FILE).exists() else None
    weight = _read_weight(directory, config, kind, (ours or {}).get("weights_sha256"))
    n = weight.shape[0]
    if ours is not None and (ours.get("kind"), ours.get("num_virtual_tokens")) != (kind, n):
        raise StageLoadError(f"{directory / FTHSS_FILE}: says kind {ours.get('kind')} with "
                             f"{ours.get('num_virtual_tokens')} tokens, but {CONFIG} and "
                             f"{WEIGHTS} hold a {kind} stage of {n}")
    meta = ours or {}  # a plain PEFT adapter: named after its folder, random init
    try:  # a folder name or a hand-edited file can break StageConfig's rules
        stage_config = StageConfig(name or meta.get("name") or directory.name, kind, n,
                                   meta.get("init", "random"), meta.get("init_text"))
    except ValueError as err:
        source = ("the name given" if name else FTHSS_FILE if meta.get("name") else "folder name")
        if not str(err).startswith("stage name"):  # init or init_text: only ours sets those
            source = FTHSS_FILE
        raise StageLoadError(f"{directory}: {err} (from {source})") from err
    stage = Stage(stage_config, weight)
    if base is not None:
        _check_base(directory, stage, base, ours)
    return stage


def _kind(path: Path, config: dict) -> str:
    kind = {v: k for k, v in PEFT_TYPES.items()}.get(config.get("peft_type"))
    if kind is None:
        raise StageLoadError(f"{path}: peft_type {config.get('peft_type')!r} is not a stage "
                             "(expected PROMPT_TUNING or PREFIX_TUNING)")
    # Encoder-decoder adapters hold one prompt per submodule (2N rows): not a decoder's stage.
    if config.get("num_transformer_submodules", 1) not in (None, 1):
        raise StageLoadError(f"{path}: num_transformer_submodules is "
                             f"{config['num_transformer_submodules']}; fthss needs 1 "
                             "(decoder-only)")
    n = config.get("num_virtual_tokens")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise StageLoadError(f"{path}: num_virtual_tokens must be a positive integer, not {n!r}")
    return kind


def _read_ours(path: Path) -> dict:
    ours = _read_json(path, _OURS_TYPES)
    if ours.get("format") != "fthss-stage":
        raise StageLoadError(f"{path}: format is {ours.get('format')!r}, not 'fthss-stage'")
    if ours.get("version") != 1:
        raise StageLoadError(f"{path}: version {ours.get('version')!r}; this fthss reads version 1")
    return ours


def _read_weight(directory: Path, config: dict, kind: str, sha256: str | None) -> torch.Tensor:
    """The stage's tensor, checked against `sha256` (from fthss_stage.json) when there is one:
    a changed byte inside a tensor leaves a well-formed file that only the hash can tell."""
    path = directory / WEIGHTS
    if not path.is_file():
        pickled = directory / "adapter_model.bin"
        why = (f"; {pickled.name} exists but pickle files are not loaded (they can run code): "
               "convert it to safetensors" if pickled.is_file() else "")
        raise StageLoadError(f"{path}: missing{why}")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise StageLoadError(f"{path}: cannot read: {err.strerror or err}") from err
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise StageLoadError(f"{path}: its sha256 is not the one {FTHSS_FILE} holds: the file "
                             "was changed or corrupted after it was saved")
    try:
        tensors = load(data)
    except (SafetensorError, ValueError) as err:
        raise StageLoadError(f"{path}: unreadable or truncated safetensors file ({err})") from err
    if "prompt_embeddings" not in tensors:
        raise StageLoadError(f"{path}: no 'prompt_embeddings' tensor (found {sorted(tensors)})")
    weight = tensors["prompt_embeddings"]
    if not weight.is_floating_point():
        raise StageLoadError(f"{path}: prompt_embeddings holds {weight.dtype}, not floats")
    n = config["num_virtual_tokens"]
    if weight.ndim != 2 or weight.shape[0] != n:
        raise StageLoadError(f"{path}: prompt_embeddings has shape {tuple(weight.shape)}, but "
                             f"{CONFIG} says num_virtual_tokens={n}")
    # PEFT's layout: token_dim per virtual token, times layers*2 for a prefix (K and V).
    token_dim, layers = config.get("token_dim"), config.get("num_layers")
    if token_dim is not None and (kind == "prompt" or layers is not None):
        width = token_dim if kind == "prompt" else layers * 2 * token_dim
        if weight.shape[1] != width and kind == "prefix" and config.get("prefix_projection"):
            # PEFT saves a P-Tuning v2 prefix already projected (the MLP's output, the width
            # checked here), and that loads fine. Anything else would need the MLP, which
            # PEFT does not save.
            raise StageLoadError(f"{path}: {CONFIG} has prefix_projection true and "
                                 f"prompt_embeddings has width {weight.shape[1]}, not the "
                                 f"projected num_layers*2*token_dim={width}: it needs a "
                                 "projection this folder does not hold")
        if weight.shape[1] != width:
            how = "token_dim" if kind == "prompt" else "num_layers*2*token_dim"
            raise StageLoadError(f"{path}: prompt_embeddings has width {weight.shape[1]}, but "
                                 f"{CONFIG} says {how}={width}")
    if not torch.isfinite(weight).all():
        raise StageLoadError(f"{path}: prompt_embeddings holds NaN or inf values")
    return weight


def _check_base(directory: Path, stage: Stage, base: BaseModel, ours: dict | None) -> None:
    expected = base.hidden_size if stage.config.kind == "prompt" else prefix_width(base)
    if stage.weight.shape[1] != expected:
        what = "hidden_size" if stage.config.kind == "prompt" else "layers*2*kv_heads*head_dim"
        raise StageLoadError(f"{directory / WEIGHTS}: width {stage.weight.shape[1]} does not fit "
                             f"this base (a {stage.config.kind} stage needs its {what} = "
                             f"{expected})")
    if ours is None:
        warnings.warn(f"{directory}: a PEFT adapter without {FTHSS_FILE}; only its shapes can "
                      "be checked against the base", stacklevel=3)
        return
    found = ours.get("base")
    differs = base.fingerprint_differences(found if isinstance(found, dict) else {}, "stage")
    if differs:
        raise StageLoadError(f"{directory / FTHSS_FILE}: stage '{stage.name}' was trained for "
                             "another base model (" + "; ".join(differs) + ")")
