"""Stages on disk, in PEFT's adapter format plus files of fthss's own.

    adapter_config.json         PEFT's config: PROMPT_TUNING (a `prompt` stage), PREFIX_TUNING
                                with prefix_projection false (a `prefix` stage) or LORA (a
                                `lora` stage: r, lora_alpha, target_modules)
    adapter_model.safetensors   `prompt_embeddings`: [N, hidden] or [N, layers*2*kv_heads*head_dim];
                                for a lora stage PEFT's keys instead,
                                `base_model.model.<module path>.lora_A.weight` [r, in] and
                                `...lora_B.weight` [out, r]
    fthss_prompt.safetensors    a lora stage's soft prompt, when it has one (`prompt_embeddings`,
                                [N, hidden]): PEFT's LORA cannot hold it, and ignores the file
    fthss_stage.json            name, kind, init, the base model's fingerprint, and the sha256
                                of adapter_model.safetensors (`weights_sha256`) and of a lora
                                stage's prompt file (`prompt_sha256`): a byte changed in a
                                tensor is refused. Files written before they were kept have
                                none, and their weights are checked only for shape and NaN/inf.

PEFT loads such a folder unchanged, and a PEFT prompt-learning, LoRA or activated-LoRA (aLoRA)
adapter loads as a stage (its base cannot then be checked beyond shapes). That includes
PREFIX_TUNING with prefix_projection true: PEFT saves such a prefix already projected, so it
loads as a plain prefix. A LoRA adapter's layers are read from its weights' keys, so any
`target_modules` spelling and `layers_to_transform` load (a layer it leaves alone gets zero
deltas); what a stage cannot compute per token is refused (DoRA, rsLoRA, biases, per-module
ranks or alphas, modules other than attention and MLP projections). Only safetensors are read:
no pickle runs.

This module reads and writes a stage's parts (`StageParts`: its config, weight and lora deltas);
`fthss.prompts.stage` imports it and assembles the `Stage` (`Stage.from_pretrained`,
`Stage.save_pretrained`), so this module never imports the stage model.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load

from fthss.atomic import atomic_save_safetensors, atomic_write_text
from fthss.datafiles import json_document
from fthss.errors import FthssError
from fthss.models.base import BaseModel
from fthss.models.lora import LORA_TARGETS, LoraShapeError, LoraWeights, module_paths
from fthss.prompts.config import StageConfig, prefix_width

CONFIG, WEIGHTS, FTHSS_FILE = "adapter_config.json", "adapter_model.safetensors", "fthss_stage.json"
PROMPT_FILE = "fthss_prompt.safetensors"
PEFT_TYPES = {"prompt": "PROMPT_TUNING", "prefix": "PREFIX_TUNING", "lora": "LORA"}
# PEFT's key of one LoRA factor: base_model.model.<path>.lora_A.weight, <path> ending in
# layers.<i>.<...>.<target name>
_LORA_KEY = re.compile(r"^base_model\.model\.(?:.+\.)?layers\.(\d+)\.(?:.+\.)?(\w+)"
                       r"\.lora_([AB])\.weight$")
# LoraConfig settings a stage cannot honour (per-token routing of plain low-rank deltas), with
# the value they must have; a missing one takes PEFT's default, which is this value.
_LORA_PLAIN = {"use_dora": False, "use_rslora": False, "bias": "none", "lora_bias": False,
               "fan_in_fan_out": False, "rank_pattern": {}, "alpha_pattern": {},
               "modules_to_save": None, "trainable_token_indices": None,
               "target_parameters": None, "layer_replication": None}


class StageLoadError(FthssError):
    """A stage folder that cannot be used; the message names the file and what differs."""


# {target name: (A [layers, r, in], B [layers, out, r])}, as a Stage holds its deltas.
LoraFactors = dict[str, tuple[torch.Tensor, torch.Tensor]]


class StageParts(NamedTuple):
    """What a stage folder holds: `weight` the prompt or prefix `[N, width]`, `lora` the lora
    kind's deltas (None for the other kinds). `Stage(*parts)` is the stage."""

    config: StageConfig
    weight: torch.Tensor
    lora: LoraFactors | None = None


