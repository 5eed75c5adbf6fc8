"""Training hyper-parameters. Defaults are the paper's (docs/design.md): lr 2e-4, 3 epochs, linear
warm-up over 3% of the steps then linear decay, gradient accumulation 8, sequences up to 1224
tokens, Adam without weight decay. Prompt parameters are fp32 whatever the base's dtype."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from fthss.errors import ConfigError
from fthss.ranges import COUNT, FRACTION, NON_NEGATIVE, NON_NEGATIVE_FLOAT, POSITIVE, SEED


def _option(default, help: str, range=None, aliases: tuple[str, ...] = ()):
    """A field with what its `fthss train` option needs: help, the range it must lie in
    (`fthss.ranges`; none for a switch), and the short spellings it also takes."""
    return field(default=default, metadata={"help": help, "range": range, "aliases": aliases})


@dataclass
class TrainConfig:
    """How stages are trained; `fthss train` has one option per field (`--learning-rate`, ...)."""

    learning_rate: float = _option(2e-4, "learning rate of prompts and prefixes", POSITIVE,
                                   ("--lr",))
    lora_learning_rate: float | None = _option(
        None, "learning rate of lora stages' deltas (default: --lr)", POSITIVE, ("--lora-lr",))
    epochs: float = _option(3.0, "passes over the training sequences", POSITIVE)
    max_steps: int | None = _option(None, "optimizer steps; overrides --epochs when set", COUNT)
    micro_batch_size: int = _option(1, "sequences per process per forward", COUNT)
    grad_accumulation: int = _option(
        8, "micro-batches per optimizer step (global batch = micro-batch x processes x this)",
        COUNT)
    warmup_ratio: float = _option(0.03, "share of the steps with a linear warm-up, then a "
                                  "linear decay", FRACTION)
    weight_decay: float = _option(0.0, "AdamW's weight decay", NON_NEGATIVE_FLOAT)
    max_grad_norm: float | None = _option(None, "clip the gradient norm to this", POSITIVE)
    max_length: int | None = _option(1224, "prompt + content positions a training sequence "
                                     "may take; a longer one is an error (or --skip-bad)", COUNT)
    gradient_checkpointing: bool = _option(False, "recompute each decoder layer in the "
                                           "backward pass (less memory, more time)")
    reparam_hidden: int = _option(0, "prefix stages: train through a P-Tuning v2 MLP of this "
                                  "width (0: none)", NON_NEGATIVE)
    save_every: int = _option(0, "checkpoint every K optimizer steps (0: only at the end)",
                              NON_NEGATIVE)
    keep_checkpoints: int = _option(2, "checkpoints kept (the latest ones)", COUNT)
    seed: int = _option(0, "seed of the data order (and of new stages' initialisation)", SEED)

    def __post_init__(self):
        positive = {"learning_rate": self.learning_rate, "epochs": self.epochs,
                    "lora_learning_rate": self.lora_learning_rate or self.learning_rate,
                    "micro_batch_size": self.micro_batch_size,
                    "grad_accumulation": self.grad_accumulation}
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"train config: {name} must be > 0, got {value}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError("train config: warmup_ratio must be in [0, 1)")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ConfigError("train config: max_steps must be > 0")

    def to_json(self) -> dict:
        return asdict(self)
