"""Pretraining the demo's small base: a Llama-architecture model trained from scratch on the
world's documents, so that it knows the world's facts and reads its phrasing, and on
instruction-style sequences built from the tasks' *train* splits (never a dev or test
question), so that, like the instruction-tuned bases the paper starts from, it can already read
a passage and answer from it when stages pass text. A base trained on documents alone could
not (docs/experiments.md has the runs behind each choice here).

Instruction sequences are the text each step of a training chain is given and writes (the text
mode of the engine, without prompts) and the one-step `single` view of the chain. With
`hole_share` > 0 that share of instruction windows keeps the positions the step reads them at in
shared mode, holes included (a compress -> QA reader sees the question, then a jump over the
passages it may not see, then the compression): the base meets, in pretraining, the position
gaps a shared-mode reader meets. With `mask_share` > 0 that share
is instead whole train chains run as shared mode runs them: one sequence under the visibility
mask, so the base also meets the other half of what a shared-mode reader reads, K/V that an
upstream step wrote while it saw segments the reader may not.

With `init_from` the run continues from an existing base of the same world instead of a fresh
initialisation (its architecture then comes from that base): a few hundred steps of shared-mode
windows added to a base that already knows the world (`PretrainConfig.shared_mode_after`, the
`fthss demo --shared-mode-base` recipe). The demo's default bases are pretrained as any LM is:
one text-mode phase, no hole windows, no masked chains.

`fthss base pretrain` runs it; the recipe (architecture, data, steps, seed, and the recipe of the
base it continued from) is written beside the weights in `recipe.json`, so the same command(s)
rebuild the same base anywhere (bit-for-bit on the same hardware and library versions). A run
stopped part way resumes from its last checkpoint when the same command is run again.
"""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from itertools import pairwise
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fthss.atomic import atomic_write_bytes, atomic_write_text
from fthss.errors import ConfigError, FthssError, differences
from fthss.layout.chain import load_chains
from fthss.layout.sequence import SegmentCodec, TokenChain, positions
from fthss.layout.visibility import Kind, TokenMeta, visibility
from fthss.training.lock import run_lock


@dataclass
class PretrainConfig:
    hidden_size: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 4
    intermediate_size: int = 688
    sequence_length: int = 256
    batch_size: int = 32
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    steps: int = 1000
    weight_decay: float = 0.1
    instruction_share: float = 0.5  # share of batch rows drawn from the instruction sequences
    hole_share: float = 0.0  # share of instruction windows at their shared-mode positions
    mask_share: float = 0.0  # share of instruction windows that are whole chains, shared mode
    init_from: str = ""  # a base folder to continue from ("": a fresh initialisation)
    seed: int = 0

    @classmethod
    def shared_mode_after(cls, init_from: str | Path, steps: int,
                          seed: int = 0) -> PretrainConfig:
        """The second phase of the shared-mode bases (`fthss demo --shared-mode-base`): a run
        from a pretrained base at a third of its learning rate, three eighths of the instruction
        windows as shared-mode hole windows, three eighths as whole chains under the visibility
        mask, the last quarter in text mode (so the text chain's reader does not lose what the
        shared-mode windows teach the base)."""
        return cls(steps=steps, warmup_steps=max(1, round(steps / 10)), learning_rate=1e-3,
                   hole_share=0.375, mask_share=0.375, init_from=str(init_from), seed=seed)

    def __post_init__(self):
        if not (0 <= self.hole_share and 0 <= self.mask_share and
                self.hole_share + self.mask_share <= 1):
            raise ConfigError(f"hole_share ({self.hole_share}) and mask_share ({self.mask_share}) "
                             "are shares of the instruction windows: each at least 0, together "
                             "at most 1")


class PretrainError(FthssError):
    """A base to continue from that does not belong to the world being trained on."""