def write_stage(parts: StageParts, directory: str | Path, base: BaseModel) -> Path:
    """Write a stage's `parts` (made for `base`, which the caller has checked) to `directory`,
    creating it; each file atomically."""
    config, weight, lora = parts
    directory = Path(directory)
    kind, n = config.kind, config.num_virtual_tokens
    peft_config = {
        "task_type": "CAUSAL_LM", "peft_type": PEFT_TYPES[kind], "auto_mapping": None,
        "base_model_name_or_path": getattr(base.config, "_name_or_path", None) or None,
        "revision": None, "inference_mode": True, **_peft_specific(config, base)}
    ours = {"format": "fthss-stage", "version": 1, "name": config.name, "kind": kind,
            "num_virtual_tokens": n, "init": config.init,
            "init_text": config.init_text, "base": base.fingerprint}
    prompt = {"prompt_embeddings": weight.detach().float().cpu()}
    if kind == "lora":
        ours["weights_sha256"] = atomic_save_safetensors(_lora_tensors(lora, base),
                                                         directory / WEIGHTS)
        if n:
            ours["prompt_sha256"] = atomic_save_safetensors(prompt, directory / PROMPT_FILE)
        else:  # a stale prompt from an earlier save would load with this stage
            (directory / PROMPT_FILE).unlink(missing_ok=True)
    else:
        ours["weights_sha256"] = atomic_save_safetensors(prompt, directory / WEIGHTS)
    atomic_write_text(directory / CONFIG, json.dumps(peft_config, indent=2))
    atomic_write_text(directory / FTHSS_FILE, json.dumps(ours, indent=2))
    return directory


def _peft_specific(config: StageConfig, base: BaseModel) -> dict:
    """The kind's own fields of PEFT's config."""
    if config.kind == "lora":
        return {"r": config.lora_rank, "lora_alpha": config.lora_alpha,
                "target_modules": sorted(config.lora_targets), "lora_dropout": 0.0,
                "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
                **_LORA_PLAIN}
    prompt_learning = {"num_virtual_tokens": config.num_virtual_tokens,
                       "num_transformer_submodules": 1, "num_layers": base.num_layers,
                       "modules_to_save": None}
    if config.kind == "prompt":
        return {**prompt_learning, "token_dim": base.hidden_size,
                "num_attention_heads": base.config.num_attention_heads,
                # RANDOM: PEFT then needs no tokenizer to load it; the real init is ours
                "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None,
                "tokenizer_name_or_path": None, "tokenizer_kwargs": None}
    width = base.num_kv_heads * base.head_dim  # PEFT's GQA convention: one "head" per KV head
    return {**prompt_learning, "token_dim": width, "num_attention_heads": base.num_kv_heads,
            "encoder_hidden_size": width, "prefix_projection": False, "init_weights": None}


def _lora_tensors(lora: LoraFactors, base: BaseModel) -> dict[str, torch.Tensor]:
    """A lora stage's factors under PEFT's keys, one [r, in] / [out, r] pair per module."""
    tensors = {}
    for (layer, name), path in module_paths(base.model).items():
        if name in lora:
            key = f"base_model.model.{path}"
            a, b = lora[name]
            tensors[f"{key}.lora_A.weight"] = a[layer].detach().float().cpu().clone()
            tensors[f"{key}.lora_B.weight"] = b[layer].detach().float().cpu().clone()
    return tensors


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
               "init": str, "init_text": str, "base": dict, "weights_sha256": str,
               "prompt_sha256": str}


def read_stage(directory: str | Path, base: BaseModel | None = None,
               name: str | None = None) -> StageParts:
    """The parts of the stage saved in `directory` (by fthss or by PEFT). With `base`, also
    check that it was made for that base: its shapes always, its fingerprint when
    fthss_stage.json is there."""
    directory = Path(directory)
    if not directory.is_dir():
        raise StageLoadError(f"{directory}: no such stage folder")
    config = _read_json(directory / CONFIG, _CONFIG_TYPES)
    kind = _kind(directory / CONFIG, config)
    # exists, not is_file: a folder in its place is a broken stage, not a plain PEFT adapter
    ours = _read_ours(directory / FTHSS_FILE) if (directory / FTHSS_FILE).exists() else None
    sha256 = (ours or {}).get("weights_sha256")
    lora, settings = (_read_lora(directory, config, base, sha256) if kind == "lora"
                      else (None, {}))
    if lora is None:
        weight = _read_weight(directory, config, kind, sha256)
    elif (directory / PROMPT_FILE).exists():
        weight = _prompt_embeddings(directory / PROMPT_FILE, (ours or {}).get("prompt_sha256"))
    else:  # no soft prompt: N = 0
        weight = torch.zeros(0, base.hidden_size if base is not None else _lora_width(lora))
    n = weight.shape[0]
    if ours is not None and (ours.get("kind"), ours.get("num_virtual_tokens")) != (kind, n):
        holds = f"{PROMPT_FILE} (or its absence)" if lora else WEIGHTS
        raise StageLoadError(f"{directory / FTHSS_FILE}: says kind {ours.get('kind')} with "
                             f"{ours.get('num_virtual_tokens')} tokens, but {CONFIG} and "
                             f"{holds} hold a {kind} stage of {n}")
    meta = ours or {}  # a plain PEFT adapter: named after its folder, random init
    try:  # a folder name or a hand-edited file can break StageConfig's rules
        stage_config = StageConfig(name or meta.get("name") or directory.name, kind, n,
                                   meta.get("init", "random"), meta.get("init_text"), **settings)
    except ValueError as err:
        source = ("the name given" if name else FTHSS_FILE if meta.get("name") else "folder name")
        if not str(err).startswith("stage name"):  # init or init_text: only ours sets those
            source = FTHSS_FILE
        raise StageLoadError(f"{directory}: {err} (from {source})") from err
    parts = StageParts(stage_config, weight, lora)
    if base is not None:
        _check_base(directory, parts, base, ours)
    return parts


