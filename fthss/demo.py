"""`fthss demo`: the whole paper on a laptop. Builds the synthetic world, takes the embedded
base (or pretrains one), trains every method on the four tasks with each stage kind (`prompt`
and `lora`), evaluates them on the test splits, measures stage-B latency and KV memory, and
writes one report.

The embedded bases are pretrained as any LM is (documents and instruction data, text mode
only): untuned shared mode reads nothing on them, so what FTHSS − untuned shows is what FTHSS
tuning teaches (the paper's Fig. 4). `--shared-mode-base` takes the bases whose second
pretraining phase ran instruction windows in shared mode instead (docs/experiments.md).

Everything lands under `--out` (default `runs/demo`): world/,
stages/<task>/<kind>/<method>/<stage>/, report.md, report.json, predictions.jsonl and the plots.
Trained stages already in the folder are reused, so an interrupted demo picks up where it stopped
(the trainer resumes from its checkpoints too).
`--quick` is the smoke run CI executes: the same pipeline on a few records and steps.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from fthss.atomic import atomic_write_text
from fthss.errors import ConfigError
from fthss.ranges import COUNT, POSITIVE
from fthss.tasks import TASKS

ASSETS = Path(__file__).parent / "assets"
# every kind trains single, chain and fthss (fthss-untuned runs the chain's stages); distill and
# adapt, the paper's other rows, run for one kind (`DemoConfig.every_method_kind`): the budget
KIND_METHODS = ("single", "chain", "fthss")
EXTRA_METHODS = ("distill", "adapt")


@dataclass
class DemoConfig:
    seed: int = 0  # the world's
    train_seed: int | None = None  # stage initialisation and data order (default: `seed`)
    # the tasks run, in this order; each task seeds its stages and data order afresh, so one
    # task alone reproduces its rows of the full demo (tests/test_demo.py)
    tasks: tuple[str, ...] = tuple(TASKS)
    # per task: 500 keeps `fthss demo` within 30 min on a 2-core CPU (evaluation is over half
    # of it); `--test-records 1000` for narrower intervals (docs/experiments.md's runs)
    test_records: int = 500
    train_samples: int = 1024  # per task and method (adapt: a quarter, as the paper's subset)
    epochs: float = 1.0  # prompt kind
    # lora kind: 2 epochs bring FTHSS within 2 points of the chain on more cells, but take the
    # demo past its 30-min budget (exp28, exp29: `fthss demo --lora-epochs 2`)
    lora_epochs: float = 1.0
    # lora kind, per task, instead of `lora_epochs`: a task with fewer train chains gets fewer
    # updates per epoch (memory_reasoning has 600; its recaller needs 8 epochs on some bases,
    # exp31: `--lora-epochs 2 memory_reasoning=8`)
    lora_task_epochs: dict[str, float] = field(default_factory=dict)
    micro_batch_size: int = 16
    # single-round FTHSS (and adapt) trains one stage per phase where the chain trains all in one:
    # dividing the micro-batch by the number of stages gives each stage the chain's number of
    # updates, each of as many of its own sequences
    equal_stage_updates: bool = True
    kinds: tuple[str, ...] = ("prompt", "lora")
    every_method_kind: str | None = "lora"  # the kind that also trains distill and adapt, if any
    learning_rate: float = 3e-2  # soft prompts
    prompt_tokens: int = 8  # prompt kind
    prompt_init: str = "vocab"
    lora_rank: int = 8  # lora kind: deltas on all seven projections, no soft prompt
    lora_alpha: float = 16.0
    lora_learning_rate: float = 2e-3
    batch_size: int = 128  # generation
    max_new_tokens: int | None = None  # cap on every step's generation (the tasks set their own)
    latency_lengths: tuple[int, ...] = (250, 500, 1000, 1500)
    memory_total_tokens: int = 1000
    pretrain_steps: int = 1000  # only when no embedded base matches the world
    # > 0: a second pretraining phase of that many steps, mostly in shared mode
    # (PretrainConfig.shared_mode_after); 0: text mode only, as any LM is pretrained
    shared_mode_steps: int = 0
    pretrain_draws: int = 1  # pretraining seeds 0..n-1, the lowest dev loss kept (world/select.py)
    base: str | None = None  # a base pretrained on this world, instead of the embedded one

    @classmethod
    def quick(cls, seed: int = 0, base: str | None = None, shared_mode_base: bool = False
              ) -> DemoConfig:
        return cls(seed=seed, base=base, test_records=48, train_samples=64, max_new_tokens=32,
                   latency_lengths=(100, 400), memory_total_tokens=120, pretrain_steps=40,
                   shared_mode_steps=10 if shared_mode_base else 0, pretrain_draws=1)

    @classmethod
    def shared_mode_base(cls, seed: int = 0, base: str | None = None) -> DemoConfig:
        """The text recipe continued for 667 steps mostly in shared mode, the lowest dev loss
        of three draws: the bases whose shared-mode exposure, not FTHSS tuning, does the
        reading (docs/experiments.md)."""
        return cls(seed=seed, base=base, shared_mode_steps=667, pretrain_draws=3)

    def __post_init__(self):
        self.kinds, self.tasks = tuple(self.kinds), tuple(self.tasks)
        unknown_tasks = [t for t in self.tasks if t not in TASKS]
        if unknown_tasks or not self.tasks or len(set(self.tasks)) < len(self.tasks):
            raise ConfigError(f"demo tasks must be distinct ones of {', '.join(TASKS)}, not "
                              f"{', '.join(unknown_tasks or self.tasks) or 'none'}")
        # counts slice the splits: a negative one would silently drop chains from the end
        for name in ("test_records", "train_samples"):
            COUNT.check(getattr(self, name), name)
        for name in ("epochs", "lora_epochs"):
            POSITIVE.check(getattr(self, name), name)
        self.lora_task_epochs = dict(self.lora_task_epochs)
        for task_name, epochs in self.lora_task_epochs.items():
            if task_name not in TASKS:
                raise ConfigError(f"lora_task_epochs: {task_name!r} is not a task; the tasks are "
                                  f"{', '.join(TASKS)}")
            POSITIVE.check(epochs, f"lora_task_epochs[{task_name!r}]")
        unknown = [k for k in self.kinds if k not in ("prompt", "lora")]
        if unknown or not self.kinds:
            raise ConfigError(f"demo kinds must be some of prompt, lora, not {unknown or 'none'}")
        if self.every_method_kind is not None and self.every_method_kind not in self.kinds:
            raise ConfigError(f"every_method_kind {self.every_method_kind!r} is not one of the "
                              f"kinds {self.kinds}")

    @property
    def stage_seed(self) -> int:
        """The seed of the stages' initialisation and training data order."""
        return self.seed if self.train_seed is None else self.train_seed

    def training_epochs(self, task_name: str, kind: str) -> float:
        """The epochs every method trains `kind` stages for on `task_name`."""
        if kind == "lora":
            return self.lora_task_epochs.get(task_name, self.lora_epochs)
        return self.epochs

    def methods(self, kind: str) -> tuple[str, ...]:
        """The training methods the demo runs with stages of `kind`, in training order (adapt
        starts from the chain's stages)."""
        return KIND_METHODS + (EXTRA_METHODS if kind == self.every_method_kind else ())

    def stage_config(self, name: str, kind: str):
        """The `StageConfig` of a new stage `name` of `kind`, as the demo trains it."""
        from fthss.prompts.stage import StageConfig

        if kind == "lora":
            return StageConfig(name, "lora", 0, lora_rank=self.lora_rank,
                               lora_alpha=self.lora_alpha)
        return StageConfig(name, "prompt", self.prompt_tokens, self.prompt_init)