def token_stream(tokenizer, documents: list[str]) -> torch.Tensor:
    """All documents as one stream, each as <s> text </s>."""
    ids = []
    for doc in documents:
        ids += [tokenizer.bos_token_id] + tokenizer.encode(doc, add_special_tokens=False) + [
            tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


def step_sequences(tokenizer, tasks_dir: Path, split: str = "train"):
    """Every chain of a split, step by step as the `chain` method trains it minus the prompt,
    and its one-step `single` view: `(input ids, output ids, position steps)`, the last giving,
    per token, how far its shared-mode position lies after the previous token's (1, or more
    after a hole; 1 at the start)."""
    from fthss.training.methods import as_single, training_chains

    codec = SegmentCodec(tokenizer)
    for path in sorted(tasks_dir.glob(f"*/{split}.jsonl")):
        for sample in load_chains(path):
            for view in (codec.encode(sample), codec.encode(as_single(sample))):
                sequences = training_chains("chain", view, {s.stage for s in view.steps})
                content_before = len(view.shared_ids)
                for k, sequence in enumerate(sequences):
                    [step] = sequence.steps
                    own = len(view.steps[k].input_ids) + len(view.steps[k].output_ids)
                    where = (view.text_view_slots(k)
                             + list(range(content_before, content_before + own)))
                    yield step.input_ids, step.output_ids, [1] + [b - a for a, b in pairwise(where)]
                    content_before += own


def instruction_stream(tokenizer, tasks_dir: Path
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The train splits' step sequences as one stream, with the offset where each sequence
    starts and every token's position step (`step_sequences`)."""
    ids, starts, steps = [], [], []
    for input_ids, output_ids, position_steps in step_sequences(tokenizer, tasks_dir, "train"):
        starts.append(len(ids))
        ids += input_ids + output_ids
        steps += position_steps
    return (torch.tensor(ids, dtype=torch.long), torch.tensor(starts, dtype=torch.long),
            torch.tensor(steps, dtype=torch.long))


def shared_mode_chains(tokenizer, tasks_dir: Path) -> list[TokenChain]:
    """Every train chain with its gold outputs, as shared mode runs it (without prompts)."""
    codec = SegmentCodec(tokenizer)
    return [codec.encode(sample) for path in sorted(tasks_dir.glob("*/train.jsonl"))
            for sample in load_chains(path)]


def shared_mode_window(chain: TokenChain, length: int, pad_id: int) -> tuple[torch.Tensor, ...]:
    """A chain (cut to `length` tokens, then padded) as one window: its tokens, positions, the
    keys each token may attend to (`[length, length]`, the visibility rule) and its labels
    (every real token, so the final answer is learned from the K/V its upstream steps wrote)."""
    rows = chain.rows({step.stage: 0 for step in chain.steps})[:length]
    padding = length - len(rows)
    meta = TokenMeta.from_rows([[m for _, m in rows] + [(Kind.PAD, -1, -1, False)] * padding])
    ids = torch.tensor([t for t, _ in rows] + [pad_id] * padding, dtype=torch.long)
    return (ids, positions(meta, torch.zeros(1, dtype=torch.long))[0],
            visibility(meta, length)[0, 0], ids.masked_fill(~meta.is_real[0], -100))


class PretrainData:
    """What pretraining draws its windows from, built on first use and then kept: the world's
    documents as one stream, the train splits' instruction sequences and the train chains for
    masked-chain windows. Building them takes longer than a short run's steps, and several
    draws and phases of one world's base can share one (`fthss demo` without a committed base
    runs six)."""

    def __init__(self, world_dir: str | Path):
        from transformers import AutoTokenizer

        self.world_dir = Path(world_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.world_dir / "tokenizer")

    @cached_property
    def stream(self) -> torch.Tensor:
        documents = (self.world_dir / "pretrain.txt").read_text().splitlines()
        return token_stream(self.tokenizer, [d for d in documents if d.strip()])

    @cached_property
    def instructions(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return instruction_stream(self.tokenizer, self.world_dir / "tasks")

    @cached_property
    def chains(self) -> list[TokenChain]:
        return shared_mode_chains(self.tokenizer, self.world_dir / "tasks")


def pretrain(world_dir: str | Path, out: str | Path, config: PretrainConfig,
             device: str | None = None, progress: bool = True,
             data: PretrainData | None = None, save_every: int = 100) -> dict:
    """Pretrain (or continue) a base on the world in `world_dir` and save it with its recipe;
    `data`, if given, is that world's `PretrainData`, shared with other runs. Every
    `save_every` steps (0: never) the run's whole state goes to `out/pretrain-checkpoint.pt`;
    a rerun into `out` with the same recipe resumes from it, bit-for-bit the run it continues
    (`PretrainCheckpoint`); the file is removed once the base is saved."""
    from transformers import LlamaConfig, LlamaForCausalLM

    world_dir, out = Path(world_dir), Path(out)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    data = data or PretrainData(world_dir)
    if data.world_dir.resolve() != world_dir.resolve():
        raise ConfigError(f"pretraining data of {data.world_dir} given for the world {world_dir}")
    tokenizer = data.tokenizer
    torch.manual_seed(config.seed)
    if config.init_from:  # checked before the streams are built: a wrong base fails at once
        model, parent_recipe = load_world_base(Path(config.init_from), world_dir, tokenizer)
        model = model.to(device)
        architecture = model.config  # the recipe records the architecture actually trained
        config = replace(config, hidden_size=architecture.hidden_size,
                         layers=architecture.num_hidden_layers,
                         heads=architecture.num_attention_heads,
                         kv_heads=architecture.num_key_value_heads,
                         intermediate_size=architecture.intermediate_size)
    else:
        parent_recipe = None
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size, num_hidden_layers=config.layers,
            num_attention_heads=config.heads, num_key_value_heads=config.kv_heads,
            max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=True)).to(device)
    world = json.loads((world_dir / "manifest.json").read_text())
    checkpoint = PretrainCheckpoint(out, {"config": asdict(config), "world": world})
    saved = checkpoint.read()  # before the streams are built: a wrong rerun fails at once
    stream = data.stream
    instructions, instruction_starts, position_steps = data.instructions
    chains = data.chains if config.mask_share else []
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate,
                                  weight_decay=config.weight_decay, betas=(0.9, 0.95))

    def lr_at(step):  # linear warm-up, cosine decay to 10%
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress_ = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    generator = torch.Generator().manual_seed(config.seed)
    length = config.sequence_length
    causal = torch.ones(length, length, dtype=torch.bool).tril()

    def window() -> tuple[torch.Tensor, ...]:
        """A document window (anywhere in the stream), an instruction window (starting at a
        sequence start, so the first tokens are a whole question) or a whole chain in shared
        mode: tokens, positions, the keys each token may attend to, labels."""
        contiguous = torch.arange(length)
        if torch.rand((), generator=generator).item() < config.instruction_share:
            pick = torch.randint(0, len(instruction_starts), (), generator=generator).item()
            start = min(instruction_starts[pick].item(), len(instructions) - length)
            ids = instructions[start:start + length]
            draw = torch.rand((), generator=generator).item()
            if draw < config.hole_share:
                steps_ = position_steps[start:start + length]
                return ids, steps_.cumsum(0) - steps_[0], causal, ids
            if draw < config.hole_share + config.mask_share:
                chain = chains[torch.randint(0, len(chains), (), generator=generator).item()]
                return shared_mode_window(chain, length, tokenizer.pad_token_id)
            return ids, contiguous, causal, ids
        start = torch.randint(0, len(stream) - length - 1, (), generator=generator).item()
        ids = stream[start:start + length]
        return ids, contiguous, causal, ids

    with run_lock(out):
        first_step, losses, earlier_s = checkpoint.restore(saved, model, optimizer, scheduler,
                                                           generator)
        model.train()
        bar = tqdm(range(first_step, config.steps), desc="pretrain", disable=not progress,
                   initial=first_step, total=config.steps)
        started = time.perf_counter()
        for step in bar:
            batch, positions_, visible, labels = (
                torch.stack(t).to(device)
                for t in zip(*(window() for _ in range(config.batch_size)), strict=True))
            # without chain windows every row is causal: no mask, the kernels' causal path
            mask = visible[:, None] if config.mask_share else None
            loss = model(input_ids=batch, position_ids=positions_, attention_mask=mask,
                         labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            done = step + 1 - first_step
            tokens_per_s = done * config.batch_size * length / (time.perf_counter() - started)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tokens_per_s:.0f}")
            if save_every and (step + 1) % save_every == 0 and step + 1 < config.steps:
                checkpoint.save(step + 1, model, optimizer, scheduler, generator, losses,
                                earlier_s + time.perf_counter() - started)
        model.eval()
        tail = max(1, len(losses) // 10)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        recipe = {"config": asdict(config), "world": world,
                  "stream_tokens": len(stream), "instruction_tokens": len(instructions),
                  "instruction_sequences": len(instruction_starts), "first_loss": losses[0],
                  "final_loss": sum(losses[-tail:]) / tail,  # mean over the last 10% of steps
                  "tokens_seen": config.steps * config.batch_size * length,
                  "parameters": sum(p.numel() for p in model.parameters()),
                  "device": str(device),
                  "wall_s": earlier_s + time.perf_counter() - started,  # resumed runs' summed
                  "torch": torch.__version__, "continued_from": parent_recipe}
        atomic_write_text(out / "recipe.json", json.dumps(recipe, indent=2))
        checkpoint.remove()
    return recipe


