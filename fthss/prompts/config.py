"""What a stage is (`StageConfig`), apart from its weights: the one module that both the stage
model (`fthss.prompts.stage`) and its save/load module (`fthss.prompts.io`) import, so that
the model imports its save/load module and never the reverse (PEFT's layout)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from fthss.datafiles import is_valid_unicode
from fthss.errors import ConfigError
from fthss.layout.chain import STAGE_NAME_RULE, is_stage_name
from fthss.models.lora import LORA_TARGETS

if TYPE_CHECKING:
    from fthss.models.base import BaseModel

KINDS = ("prompt", "prefix", "lora")
INITS = ("random", "vocab", "text")


@dataclass
class StageConfig:
    """What a stage is. `num_virtual_tokens`: N (>= 1; a lora stage may have 0). `init`: how a
    new prompt starts: random (scaled to the embedding table), vocab (embeddings of random
    tokens) or text (`init_text`'s embeddings, repeated). The `lora_*` fields are the lora
    kind's: rank r, alpha (the deltas are scaled by alpha / r, as in PEFT) and the target
    module names."""

    name: str
    kind: Literal["prompt", "prefix", "lora"] = "prompt"
    num_virtual_tokens: int = 100
    init: Literal["random", "vocab", "text"] = "random"
    init_text: str | None = None
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self):
        if not is_stage_name(self.name):
            raise ConfigError(f"stage name {self.name!r:.80}: use {STAGE_NAME_RULE}")
        if self.kind not in KINDS:
            raise ConfigError(f"stage {self.name}: kind must be one of {KINDS}, not {self.kind!r}")
        if self.init not in INITS:
            raise ConfigError(f"stage {self.name}: init must be one of {INITS}, not {self.init!r}")
        if self.init == "text" and not self.init_text:
            raise ConfigError(f"stage {self.name}: init 'text' needs init_text")
        if self.init_text is not None and not (isinstance(self.init_text, str)
                                               and is_valid_unicode(self.init_text)):
            raise ConfigError(f"stage {self.name}: init_text must be valid Unicode text")
        least = 0 if self.kind == "lora" else 1
        if self.num_virtual_tokens < least:
            raise ConfigError(f"stage {self.name}: num_virtual_tokens must be >= {least}")
        self.lora_targets = tuple(self.lora_targets)
        if self.kind == "lora":
            if self.lora_rank < 1 or not self.lora_alpha > 0:
                raise ConfigError(f"stage {self.name}: lora_rank must be >= 1 and lora_alpha > 0")
            unknown = set(self.lora_targets) - set(LORA_TARGETS)
            if unknown or not self.lora_targets:
                raise ConfigError(f"stage {self.name}: lora_targets must be some of "
                                  f"{LORA_TARGETS}, not {sorted(unknown) or 'none'}")


def prefix_width(base: BaseModel) -> int:
    """A prefix stage's weight width on `base`: layers * 2 (K and V) * kv_heads * head_dim."""
    return base.num_layers * 2 * base.num_kv_heads * base.head_dim