def embedded_base(world_manifest: dict, shared_mode: bool = False) -> Path | None:
    """The committed base pretrained on exactly this world, if there is one: the text-only
    recipe's, or with `shared_mode` the one whose second phase ran in shared mode."""
    for recipe_path in sorted(ASSETS.glob("*/recipe.json")):
        recipe = json.loads(recipe_path.read_text())
        config = recipe["config"]
        if (recipe["world"] == world_manifest
                and (config.get("hole_share", 0) + config.get("mask_share", 0) > 0) == shared_mode):
            return recipe_path.parent
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
    base_dir = (Path(config.base) if config.base
                else embedded_base(manifest, config.shared_mode_steps > 0))
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
    """The committed bases' recipe for a world without one: `pretrain_draws` draws (seeds 0,
    1, ...) of the text-mode pretraining, each continued in shared mode when
    `shared_mode_steps` > 0, the one with the lowest dev loss copied to `base_dir`. Draws already
    in the folder are reused."""
    from fthss.world.pretrain import PretrainConfig, PretrainData, pretrain
    from fthss.world.select import select_base

    phases = f"{config.pretrain_steps}" + (f" + {config.shared_mode_steps}"
                                           if config.shared_mode_steps else "")
    print(f"[demo] no embedded base for world seed {config.seed}: pretraining "
          f"{config.pretrain_draws} draw(s) of {phases} steps (~90 min per 1,000 on a 2-core "
          "CPU), keeping the one with the lowest dev loss")
    data, draws = PretrainData(world), []
    for seed in range(config.pretrain_draws):
        first = base_dir.parent / "base-draws" / f"seed-{seed}-first"
        draw = base_dir.parent / "base-draws" / f"seed-{seed}"
        if not (first / "recipe.json").is_file():
            pretrain(world, first, PretrainConfig(steps=config.pretrain_steps, seed=seed),
                     device=device, data=data)
        if not config.shared_mode_steps:
            draws.append(first)
            continue
        if not (draw / "recipe.json").is_file():
            pretrain(world, draw, PretrainConfig.shared_mode_after(
                first, config.shared_mode_steps, seed=seed), device=device, data=data)
        draws.append(draw)
    select_base(world, draws, base_dir, device=device)