def _kind(path: Path, config: dict) -> str:
    kind = {v: k for k, v in PEFT_TYPES.items()}.get(config.get("peft_type"))
    if kind is None:
        raise StageLoadError(f"{path}: peft_type {config.get('peft_type')!r} is not a stage "
                             "(expected PROMPT_TUNING, PREFIX_TUNING or LORA)")
    if kind == "lora":
        return kind
    # Encoder-decoder adapters hold one prompt per submodule (2N rows): not a decoder's stage.
    if config.get("num_transformer_submodules", 1) not in (None, 1):
        raise StageLoadError(f"{path}: num_transformer_submodules is "
                             f"{config['num_transformer_submodules']}; fthss needs 1 "
                             "(decoder-only)")
    n = config.get("num_virtual_tokens")
    if not _positive(n, int):
        raise StageLoadError(f"{path}: num_virtual_tokens must be a positive integer, not {n!r}")
    return kind


def _positive(value, kind: type) -> bool:
    """`value` is a positive `kind` (an int also counts as a float; a bool never counts)."""
    types = (int, float) if kind is float else (int,)
    return isinstance(value, types) and not isinstance(value, bool) and value > 0


def _read_lora(directory: Path, config: dict, base: BaseModel | None, sha256: str | None
               ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict]:
    """A LoRA adapter's factors as a stage holds them, {target: (A [layers, r, in],
    B [layers, out, r])}, and its StageConfig settings. The layers and targets are the weights'
    keys (whatever `target_modules` says); a layer the adapter leaves alone gets zeros."""
    path, weights = directory / CONFIG, directory / WEIGHTS
    for field, plain in _LORA_PLAIN.items():
        value = config.get(field, plain)
        if value != plain and (value or plain):  # None, {} and [] all say "none"
            raise StageLoadError(f"{path}: {field} is {value!r}; a stage holds plain LoRA "
                                 f"deltas only ({field} {plain!r})")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not _positive(rank, int) or not _positive(alpha, float):
        raise StageLoadError(f"{path}: r must be a positive integer and lora_alpha a positive "
                             f"number, not {rank!r} and {alpha!r}")
    factors: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for key, tensor in _read_tensors(weights, sha256).items():
        match = _LORA_KEY.match(key)
        if match is None or match.group(2) not in LORA_TARGETS or not tensor.is_floating_point():
            raise StageLoadError(f"{weights}: tensor {key!r} is not a LoRA factor of a decoder "
                                 f"layer's {'/'.join(LORA_TARGETS)}")
        layer, target, factor = int(match.group(1)), match.group(2), match.group(3)
        factors.setdefault(target, {}).setdefault(layer, {})[factor] = tensor
    if not factors:
        raise StageLoadError(f"{weights}: no LoRA factors")
    layers = base.num_layers if base is not None else 1 + max(max(f) for f in factors.values())
    lora = {}
    for target in sorted(factors, key=LORA_TARGETS.index):
        lora[target] = _stacked(weights, target, factors[target], layers, rank)
    targets = tuple(lora)
    return lora, {"lora_rank": rank, "lora_alpha": float(alpha), "lora_targets": targets}


