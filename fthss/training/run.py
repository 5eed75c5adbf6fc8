"""Training a method end to end: from chain samples and stages to trained stages on disk.

`train_method` turns samples into the method's training sequences (`methods.py`) and runs the
`Trainer` once per phase: FTHSS single-round trains the stages one after another in chain order
(each phase reads the stages trained before it, frozen); every other method is one phase.
"""

from __future__ import annotations

from pathlib import Path

from fthss.layout.chain import ChainSample
from fthss.layout.sequence import SegmentCodec
from fthss.models.base import BaseModel
from fthss.prompts.stage import Stage
from fthss.training.config import TrainConfig
from fthss.training.methods import METHODS, method_view, training_chains
from fthss.training.trainer import Trainer, TrainResult

ROUNDS = ("single", "multi")


def train_method(base: BaseModel, samples: list[ChainSample], method: str, stages: list[Stage],
                 train: list[str] | None, config: TrainConfig, output_dir: str | Path,
                 rounds: str = "multi", max_samples: int | None = None,
                 progress: bool = True) -> list[TrainResult]:
    """Train `train` (default: every stage the method's chains use) among `stages` (which hold
    the frozen upstream stages too). Returns one result per phase."""
    if method not in METHODS:
        raise ValueError(f"unknown method '{method}'; choose one of {METHODS}")
    if rounds not in ROUNDS:
        raise ValueError(f"unknown rounds '{rounds}'; choose one of {ROUNDS}")
    if method == "adapt" and max_samples is None:
        max_samples = 5000  # the paper's section 4.4
    samples = [method_view(method, s) for s in samples[:max_samples]]
    in_chain_order = list(dict.fromkeys(step.stage for s in samples for step in s.steps))
    train = train or in_chain_order
    by_name = {s.name: s for s in stages}
    missing = set(in_chain_order) - set(by_name)
    if missing:
        raise ValueError(f"the {method} chains use stage(s) {sorted(missing)} that were neither "
                         "given nor created")
    codec = SegmentCodec(base.tokenizer)
    encoded = [codec.encode(s) for s in samples]
    sequential = method in ("fthss", "adapt") and rounds == "single"
    phases = [[n] for n in in_chain_order if n in train] if sequential else [train]
    results = []
    for phase in phases:
        chains = [c for chain in encoded for c in training_chains(method, chain, set(phase))]
        trainer = Trainer(base, stages, phase, chains, config, output_dir, progress=progress)
        results.append(trainer.train())
    return results
