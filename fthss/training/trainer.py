"""The one-pass trainer: stages learn over whole chains, one forward per micro-batch.

Each micro-batch of `TokenChain`s is laid out with the visibility rule (`build_layout`) and run
through `fthss.training.forward.one_pass_logits`, the forward the engine's exactness is checked
against.
The loss is the mean token cross-entropy on the outputs of the stages being trained, averaged
per sequence, then over sequences, so that a global batch gives the same gradient on one process
or on many. Only the trained stages' parameters get gradients; the base and upstream stages
stay frozen.

Multi-process training runs unchanged under `accelerate launch` (DDP wraps the trainable
stages). The data order is a pure function of (seed, step), so resuming from a checkpoint
(stages, optimizer, scheduler, step) continues exactly where the run stopped.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from fthss.errors import ConfigError, EmptyDataError, NonFiniteError, SequenceTooLongError
from fthss.layout.chain import phase_folder
from fthss.layout.sequence import TokenChain, build_layout, pad_id
from fthss.models.base import BaseModel
from fthss.models.lora import LoraBank
from fthss.prompts.stage import Stage
from fthss.training import checkpoint
from fthss.training.config import TrainConfig
from fthss.training.forward import one_pass_logits
from fthss.training.report import MetricsLog
from fthss.training.settings import run_settings


@dataclass
class _Frozen:
    """What the loss needs but DDP must not wrap: the base and the frozen stages."""

    base: BaseModel
    stages: dict[str, Stage]


class StageSet(torch.nn.Module):
    """The trainable stages, and the loss of a micro-batch."""

    def __init__(self, base: BaseModel, trained: list[Stage], frozen: list[Stage]):
        super().__init__()
        self.trained = torch.nn.ModuleDict({s.name: s for s in trained})
        self.frozen = _Frozen(base, {s.name: s for s in frozen})

    def stage(self, name: str) -> Stage:
        return self.trained[name] if name in self.trained else self.frozen.stages[name]

    def forward(self, chains: list[TokenChain]) -> tuple[torch.Tensor, int]:
        """Loss of a micro-batch, and how many tokens it ran."""
        base = self.frozen.base
        names = list(dict.fromkeys(step.stage for chain in chains for step in chain.steps))
        stages = [self.stage(n) for n in names]
        first = max(s.num_virtual_tokens for s in stages)
        prompts = []
        for stage in stages:
            with torch.set_grad_enabled(stage.name in self.trained and torch.is_grad_enabled()):
                prompts.append(stage.prompt_cache(base, first))
        ids = {n: i for i, n in enumerate(names)}
        layout = build_layout(chains, ids, [s.num_virtual_tokens for s in stages],
                              pad_id=pad_id(base.tokenizer))
        lora = [s.lora_weights if s.name in self.trained or s.lora_weights is None
                else s.lora_weights.detach() for s in stages]
        bank = LoraBank.of(lora, base.dtype, base.device)
        logits = one_pass_logits(base, prompts, layout, bank)
        labels = layout.labels({ids[n] for n in names if n in self.trained}).to(logits.device)
        token_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                     labels[:, 1:].flatten(),
                                     reduction="none").view(len(chains), -1)
        targets = (labels[:, 1:] != -100).sum(dim=1)
        per_sequence = token_loss.sum(dim=1) / targets.clamp(min=1)
        loss = (per_sequence[targets > 0].mean() if bool((targets > 0).any())
                else token_loss.sum() * 0)
        # every trained parameter takes part in the graph, as DDP requires, even when a
        # micro-batch happens not to contain one of the trained stages
        loss = loss + sum(p.sum() for p in self.trained.parameters()) * 0
        return loss, int(layout.meta.is_real.sum())


@dataclass
class TrainResult:
    trained: list[str]
    steps: int
    final_loss: float
    first_loss: float
    tokens_per_s: float
    work_dir: Path  # checkpoints, metrics.jsonl, loss_curve.png


def sequence_length(chain: TokenChain) -> int:
    return len(chain.shared_ids) + sum(len(s.input_ids) + len(s.output_ids) for s in chain.steps)


def length_limit(config: TrainConfig, base: BaseModel) -> int:
    """max_length, and never past the base's position limit (positions it was not made for)."""
    return min(config.max_length or base.position_limit, base.position_limit)


def check_length(chain: TokenChain, stages: dict[str, Stage], limit: int, where: str) -> None:
    first = max(stages[s.stage].num_virtual_tokens for s in chain.steps)
    needed = first + sequence_length(chain)
    if needed > limit:
        raise SequenceTooLongError(
            f"{where}: needs {needed} positions (prompt {first} + content {needed - first}), "
            f"over the limit of {limit} (--max-length, or the base's position limit if smaller):"
            " raise --max-length if the base allows it, or leave such records out with "
            "--skip-bad")