def _stacked(weights: Path, target: str, by_layer: dict[int, dict[str, torch.Tensor]],
             layers: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One target's per-layer factors stacked to A [layers, r, in], B [layers, out, r]."""
    first = by_layer[min(by_layer)]
    if set(first) != {"A", "B"}:
        raise StageLoadError(f"{weights}: layer {min(by_layer)}'s {target} has lora_"
                             f"{''.join(first)} only")
    a = torch.zeros(layers, rank, first["A"].shape[-1])
    b = torch.zeros(layers, first["B"].shape[0], rank)
    for layer, pair in sorted(by_layer.items()):
        if layer >= layers:
            raise StageLoadError(f"{weights}: {target} of layer {layer}, but the base has "
                                 f"{layers} layers")
        if set(pair) != {"A", "B"} or tuple(pair["A"].shape) != tuple(a.shape[1:]) or \
                tuple(pair["B"].shape) != tuple(b.shape[1:]):
            raise StageLoadError(
                f"{weights}: layer {layer}'s {target} factors are "
                + ", ".join(f"lora_{f} {tuple(t.shape)}" for f, t in sorted(pair.items()))
                + f"; expected lora_A {tuple(a.shape[1:])} and lora_B {tuple(b.shape[1:])} "
                f"(r = {rank} in {CONFIG})")
        if not (torch.isfinite(pair["A"]).all() and torch.isfinite(pair["B"]).all()):
            raise StageLoadError(f"{weights}: layer {layer}'s {target} holds NaN or inf values")
        a[layer], b[layer] = pair["A"], pair["B"]
    return a, b


def _lora_width(lora: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> int:
    """The hidden size, as the factors show it: every target reads or writes the residual."""
    name, (a, b) = next(iter(lora.items()))
    return b.shape[1] if name in ("o_proj", "down_proj") else a.shape[2]


def _read_ours(path: Path) -> dict:
    ours = _read_json(path, _OURS_TYPES)
    if ours.get("format") != "fthss-stage":
        raise StageLoadError(f"{path}: format is {ours.get('format')!r}, not 'fthss-stage'")
    if ours.get("version") != 1:
        raise StageLoadError(f"{path}: version {ours.get('version')!r}; this fthss reads version 1")
    return ours


def _read_tensors(path: Path, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, checked against `sha256` (from fthss_stage.json)
    when there is one: a changed byte inside a tensor leaves a well-formed file that only the
    hash can tell. A missing, pickled or broken file is refused."""
    if not path.is_file():
        pickled = path.with_name("adapter_model.bin")
        why = (f"; {pickled.name} exists but pickle files are not loaded (they can run code): "
               "convert it to safetensors" if path.name == WEIGHTS and pickled.is_file() else "")
        raise StageLoadError(f"{path}: missing{why}")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise StageLoadError(f"{path}: cannot read: {err.strerror or err}") from err
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise StageLoadError(f"{path}: its sha256 is not the one {FTHSS_FILE} holds: the file "
                             "was changed or corrupted after it was saved")
    try:
        return load(data)
    except (SafetensorError, ValueError) as err:
        raise StageLoadError(f"{path}: unreadable or truncated safetensors file ({err})") from err


def _prompt_embeddings(path: Path, sha256: str | None = None) -> torch.Tensor:
    """The `prompt_embeddings` tensor of `path`: floats, 2-D and finite."""
    tensors = _read_tensors(path, sha256)
    if "prompt_embeddings" not in tensors:
        raise StageLoadError(f"{path}: no 'prompt_embeddings' tensor (found {sorted(tensors)})")
    weight = tensors["prompt_embeddings"]
    if not weight.is_floating_point():
        raise StageLoadError(f"{path}: prompt_embeddings holds {weight.dtype}, not floats")
    if weight.ndim != 2:
        raise StageLoadError(f"{path}: prompt_embeddings has shape {tuple(weight.shape)}, not "
                             "[tokens, width]")
    if not torch.isfinite(weight).all():
        raise StageLoadError(f"{path}: prompt_embeddings holds NaN or inf values")
    return weight


def _read_weight(directory: Path, config: dict, kind: str, sha256: str | None) -> torch.Tensor:
    """A prompt or prefix stage's weight, checked against PEFT's config (and `sha256`)."""
    path = directory / WEIGHTS
    weight = _prompt_embeddings(path, sha256)
    n = config["num_virtual_tokens"]
    if weight.shape[0] != n:
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
    return weight


def _check_base(directory: Path, parts: StageParts, base: BaseModel, ours: dict | None) -> None:
    config, weight, lora = parts
    prefix = config.kind == "prefix"
    expected = prefix_width(base) if prefix else base.hidden_size
    if weight.shape[1] != expected:
        what = "layers*2*kv_heads*head_dim" if prefix else "hidden_size"
        path = directory / (PROMPT_FILE if config.kind == "lora" else WEIGHTS)
        raise StageLoadError(f"{path}: width {weight.shape[1]} does not fit "
                             f"this base (a {config.kind} stage needs its {what} = "
                             f"{expected})")
    if lora is not None:
        deltas = LoraWeights({n: a for n, (a, _) in lora.items()},
                             {n: b for n, (_, b) in lora.items()},
                             config.lora_alpha / config.lora_rank)
        try:
            deltas.check_fits(base.model, "LoRA factors")
        except LoraShapeError as err:
            raise StageLoadError(f"{directory / WEIGHTS}: {err}") from err
    if ours is None:
        # 4: the caller of load_stage / Stage.from_pretrained (they call read_stage)
        warnings.warn(f"{directory}: a PEFT adapter without {FTHSS_FILE}; only its shapes can "
                      "be checked against the base", stacklevel=4)
        return
    found = ours.get("base")
    differs = base.fingerprint_differences(found if isinstance(found, dict) else {}, "stage")
    if differs:
        raise StageLoadError(f"{directory / FTHSS_FILE}: stage '{config.name}' was trained for "
                             "another base model (" + "; ".join(differs) + ")")
