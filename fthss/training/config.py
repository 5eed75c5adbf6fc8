"""Training hyper-parameters. Defaults are the paper's (docs/design.md): lr 2e-4, 3 epochs, linear
warm-up over 3% of the steps then linear decay, gradient accumulation 8, sequences up to 1224
tokens, Adam without weight decay. Prompt parameters are fp32 whatever the base's dtype."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from fthss.errors import ConfigError


@dataclass
class TrainConfig:
    learning_rate: float = 2e-4
    lora_learning_rate: float | None = None  # lora stages' deltas (None: learning_rate)
    epochs: float = 3.0
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    micro_batch_size: int = 1  # sequences per process per forward
    grad_accumulation: int = 8  # global batch = micro_batch_size * processes * grad_accumulation
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    max_length: int | None = 1224  # prompt + content tokens; longer samples are an error
    gradient_checkpointing: bool = False
    reparam_hidden: int = 0  # prefix stages: P-Tuning v2 MLP width while training (0: none)
    save_every: int = 0  # checkpoint every K optimizer steps (0: only at the end)
    keep_checkpoints: int = 2
    seed: int = 0

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