def _warn_if_launched_alone(processes: int) -> None:
    """`accelerate launch --num_processes N` without `--multi_gpu` starts one plain process on
    a machine without GPUs (it sets MASTER_ADDR, but no launcher sets WORLD_SIZE): say so
    rather than train N times slower than asked."""
    if processes == 1 and "MASTER_ADDR" in os.environ and "WORLD_SIZE" not in os.environ:
        warnings.warn("accelerate launch asked for several processes but this run has one: "
                      "add --multi_gpu (on CPUs too: it picks the torchrun launcher, which "
                      "starts CPU processes over gloo)", stacklevel=3)


class Trainer:
    def __init__(self, base: BaseModel, stages: list[Stage], trained: list[str],
                 chains: list[TokenChain], config: TrainConfig, output_dir: str | Path,
                 accelerator=None, progress: bool = True, extend: bool = False):
        """`extend`: resuming may continue a run to more steps (`fthss.training.settings`)."""
        from accelerate import Accelerator

        unknown = set(trained) - {s.name for s in stages}
        if unknown:
            raise ConfigError(f"cannot train unknown stage(s) {sorted(unknown)}")
        if not chains:
            raise EmptyDataError("no training sequences (does any sample contain a trained stage?)")
        self.base, self.config, self.progress = base, config, progress
        # final stages land in output_dir/<name>; checkpoints, metrics and the loss curve in
        # a working folder of this run's own
        self.output_dir = Path(output_dir)
        self.work_dir = self.output_dir / phase_folder(trained)
        self.accelerator = accelerator or Accelerator(cpu=base.device.type == "cpu")
        kind = self.accelerator.distributed_type.value
        if kind not in ("NO", "MULTI_GPU", "MULTI_CPU"):
            # The trainable state is a few soft prompts: sharding it gains nothing, and the
            # frozen base sits outside the wrapped module (docs/training.md).
            raise NotImplementedError(f"accelerate backend {kind} is not supported; use DDP "
                                      "(accelerate launch --multi_gpu)")
        _warn_if_launched_alone(self.accelerator.num_processes)
        by_name = {s.name: s for s in stages}
        self._check_lengths(chains, by_name)
        self.chains = chains
        for name in trained:
            if config.reparam_hidden and by_name[name].config.kind == "prefix":
                by_name[name].reparameterize(config.reparam_hidden, seed=config.seed)
        self.stage_set = StageSet(base, [by_name[n] for n in trained],
                                  [s for s in stages if s.name not in trained])
        self.stage_set.to(base.device)
        self.trained = trained
        world = self.accelerator.num_processes
        self.global_batch = config.micro_batch_size * world * config.grad_accumulation
        self.steps_per_epoch = math.ceil(len(chains) / self.global_batch)
        self.total_steps = config.max_steps or math.ceil(config.epochs * self.steps_per_epoch)
        self.extend = extend
        self.settings = run_settings(config, chains, self.stage_set.trained.values(),
                                     self.stage_set.frozen.stages.values(), self.global_batch,
                                     self.total_steps)
        params = [(n, p) for n, p in self.stage_set.named_parameters() if p.requires_grad]
        lora = [p for n, p in params if ".lora_" in n]
        groups = [{"params": [p for n, p in params if ".lora_" not in n]}]
        if lora:  # deltas on the weights want a learning rate of their own (--lora-lr)
            groups.append({"params": lora,
                           "lr": config.lora_learning_rate or config.learning_rate})
        self.optimizer = torch.optim.AdamW(groups, lr=config.learning_rate,
                                           weight_decay=config.weight_decay)
        self.scheduler = get_linear_schedule_with_warmup(
            self.optimizer, math.ceil(config.warmup_ratio * self.total_steps), self.total_steps)

    def _check_lengths(self, chains, stages):
        limit = length_limit(self.config, self.base)
        for i, chain in enumerate(chains):
            check_length(chain, stages, limit, f"training sequence {i}")

    def batch_indices(self, step: int) -> list[int]:
        """This process's sequences for every micro-step of optimizer step `step`: a pure
        function of (seed, step), so a resumed run sees the data an uninterrupted one would."""
        epoch, index = divmod(step, self.steps_per_epoch)
        order = torch.randperm(
            len(self.chains),
            generator=torch.Generator().manual_seed(self.config.seed * 100_003 + epoch))
        start = index * self.global_batch
        return [int(order[(start + j) % len(self.chains)]) for j in range(self.global_batch)]

    def train(self) -> TrainResult:
        acc, config = self.accelerator, self.config
        state = checkpoint.load_latest(self.work_dir / "checkpoints", self.stage_set,
                                       self.optimizer, self.scheduler, self.settings, self.extend)
        start_step = state["step"] if state else 0
        if config.gradient_checkpointing:
            checkpoint.enable_layer_recompute(self.base)
        model = acc.prepare_model(self.stage_set)
        log = MetricsLog(self.work_dir / "metrics.jsonl", enabled=acc.is_main_process,
                         keep_until=start_step)
        bar = tqdm(total=self.total_steps, initial=start_step,
                   desc=f"train {'+'.join(self.trained)}", unit="step",
                   disable=not (self.progress and acc.is_main_process))
        micro, world, rank = config.micro_batch_size, acc.num_processes, acc.process_index
        # a resumed run counts on from the checkpoint: its tokens and its time so far
        last = log.rows[-1] if log.rows else {}
        tokens_seen = int(last.get("tokens", 0))
        started = time.perf_counter() - float(last.get("wall_s", 0.0))
        for step in range(start_step, self.total_steps):
            indices = self.batch_indices(step)
            total_loss, tokens = torch.zeros((), device=self.base.device), 0
            for a in range(config.grad_accumulation):
                begin = (a * world + rank) * micro
                chains = [self.chains[i] for i in indices[begin:begin + micro]]
                last = a == config.grad_accumulation - 1
                with acc.no_sync(model) if not last else nullcontext():
                    loss, n = model(chains)
                    acc.backward(loss / config.grad_accumulation)
                total_loss += loss.detach() / config.grad_accumulation
                tokens += n
            mean_loss = float(acc.reduce(total_loss, "mean"))
            self._check_finite(step + 1, mean_loss, "gradient", start_step)
            if config.max_grad_norm:
                acc.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self._check_finite(step + 1, mean_loss, "parameter", start_step)
            tokens_seen += int(acc.reduce(torch.tensor(tokens, device=self.base.device), "sum"))
            elapsed = time.perf_counter() - started
            log.write(step=step + 1, loss=mean_loss, lr=self.scheduler.get_last_lr()[0],
                      tokens=tokens_seen, tokens_per_s=tokens_seen / max(elapsed, 1e-9),
                      wall_s=elapsed, epoch=(step + 1) / self.steps_per_epoch)
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.4f}",
                            tok_s=f"{tokens_seen / max(elapsed, 1e-9):.0f}")
            done = step + 1 == self.total_steps
            if done or (config.save_every and (step + 1) % config.save_every == 0):
                self._save_checkpoint(step + 1)
        bar.close()
        return self._finish(log, tokens_seen / max(time.perf_counter() - started, 1e-9))

    def _check_finite(self, step: int, loss: float, what: str, start_step: int) -> None:
        """Stop at the first NaN or inf: in the loss or a gradient before the optimizer steps
        (`what` "gradient"), in a parameter after (`what` "parameter"). Nothing of this step is
        logged or saved, so the last checkpoint and the stages on disk stay the last good ones.
        Every process decides alike: the loss is reduced, gradients all-reduced."""
        params = [p for p in self.stage_set.parameters() if p.requires_grad]
        tensors = [p.grad for p in params if p.grad is not None] if what == "gradient" else params
        bad = ("the loss" if not math.isfinite(loss) else
               f"a {what}" if not all(bool(torch.isfinite(x).all()) for x in tensors) else None)
        if bad is None:
            return
        pointer = self.work_dir / "checkpoints" / "latest"
        kept = (f"the last good checkpoint, {pointer.read_text().strip()}, is kept"
                if pointer.is_file() else "no checkpoint was written")
        raise NonFiniteError(
            f"{self.work_dir}: step {step}: {bad} is NaN or inf (loss {loss:g}); training stopped "
            f"before it changed anything on disk ({kept}; started at step {start_step}). A "
            "stage holding huge values or too high a learning rate (--lr) does this")

    def _save_checkpoint(self, step: int) -> None:
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            checkpoint.save(self.work_dir / "checkpoints", step, self.stage_set, self.base,
                            self.optimizer, self.scheduler, self.config.keep_checkpoints,
                            self.settings)
        self.accelerator.wait_for_everyone()

    def _finish(self, log: MetricsLog, tokens_per_s: float) -> TrainResult:
        for name in self.trained:
            stage = self.stage_set.trained[name]
            stage.fold()
            if self.accelerator.is_main_process:
                stage.save_pretrained(self.output_dir / name, self.base)
        losses = log.losses()
        if self.accelerator.is_main_process:
            log.plot(self.work_dir / "loss_curve.png", title=f"training {'+'.join(self.trained)}")
        self.accelerator.wait_for_everyone()
        return TrainResult(self.trained, self.total_steps, losses[-1] if losses else float("nan"),
                           losses[0] if losses else float("nan"), tokens_per_s, self.work_dir)
