"""The frozen base model every stage is a soft prompt on.

`BaseModel` wraps a Hugging Face causal LM and its tokenizer, checks that fthss can run it
(rotary positions, attention that takes a 4D mask), and knows the shapes stages depend on. Its
fingerprint identifies the base a stage was trained for.
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from fthss.errors import FthssError, ModelLoadError, SequenceTooLongError
from fthss.models.lora import LoraRouting, Route

# Attention implementations that apply a caller's 4D mask as given. FlashAttention kernels only
# know causal and padding masks, so they cannot express the cascade.
MASKABLE_ATTENTION = {"sdpa", "eager"}


class UnsupportedModelError(FthssError):
    """A base model fthss cannot run; the message says why."""


def _local_model(name: str | Path) -> Path:
    """A model folder: `name` itself when it exists, else the cached snapshot of the hub id
    `name` (offline: a model not downloaded yet is an error saying how to get it)."""
    path = Path(name)
    if path.exists() or str(name).count("/") != 1 or str(name).startswith((".", "/", "~")):
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(name), local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError) as err:
        raise ModelLoadError(
            f"{name}: neither a local folder nor a model in the Hugging Face cache "
            f"({_hub_cache()}); fthss never downloads: fetch it first "
            f"(`huggingface-cli download {name}`) or pass its folder") from err


def _hub_cache() -> str:
    from huggingface_hub.constants import HF_HUB_CACHE

    return str(HF_HUB_CACHE)


@dataclass
class BaseModel:
    """A frozen Hugging Face causal LM with rotary positions and a maskable attention, and its
    tokenizer: what every stage is made for. `BaseModel.load(DIR)` loads one (refusing models it
    cannot run exactly); `fthss.models.presets.preset_base` builds random-init ones.
    `forward` is the one forward every fthss path runs (cache, positions, 4D mask, lora route).
    """

    model: torch.nn.Module
    tokenizer: object

    def __post_init__(self):
        self.model.eval()
        self.model.requires_grad_(False)
        check_supported(self.model)

    @classmethod
    def load(cls, path: str | Path, dtype: torch.dtype | None = None, device: str | None = None,
             attn_implementation: str = "sdpa", trust_remote_code: bool = False) -> BaseModel:
        """Load a local model directory (weights and tokenizer), or a hub id
        (`meta-llama/Llama-3.2-1B`) already in the local Hugging Face cache: nothing is
        downloaded. Weights are read from safetensors only (a pickle can run code), and the
        directory's own Python code runs only with `trust_remote_code`."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = _local_model(path)
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path}: not a model directory (no config.json)")
        if not any(path.glob("*.safetensors")):
            pickled = sorted(p.name for pattern in ("*.bin", "*.pt", "*.pth")
                             for p in path.glob(pattern))
            raise UnsupportedModelError(
                f"{path}: no safetensors weights" + (
                    f"; {', '.join(pickled)} are pickle files, which are not loaded (they can "
                    "run code): convert them to safetensors" if pickled else ""))
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype or "auto", attn_implementation=attn_implementation,
                trust_remote_code=trust_remote_code, use_safetensors=True)
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        except Exception as err:
            # transformers and safetensors fail on a broken config.json or truncated weights
            # with whatever their parsers raise (JSON, OS, safetensors, key and type errors):
            # it is the folder that is at fault, so say so, naming it
            reason = " ".join(str(err).split()) or type(err).__name__
            raise ModelLoadError(f"{path}: cannot load the model: {reason[:600]}") from err
        if device:
            model.to(device)
        return cls(model, tokenizer)

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_kv_heads(self) -> int:
        return getattr(self.config, "num_key_value_heads", None) or self.config.num_attention_heads

    @property
    def head_dim(self) -> int:
        return (getattr(self.config, "head_dim", None)
                or self.config.hidden_size // self.config.num_attention_heads)

    @property
    def vocab_size(self) -> int:
        """Rows of the logits: the token ids the model can produce (stop ids must be below)."""
        head = self.model.get_output_embeddings()
        return head.weight.shape[0] if head is not None else self.config.vocab_size

    @property
    def max_positions(self) -> int:
        """Longest position + 1 the model is made for (RoPE works past it, but badly)."""
        return self.config.max_position_embeddings

    @property
    def attention_window(self) -> int | None:
        """The sliding window, when the model uses one: a 4D mask replaces it, so fthss refuses
        sequences longer than it rather than silently attend further than the model would."""
        window = getattr(self.config, "sliding_window", None)
        layer_types = getattr(self.config, "layer_types", None)
        if layer_types is not None and "sliding_attention" not in layer_types:
            return None
        if getattr(self.config, "use_sliding_window", True) is False:
            return None
        return window

    @property
    def position_limit(self) -> int:
        window = self.attention_window
        return min(self.max_positions, window) if window else self.max_positions

    def check_positions(self, position_ids: torch.Tensor) -> None:
        """Raise SequenceTooLongError if a position is past what the model supports."""
        limit = self.position_limit
        if position_ids.numel() and int(position_ids.max()) >= limit:
            raise SequenceTooLongError(
                f"a request needs position {int(position_ids.max())} but the base supports "
                f"positions < {limit} (prompt length + content tokens)")

    @cached_property
    def rotary(self) -> torch.nn.Module:
        return next(m for m in self.model.modules() if "Rotary" in type(m).__name__)

    def rotate_keys(self, keys: torch.Tensor, offset: int) -> torch.Tensor:
        """Move keys `[b, h, n, d]` by `offset` positions: RoPE rotations compose, so this is
        what the keys would be had they been computed `offset` positions later."""
        position = torch.full((1, 1), offset, device=keys.device)
        cos, sin = self.rotary(keys, position)  # [1, 1, d]
        if cos.shape[-1] != keys.shape[-1]:
            raise UnsupportedModelError(f"{type(self.model).__name__}: partial rotary embeddings "
                                        "cannot move prefix keys")
        half = keys.shape[-1] // 2
        rotated_half = torch.cat([-keys[..., half:], keys[..., :half]], dim=-1)
        return keys * cos[:, None].to(keys.dtype) + rotated_half * sin[:, None].to(keys.dtype)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings `[batch, tokens, hidden]` of `input_ids`."""
        return self.model.get_input_embeddings()(input_ids)

    @cached_property
    def _cache_argument(self) -> str:
        # transformers renamed `past_key_values` to `cache` (5.2x); accept both.
        names = inspect.signature(self.model.forward).parameters
        return "cache" if "cache" in names else "past_key_values"

    @cached_property
    def lora(self) -> LoraRouting:
        """The per-token LoRA routing of `lora` stages (hooks installed at first use)."""
        return LoraRouting(self.model)

    def forward(self, cache, position_ids: torch.Tensor, *, input_ids=None, inputs_embeds=None,
                attention_mask=None, logits: bool = True, logits_at: torch.Tensor | None = None,
                route: Route | None = None):
        """One forward that appends to `cache`; returns logits (at the sequence indices
        `logits_at` only, if given), or nothing for `logits=False` (prompt caches). `route`:
        each token through the LoRA deltas of the stage that owns it (`fthss.models.lora`)."""
        module = self.model if logits else self.model.base_model
        extra = {self._cache_argument: cache}
        if logits and logits_at is not None:
            extra["logits_to_keep"] = logits_at
        out = self.lora.run(route, module, input_ids=input_ids, inputs_embeds=inputs_embeds,
                            position_ids=position_ids, attention_mask=attention_mask,
                            use_cache=True, **extra)
        return out.logits if logits else None

    def attention_mask(self, visible: torch.Tensor) -> torch.Tensor:
        """The boolean visibility mask in the form this model's attention takes: SDPA takes it
        as is, eager attention adds it to the scores."""
        if self.config._attn_implementation == "sdpa":
            return visible
        bias = torch.zeros(visible.shape, dtype=self.dtype, device=visible.device)
        return bias.masked_fill(~visible, torch.finfo(self.dtype).min)

    @cached_property
    def fingerprint(self) -> dict:
        """What a stage must match: architecture, shapes and a hash of the embedding matrix
        (taken in bf16, so the same weights loaded in another dtype still match)."""
        weight = self.model.get_input_embeddings().weight.detach()
        digest = hashlib.sha256(
            weight.to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
        return {
            "architecture": type(self.model).__name__,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": weight.shape[0],
            "embedding_sha256": digest.hexdigest(),
        }

    def fingerprint_differences(self, saved: dict, what: str) -> list[str]:
        """How the fingerprint saved with a `what` (a stage, a checkpoint) differs from this
        base's: one 'field: <what> made for X, base has Y' per differing field."""
        return [f"{key}: {what} made for {saved.get(key)!r}, base has {here!r}"
                for key, here in self.fingerprint.items() if saved.get(key) != here]


def check_supported(model: torch.nn.Module) -> None:
    name = type(model).__name__
    if not any("Rotary" in type(m).__name__ for m in model.modules()):
        raise UnsupportedModelError(
            f"{name} has no rotary position embedding: fthss places every stage's prompt and "
            "content at shared positions and relies on attention depending only on position "
            "differences (RoPE). Absolute or ALiBi positions are not supported.")
    implementation = getattr(model.config, "_attn_implementation", None)
    if implementation not in MASKABLE_ATTENTION:
        raise UnsupportedModelError(
            f"{name} uses attention '{implementation}', which cannot take a custom 4D mask; "
            f"load it with attn_implementation in {sorted(MASKABLE_ATTENTION)}.")
    if getattr(model.config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{name} is an encoder-decoder: fthss needs a decoder-only LM")