def train_stages(base, task, samples, method: str, kind: str, config: DemoConfig, folder: Path,
                 start_from: list | None = None) -> list:
    """The method's trained stages of `kind`: loaded from `folder` if a previous run saved them
    all."""
    from fthss.prompts.stage import Stage, load_stage
    from fthss.training.config import TrainConfig
    from fthss.training.methods import method_view
    from fthss.training.run import train_method, trains_one_stage_per_phase

    names = list(dict.fromkeys(s.stage for x in samples for s in method_view(method, x).steps))
    if all((folder / n / "adapter_config.json").is_file() for n in names):
        return [load_stage(folder / n, base) for n in names]
    # adapt trains copies: the stages it starts from are evaluated as they are
    stages = [copy.deepcopy(s) for s in start_from] if start_from else [
        Stage.create(config.stage_config(n, kind), base, seed=config.stage_seed * 100 + i)
        for i, n in enumerate(names)]
    micro_batch = config.micro_batch_size
    if config.equal_stage_updates and trains_one_stage_per_phase(method, task.rounds):
        micro_batch = max(1, micro_batch // len(names))
    train = TrainConfig(learning_rate=config.learning_rate,
                        lora_learning_rate=config.lora_learning_rate,
                        epochs=config.training_epochs(task.name, kind),
                        micro_batch_size=micro_batch, grad_accumulation=1,
                        warmup_ratio=0.03, max_length=None, seed=config.stage_seed)
    count = len(samples) // 4 if method == "adapt" else len(samples)
    train_method(base, samples, method, stages, None, train, folder, rounds=task.rounds,
                 max_samples=count)
    return [load_stage(folder / n, base) for n in names]


def run_task(base, task_name: str, world: Path, config: DemoConfig, out: Path,
             timings: dict[str, float]) -> dict:
    """One task's report section: for each stage kind, its methods trained and evaluated on the
    same test records. `timings` gets the wall seconds of each phase ("task/kind/method" for a
    training, "task/kind/evaluate"), which is where the demo's budget goes."""
    from fthss.evaluation.evaluate import evaluate, merge_sections
    from fthss.layout.chain import load_chains
    from fthss.retrieval.bm25 import BM25Retriever
    from fthss.tasks import get_task

    task = get_task(task_name)
    data = world / "tasks" / task_name
    samples = load_chains(data / "train.jsonl")[: config.train_samples]
    records = task.records(data / "test.jsonl")[: config.test_records]
    retriever = BM25Retriever.from_file(world / "corpus.jsonl")
    sections = []
    for kind in config.kinds:
        folder = out / "stages" / task_name / kind
        stage_sets = {}
        for method in config.methods(kind):
            note = " (FTHSS tuning of the chain stages on a subset)" if method == "adapt" else ""
            print(f"[demo] {task_name}, {kind} stages: training {method}{note}")
            started = time.perf_counter()
            stage_sets[method] = train_stages(
                base, task, samples, method, kind, config, folder / method,
                start_from=stage_sets["chain"] if method == "adapt" else None)
            timings[f"{task_name}/{kind}/{method}"] = time.perf_counter() - started
        print(f"[demo] {task_name}, {kind} stages: evaluating {len(records)} test questions")
        started = time.perf_counter()
        sections.append(evaluate(base, task, records, stage_sets, retriever, gold_upstream=True,
                                 batch_size=config.batch_size, progress=True,
                                 max_new_tokens=config.max_new_tokens, kind=kind))
        timings[f"{task_name}/{kind}/evaluate"] = time.perf_counter() - started
    return merge_sections(sections)


def run_demo(config: DemoConfig, out: str | Path, device: str | None = None) -> dict:
    from fthss.benchmarks.chains import kv_memory, stage_b_latency
    from fthss.evaluation.report import write_report

    out, started = Path(out), time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out.mkdir(parents=True, exist_ok=True)
    _check_same_config(config, out / "demo_config.json")
    world, base = prepare(config, out, device)
    reports, timings, phases = [], {}, {}
    for task_name in config.tasks:
        task_started = time.perf_counter()
        reports.append(run_task(base, task_name, world, config, out, phases))
        timings[task_name] = time.perf_counter() - task_started
        # so far, should the run stop
        write_report(reports, out, {"task_wall_s": timings, "phase_wall_s": phases})
    print("[demo] measuring stage-B latency and KV memory (text vs shared)")
    latency = stage_b_latency(base, list(config.latency_lengths))
    memory = kv_memory(base, [1, 2, 3], config.memory_total_tokens)
    extra = {"config": asdict(config), "base": base.model.config.name_or_path,
             "device": str(base.device), "torch": torch.__version__,
             "latency": latency, "memory": memory, "task_wall_s": timings,
             "phase_wall_s": phases, "wall_s": time.perf_counter() - started}
    write_report(reports, out, extra)
    return extra


def _check_same_config(config: DemoConfig, path: Path) -> None:
    """Stages in a folder are reused on a rerun: they must come from the same configuration
    (the tasks may differ: each task's stages are its own)."""
    current = json.loads(json.dumps(asdict(config)))
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}: not valid JSON ({error}); delete it or choose another "
                             "--out") from None
        # a setting added since the folder's run had its default there
        defaults = json.loads(json.dumps(asdict(DemoConfig())))
        differing = sorted(k for k in set(saved) | set(current)
                           if k != "tasks" and saved.get(k, defaults.get(k)) != current.get(k))
        if differing:
            raise ConfigError(f"{path.parent} holds a demo run with other settings "
                             f"({', '.join(differing)}); choose another --out or delete it")
    atomic_write_text(path, json.dumps(current, indent=2))