class PretrainCheckpoint:
    """A pretraining run's whole state in one file, `OUT/pretrain-checkpoint.pt`: the weights,
    AdamW's moments, the schedule, the data generator and torch's RNG, the losses so far and the
    time spent. Written atomically (a run killed while saving keeps the previous one), loaded
    with `weights_only`, and refused (ConfigError naming the fields) when the rerun's recipe or
    world differs from the one that wrote it: a resumed run is the same run, bit-for-bit."""

    FILE = "pretrain-checkpoint.pt"

    def __init__(self, out: Path, identity: dict):
        self.path, self.identity = out / self.FILE, identity

    def save(self, step: int, model, optimizer, scheduler, generator, losses: list[float],
             wall_s: float) -> None:
        """Write the state after `step` steps (the losses and wall seconds so far with it)."""
        buffer = io.BytesIO()
        torch.save({"identity": self.identity, "step": step, "losses": losses, "wall_s": wall_s,
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "generator": generator.get_state(),
                    "rng": torch.get_rng_state()}, buffer)
        atomic_write_bytes(self.path, buffer.getvalue())

    def read(self) -> dict | None:
        """The saved state, after checking it was written by this run; None when there is
        none."""
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as err:  # truncated or foreign: say which file, never start over
            raise ConfigError(f"{self.path}: not a readable pretraining checkpoint ({err}); "
                              "delete it to start the run over") from err
        saved = state.get("identity", {}) if isinstance(state, dict) else {}
        differing = differences(_flat(saved), _flat(self.identity))
        if differing:
            raise ConfigError(f"{self.path}: written by another pretraining run ("
                              + ", ".join(differing.values()) + "); rerun with its recipe, or "
                              "delete it to start over")
        return state

    @staticmethod
    def restore(state: dict | None, model, optimizer, scheduler, generator
                ) -> tuple[int, list[float], float]:
        """Put a `read` state into the given objects: `(step to go on from, losses so far, wall
        seconds so far)`; a fresh run's `(0, [], 0.0)` when there is none."""
        if state is None:
            return 0, [], 0.0
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["rng"])
        return state["step"], state["losses"], state["wall_s"]

    def remove(self) -> None:
        """Delete the checkpoint (the base it led to is saved)."""
        self.path.unlink(missing_ok=True)


