"""Training a method end to end: from chain samples and stages to trained stages on disk.

`train_method` turns samples into the method's training sequences (`methods.py`) and runs the
`Trainer` once per phase: FTHSS single-round trains the stages one after another in chain order
(each phase reads the stages trained before it, frozen); every other method is one phase.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path

from fthss.datafiles import OnBad, parse_each
from fthss.errors import ConfigError, EmptyDataError
from fthss.layout.chain import ChainFormatError, ChainSample
from fthss.layout.sequence import SegmentCodec
from fthss.models.base import BaseModel
from fthss.prompts.stage import Stage
from fthss.training.config import TrainConfig
from fthss.training.lock import run_lock
from fthss.training.methods import (
    METHODS,
    check_gold_outputs,
    method_view,
    training_chains,
)
from fthss.training.trainer import (
    SequenceTooLongError,
    Trainer,
    TrainResult,
    check_length,
    length_limit,
)

ROUNDS = ("single", "multi")


def trains_one_stage_per_phase(method: str, rounds: str) -> bool:
    """FTHSS (and adapt) single-round: one phase per stage, in chain order."""
    return method in ("fthss", "adapt") and rounds == "single"


def train_method(base: BaseModel, samples: list[ChainSample], method: str, stages: list[Stage],
                 train: list[str] | None, config: TrainConfig, output_dir: str | Path,
                 rounds: str = "multi", max_samples: int | None = None,
                 progress: bool = True, on_bad: OnBad | None = None,
                 extend: bool = False) -> list[TrainResult]:
    """Train `train` (default: every stage the method's chains use) among `stages` (which hold
    the frozen upstream stages too). Returns one result per phase.

    Every sample is checked before any training starts: a sample without the gold outputs the
    method trains on, or with a training sequence longer than the positions allowed, raises an
    error naming it (its `source`, file and line), or goes to `on_bad` and is left out.

    The run holds `output_dir`'s lock (`fthss.training.lock`) throughout: a second run into
    the same folder is refused. Rerunning resumes from the checkpoints if the settings agree;
    `extend` lets it continue to more steps (`fthss.training.settings`)."""
    if method not in METHODS:
        raise ConfigError(f"unknown method '{method}'; choose one of {METHODS}")
    if rounds not in ROUNDS:
        raise ConfigError(f"unknown rounds '{rounds}'; choose one of {ROUNDS}")
    if method == "adapt" and max_samples is None:
        max_samples = 5000  # the paper's section 4.4
    samples = samples[:max_samples]
    if not samples:
        raise EmptyDataError("no training samples (none read, every one skipped, or "
                             "max_samples 0)")
    views = [method_view(method, s) for s in samples]
    in_chain_order = list(dict.fromkeys(step.stage for s in views for step in s.steps))
    train = train or in_chain_order
    by_name = {s.name: s for s in stages}
    missing = set(in_chain_order) - set(by_name)
    if missing:
        raise ConfigError(f"the {method} chains use stage(s) {sorted(missing)} that were neither "
                         "given nor created")
    codec = SegmentCodec(base.tokenizer)
    limit = length_limit(config, base)

    def encode(pair, where):
        sample, view = pair
        check_gold_outputs(method, sample, where)
        chain = codec.encode(view)
        # the sequences of every phase: the union over the trained stages holds them all
        for sequence in training_chains(method, chain, set(train)):
            check_length(sequence, by_name, limit, where)
        return chain

    encoded = parse_each(((s.source or f"sample {i}", (s, v))
                          for i, (s, v) in enumerate(zip(samples, views, strict=True))), encode,
                         (ChainFormatError, SequenceTooLongError), on_bad)
    phases = ([[n] for n in in_chain_order if n in train]
              if trains_one_stage_per_phase(method, rounds) else [train])
    results = []
    # the processes of one DDP run share the folder: the first (global rank 0) holds the lock
    with run_lock(output_dir) if int(os.environ.get("RANK", "0")) == 0 else nullcontext():
        for phase in phases:
            chains = [c for chain in encoded for c in training_chains(method, chain, set(phase))]
            trainer = Trainer(base, stages, phase, chains, config, output_dir, progress=progress,
                              extend=extend)
            results.append(trainer.train())
    return results
