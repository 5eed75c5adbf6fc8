"""`fthss demo`: the whole paper on a laptop. Builds the synthetic world, takes the embedded
base (or pretrains one), trains every method on the four tasks, evaluates them on the test
splits, measures stage-B latency and KV memory, and writes one report.

Everything lands under `--out` (default `runs/demo`): world/, stages/<task>/<method>/<stage>/,
report.md, report.json, predictions.jsonl and the plots. Trained stages already in the folder
are reused, so an interrupted demo picks up where it stopped (the trainer resumes from its
checkpoints too).
`--quick` is the smoke run CI executes: the same pipeline on a few records and steps.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fthss.atomic import atomic_write_text
from fthss.errors import ConfigError

ASSETS = Path(__file__).parent / "assets"


@dataclass
class DemoConfig:
    seed: int = 0
    test_records: int = 1000  # per task
    train_samples: int = 1024  # per task and method (adapt: a quarter, as the paper's subset)
    epochs: float = 1.0
    micro_batch_size: int = 16
    # single-round FTHSS (and adapt) trains one stage per phase where the chain trains all in one:
    # dividing the micro-batch by the number of stages gives each stage the chain's number of
    # updates, each of as many of its own sequences (docs/experiments.md, exp11)
    equal_stage_updates: bool = True
    learning_rate: float = 3e-2
    prompt_tokens: int = 8
    prompt_init: str = "vocab"
    batch_size: int = 128  # generation
    max_new_tokens: int | None = None  # cap on every step's generation (the tasks set their own)
    latency_lengths: tuple[int, ...] = (250, 500, 1000, 1500)
    memory_total_tokens: int = 1000
    pretrain_steps: int = 1000  # only when no embedded base matches the world
    shared_mode_steps: int = 667  # then mostly in shared mode (PretrainConfig.shared_mode_after)
    pretrain_draws: int = 3  # pretraining seeds 0..n-1, the lowest dev loss kept (world/select.py)
    base: str | None = None  # a base pretrained on this world, instead of the embedded one

    @classmethod
    def quick(cls, seed: int = 0, base: str | None = None) -> DemoConfig:
        return cls(seed=seed, base=base, test_records=48, train_samples=64, max_new_tokens=32,
                   latency_lengths=(100, 400), memory_total_tokens=120, pretrain_steps=40,
                   shared_mode_steps=10, pretrain_draws=1)


def embedded_base(world_manifest: dict) -> Path | None:
    """The committed base pretrained on exactly this world, if there is one."""
    for recipe in sorted(ASSETS.glob("base-s*/recipe.json")):
        if json.loads(recipe.read_text())["world"] == world_manifest:
            return recipe.parent
    return None


def prepare(config: DemoConfig, out: Path, device: str):
    """The world (built once per folder) and a base that knows it."""
    from transformers import AutoTokenizer

    from fthss.models.base import BaseModel
    from fthss.world.build import build

    world = out / "world"
    manifest_path = world / "manifest.json"
    if not manifest_path.is_file() or json.loads(manifest_path.read_text())["seed"] != config.seed:
        print(f"[demo] building the world (seed {config.seed}) in {world}")
        build(world, seed=config.seed)
    manifest = json.loads(manifest_path.read_text())
    base_dir = Path(config.base) if config.base else embedded_base(manifest)
    if base_dir is None:
        base_dir = out / "base"
        if not (base_dir / "recipe.json").is_file():
            pretrain_base(world, base_dir, config, device)
    print(f"[demo] base: {base_dir}")
    base = BaseModel.load(base_dir, device=device)
    if base.tokenizer.get_vocab() != AutoTokenizer.from_pretrained(world / "tokenizer").get_vocab():
        raise ConfigError(f"the base in {base_dir} was pretrained with another tokenizer than the "
                         f"world in {world} has: rebuild it with `fthss base pretrain`")
    return world, base


def pretrain_base(world: Path, base_dir: Path, config: DemoConfig, device: str) -> None:
    """The committed bases' recipe for a world without one: `pretrain_draws` draws of both
    phases (seeds 0, 1, ...), the one with the lowest dev loss copied to `base_dir`. Draws
    already in the folder are reused."""
    from fthss.world.pretrain import PretrainConfig, PretrainData, pretrain
    from fthss.world.select import select_base

    print(f"[demo] no embedded base for world seed {config.seed}: pretraining "
          f"{config.pretrain_draws} draw(s) of {config.pretrain_steps} + "
          f"{config.shared_mode_steps} steps (~70 min each for 1,000 + 667 on a 2-core CPU), "
          "keeping the one with the lowest dev loss")
    data, draws = PretrainData(world), []
    for seed in range(config.pretrain_draws):
        first = base_dir.parent / "base-draws" / f"seed-{seed}-first"
        draw = base_dir.parent / "base-draws" / f"seed-{seed}"
        if not (first / "recipe.json").is_file():
            pretrain(world, first, PretrainConfig(steps=config.pretrain_steps, seed=seed),
                     device=device, data=data)
        if not (draw / "recipe.json").is_file():
            pretrain(world, draw, PretrainConfig.shared_mode_after(
                first, config.shared_mode_steps, seed=seed), device=device, data=data)
        draws.append(draw)
    select_base(world, draws, base_dir, device=device)


def train_stages(base, task, samples, method: str, config: DemoConfig, folder: Path,
                 start_from: list | None = None) -> list:
    """The method's trained stages: loaded from `folder` if a previous run saved them all."""
    from fthss.prompts.io import load_stage
    from fthss.prompts.stage import Stage, StageConfig
    from fthss.training.config import TrainConfig
    from fthss.training.methods import method_view
    from fthss.training.run import train_method, trains_one_stage_per_phase

    names = list(dict.fromkeys(s.stage for x in samples for s in method_view(method, x).steps))
    if all((folder / n / "adapter_config.json").is_file() for n in names):
        return [load_stage(folder / n, base) for n in names]
    # adapt trains copies: the stages it starts from are evaluated as they are
    stages = [copy.deepcopy(s) for s in start_from] if start_from else [
        Stage.create(StageConfig(n, "prompt", config.prompt_tokens, config.prompt_init), base,
                     seed=config.seed * 100 + i) for i, n in enumerate(names)]
    micro_batch = config.micro_batch_size
    if config.equal_stage_updates and trains_one_stage_per_phase(method, task.rounds):
        micro_batch = max(1, micro_batch // len(names))
    train = TrainConfig(learning_rate=config.learning_rate, epochs=config.epochs,
                        micro_batch_size=micro_batch, grad_accumulation=1,
                        warmup_ratio=0.03, max_length=None, seed=config.seed)
    count = len(samples) // 4 if method == "adapt" else len(samples)
    train_method(base, samples, method, stages, None, train, folder, rounds=task.rounds,
                 max_samples=count)
    return [load_stage(folder / n, base) for n in names]


def run_task(base, task_name: str, world: Path, config: DemoConfig, out: Path) -> dict:
    from fthss.evaluation.evaluate import evaluate
    from fthss.layout.chain import load_chains
    from fthss.retrieval.bm25 import BM25Retriever
    from fthss.tasks import get_task

    task = get_task(task_name)
    data = world / "tasks" / task_name
    samples = load_chains(data / "train.jsonl")[: config.train_samples]
    records = task.records(data / "test.jsonl")[: config.test_records]
    folder = out / "stages" / task_name
    stage_sets = {}
    for method in ("single", "distill", "chain", "fthss"):
        print(f"[demo] {task_name}: training {method}")
        stage_sets[method] = train_stages(base, task, samples, method, config, folder / method)
    print(f"[demo] {task_name}: training adapt (FTHSS tuning of the chain stages on a subset)")
    stage_sets["adapt"] = train_stages(base, task, samples, "adapt", config, folder / "adapt",
                                       start_from=stage_sets["chain"])
    retriever = BM25Retriever.from_file(world / "corpus.jsonl")
    print(f"[demo] {task_name}: evaluating {len(records)} test questions")
    return evaluate(base, task, records, stage_sets, retriever, gold_upstream=True,
                    batch_size=config.batch_size, progress=True,
                    max_new_tokens=config.max_new_tokens)


def run_demo(config: DemoConfig, out: str | Path, device: str | None = None) -> dict:
    from fthss.benchmarks.chains import kv_memory, stage_b_latency
    from fthss.evaluation.report import write_report
    from fthss.tasks import TASKS

    out, started = Path(out), time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out.mkdir(parents=True, exist_ok=True)
    _check_same_config(config, out / "demo_config.json")
    world, base = prepare(config, out, device)
    reports, timings = [], {}
    for task_name in TASKS:
        task_started = time.perf_counter()
        reports.append(run_task(base, task_name, world, config, out))
        timings[task_name] = time.perf_counter() - task_started
        write_report(reports, out, {"task_wall_s": timings})  # so far, should the run stop
    print("[demo] measuring stage-B latency and KV memory (text vs shared)")
    latency = stage_b_latency(base, list(config.latency_lengths))
    memory = kv_memory(base, [1, 2, 3], config.memory_total_tokens)
    extra = {"config": asdict(config), "device": str(base.device), "torch": torch.__version__,
             "latency": latency, "memory": memory, "task_wall_s": timings,
             "wall_s": time.perf_counter() - started}
    write_report(reports, out, extra)
    return extra


def _check_same_config(config: DemoConfig, path: Path) -> None:
    """Stages in a folder are reused on a rerun: they must come from the same configuration."""
    current = json.loads(json.dumps(asdict(config)))
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}: not valid JSON ({error}); delete it or choose another "
                             "--out") from None
        differing = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        if differing:
            raise ConfigError(f"{path.parent} holds a demo run with other settings "
                             f"({', '.join(differing)}); choose another --out or delete it")
    atomic_write_text(path, json.dumps(current, indent=2))