def _flat(identity: dict) -> dict:
    """`{"config": {"seed": 0}}` as `{"config.seed": 0}`, for messages naming the field."""
    return {f"{part}.{k}": v for part, values in identity.items()
            if isinstance(values, dict) for k, v in values.items()}


def load_world_base(base_dir: Path, world_dir: Path, tokenizer):
    """The model of `base_dir` and its recipe, after checking it was pretrained on this world
    with this tokenizer (a base of another world would read the same ids as other words): the
    base a run continues from, or a candidate of `fthss base select`."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    recipe_path = base_dir / "recipe.json"
    if not recipe_path.is_file():
        raise PretrainError(f"{base_dir}: no recipe.json; expected a folder written by "
                            "`fthss base pretrain`")
    recipe = json.loads(recipe_path.read_text())
    world, theirs = json.loads((world_dir / "manifest.json").read_text()), recipe.get("world", {})
    differing = differences(theirs, world)
    if differing:  # the same rule as the demo's embedded bases: exactly this world
        raise PretrainError(f"{recipe_path}: pretrained on another world than {world_dir} ("
                            + ", ".join(differing.values()) + ")")
    if AutoTokenizer.from_pretrained(base_dir).get_vocab() != tokenizer.get_vocab():
        raise PretrainError(f"{base_dir}: its tokenizer is not the one of "
                            f"{world_dir / 'tokenizer'}")
    return LlamaForCausalLM.from_pretrained(base_dir), recipe
