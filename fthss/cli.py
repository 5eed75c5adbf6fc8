"""The `fthss` command line: the `demo`, `train` stages, `run` chains over a JSONL file, `eval`
methods on a task, `verify` a model family, build the `world`, pretrain its `base` and select
one of several draws, `stage` tools, `bench` speed and memory, `serve` chains over HTTP."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch

from fthss.errors import ConfigError, EmptyDataError, FthssError, OutputExistsError
from fthss.options import (
    add_base_arguments,
    add_device_argument,
    add_skip_bad,
    add_stage_argument,
    load_base,
    load_stages,
    positive_float,
    positive_int,
    print_skipped,
    skip_report,
)
from fthss.ranges import (
    COUNT,
    NON_NEGATIVE,
    NON_NEGATIVE_FLOAT,
    POSITIVE,
    PROBABILITY,
    SEED,
    SHARE,
)


def _given_stages(request, where: str, names: set[str]):
    """The request, if every step names one of the stages given (`--stage`)."""
    from fthss.layout.chain import ChainFormatError

    for k, step in enumerate(request.steps):
        if step.stage not in names:
            raise ChainFormatError(f"{where}: steps[{k}].stage: no stage '{step.stage}' was "
                                   f"given (--stage folders hold {sorted(names)})")
    return request


def cmd_verify(args) -> int:
    from fthss.verify import verify

    base = load_base(args)
    tolerance = (args.tol if args.tol is not None
                 else 1e-4 if base.dtype == torch.float32 else 5e-2)
    report = verify(base, chains=args.chains, seed=args.seed, batch_size=args.batch_size)
    name = args.arch or args.base
    print(f"{name} ({type(base.model).__name__}, {str(base.dtype).removeprefix('torch.')}, "
          f"{report.chains} random chains)")
    print("  shared incremental vs one-pass masked forward: max |dlogit| = "
          f"{report.shared_vs_one_pass:.3g}")
    print("  text modes vs plain forward of the text:       max |dlogit| = "
          f"{report.text_vs_plain:.3g}")
    print("  padded batch vs alone:                         max |dlogit| = "
          f"{report.batch_vs_alone:.3g}")
    print(f"  greedy outputs identical alone and in a batch: {report.greedy_outputs_match}")
    worst = max(report.shared_vs_one_pass, report.text_vs_plain, report.batch_vs_alone)
    ok = worst <= tolerance and report.greedy_outputs_match
    print(f"{'PASS' if ok else 'FAIL'}: largest difference {worst:.3g} (tolerance {tolerance:g})")
    print(json.dumps({"model": name, "tolerance": tolerance, "pass": ok, **vars(report)}))
    return 0 if ok else 1


def output_file(path: str, option: str, *inputs: str) -> Path:
    """The file an option names for output, refused before any work where it cannot be one:
    empty, an existing folder, or one of the command's inputs."""
    if not path:
        raise ConfigError(f"{option}: empty; name a file")
    out = Path(path)
    if out.is_dir():
        raise ConfigError(f"{option} {path}: is a folder; name a file")
    for given in inputs:
        if Path(given).exists() and out.resolve() == Path(given).resolve():
            raise ConfigError(f"{option} {path}: is the input; writing it would destroy it")
    return out


def output_folder(path: str, option: str) -> Path:
    """The folder an option names for output, created; refused where it cannot be one."""
    if not path:
        raise ConfigError(f"{option}: empty; name a folder")
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{option} {path}: is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)  # under a file, or read-only: an OSError naming it
    return out


def cmd_run(args) -> int:
    from fthss.atomic import PartialFile
    from fthss.datafiles import parse_each
    from fthss.engine.engine import ChainEngine
    from fthss.engine.sampling import SamplingConfig
    from fthss.layout.chain import ChainFormatError, check_request, load_chains

    output = output_file(args.output, "--output", args.input)
    base = load_base(args)
    stages = load_stages(args.stage, base)
    skips = skip_report(args)
    names = {s.name for s in stages}

    def runnable(request, where):
        check_request(_given_stages(request, where, names), base.vocab_size, where)
        return request

    requests = parse_each(((r.source, r) for r in load_chains(args.input, skips)), runnable,
                          ChainFormatError, skips)
    # the last step's output in the file is the gold answer, written beside the result
    golds = [request.steps[-1].output for request in requests]
    if not args.given_outputs:  # gold outputs in the file are for scoring, not for forcing
        for request in requests:
            for step in request.steps:
                step.output = None
    engine = ChainEngine(base, stages, max_new_tokens=args.max_new_tokens,
                         batch_size=args.batch_size, max_request_tokens=args.max_request_tokens)
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p, args.seed)
    with PartialFile(output) as written:

        answers = iter(golds)  # results come in request order

        def write(done):  # each batch's results on disk as soon as they are done
            written.write("".join(json.dumps({**r.to_json(), **_gold(next(answers))}) + "\n"
                                  for r in done))

        try:
            results = engine.run(requests, args.mode, sampling, progress=True, on_results=write)
            written.commit()
        except BaseException:  # a full disk, a bad stage found late, Ctrl-C: say what is kept
            if written.partial.is_file() and written.partial.stat().st_size:
                print(f"fthss run: the results finished so far are in {written.partial}",
                      file=sys.stderr)
            raise
    decoded = sum(s.stats.decoded_tokens for r in results for s in r.steps)
    failed = [(q, r) for q, r in zip(requests, results, strict=True) if r.error]
    for request, result in failed:
        print(f"{request.source}: request {result.id}: {result.error}", file=sys.stderr)
    print_skipped(args, skips)
    print(f"{len(results)} chains ({args.mode} mode), {decoded} tokens decoded, {len(failed)} "
          f"failed{f', {skips.skipped} skipped' if skips else ''} -> {args.output}")
    return 0


def _gold(answer: str | None) -> dict:
    """The result's `gold` field, when the request's file holds the answer."""
    return {} if answer is None else {"gold": answer}


def cmd_train(args) -> int:
    from fthss.layout.chain import load_chains
    from fthss.prompts.stage import Stage
    from fthss.training.config import TrainConfig
    from fthss.training.methods import method_view
    from fthss.training.run import train_method

    output_folder(args.out, "--out")
    base = load_base(args)
    skips = skip_report(args)
    samples = [s for path in args.data for s in load_chains(path, skips)]
    stages = {s.name: s for s in load_stages(args.stage or [], base)}
    used = dict.fromkeys(st.stage for s in samples[: args.max_samples]
                         for st in method_view(args.method, s).steps)
    for i, name in enumerate(n for n in used if n not in stages):
        if args.method == "adapt":
            raise ConfigError(f"adapt starts from trained stages: pass --stage DIR for '{name}'")
        stages[name] = Stage.create(_stage_config(args, name), base, seed=args.seed + i)
    config = TrainConfig(**{f.name: getattr(args, f.name)
                            for f in dataclasses.fields(TrainConfig)})
    results = train_method(base, samples, args.method, list(stages.values()), args.train,
                           config, args.out, rounds=args.rounds, max_samples=args.max_samples,
                           on_bad=skips, extend=args.extend)
    print_skipped(args, skips)
    if int(os.environ.get("RANK", "0")) != 0:  # under DDP, the main process alone reports
        return 0
    for r in results:
        print(f"trained {'+'.join(r.trained)}: {r.steps} steps, loss {r.first_loss:.4f} -> "
              f"{r.final_loss:.4f}, {r.tokens_per_s:.0f} tokens/s; stages in {args.out}, "
              f"log and loss curve in {r.work_dir}")
    return 0


def cmd_eval(args) -> int:
    from fthss.evaluation.evaluate import RUNS, evaluate
    from fthss.evaluation.report import REPORT_FILES, write_report
    from fthss.prompts.stage import load_stage
    from fthss.tasks import get_task

    out = output_folder(args.out, "--out")
    older = [name for name in REPORT_FILES if (out / name).exists()]
    if older and not args.overwrite:
        raise OutputExistsError(f"--out {out}: holds an older report ({', '.join(older)}); "
                                "pass --overwrite to replace it, or choose another folder")
    task = get_task(args.task)
    skips = skip_report(args)
    records = task.records(args.data, skips)[: args.max_records]
    if not records:
        why = ("--max-records 0" if args.max_records == 0 else
               "every record was skipped" if skips and skips.skipped else "it holds no record")
        raise EmptyDataError(f"{args.data}: nothing to evaluate ({why})")
    base = load_base(args)
    stage_sets = {}
    for spec in args.stages:
        method, _, folder = spec.partition("=")
        if method not in {trained for trained, _ in RUNS.values()} or not folder:
            raise ConfigError(f"--stages {spec!r}: expected METHOD=DIR with METHOD one of "
                             "single, distill, chain, fthss, adapt")
        if not Path(folder).is_dir():
            raise ConfigError(f"--stages {spec!r}: {folder} is not a folder (it holds one "
                              "folder per stage)")
        found = sorted(p for p in Path(folder).iterdir() if (p / "adapter_config.json").is_file())
        if not found:
            raise ConfigError(f"{folder}: no stage folders (with adapter_config.json) inside")
        stage_sets[method] = [load_stage(p, base) for p in found]
    retriever = None
    if args.corpus:
        from fthss.retrieval.bm25 import BM25Retriever

        retriever = BM25Retriever.from_file(args.corpus, skips)
    print_skipped(args, skips)
    results = evaluate(base, task, records, stage_sets, retriever, not args.no_gold_upstream,
                       args.batch_size, progress=True, max_new_tokens=args.max_new_tokens)
    write_report([results], out)
    print((out / "report.md").read_text())
    return 0


def cmd_world_build(args) -> int:
    from fthss.world.build import build

    manifest = build(args.out, seed=args.seed, renderings=args.renderings,
                     test_size=args.test_size, dev_size=args.dev_size, vocab_size=args.vocab_size)
    print(json.dumps(manifest, indent=2))
    return 0


def cmd_base_pretrain(args) -> int:
    from fthss.world.pretrain import PretrainConfig, pretrain

    config = PretrainConfig(**{f.name: getattr(args, f.name)
                               for f in dataclasses.fields(PretrainConfig)})
    recipe = pretrain(args.world, args.out, config, device=args.device,
                      save_every=args.save_every)
    print(f"base -> {args.out}: {recipe['parameters']:,} parameters, "
          f"{recipe['tokens_seen']:,} tokens, final loss {recipe['final_loss']:.3f}, "
          f"{recipe['tokens_seen'] / recipe['wall_s']:.0f} tokens/s on {recipe['device']}")
    return 0


def cmd_base_select(args) -> int:
    from fthss.world.select import select_base

    recipe = select_base(args.world, args.candidates, args.out, device=args.device)
    print(f"base -> {args.out}: {recipe['selection']['chosen']} (pretraining seed "
          f"{recipe['config']['seed']}), the lowest held-out loss of {len(args.candidates)}")
    return 0


def cmd_demo(args) -> int:
    from fthss.demo import DemoConfig, run_demo

    if args.quick:
        config = DemoConfig.quick(args.seed, args.base, args.shared_mode_base)
    elif args.shared_mode_base:
        config = DemoConfig.shared_mode_base(args.seed, args.base)
    else:
        config = DemoConfig(seed=args.seed, base=args.base)
    if args.test_records is not None:
        config = dataclasses.replace(config, test_records=args.test_records)
    if args.train_samples is not None:
        config = dataclasses.replace(config, train_samples=args.train_samples)
    if args.lora_epochs is not None:
        config = dataclasses.replace(config, **_lora_epochs(args.lora_epochs))
    if args.tasks is not None:
        config = dataclasses.replace(config, tasks=tuple(dict.fromkeys(args.tasks)))
    summary = run_demo(config, args.out, device=args.device)
    print((Path(args.out) / "report.md").read_text())
    print(f"[demo] done in {summary['wall_s'] / 60:.1f} min: {args.out}/report.md")
    return 0


def _task_epochs(text: str) -> tuple[str | None, float]:
    """An argparse type for `--lora-epochs` items: `N` (every task) or `TASK=N` (one task)."""
    from fthss.tasks import TASKS

    task_name, is_task, number = text.rpartition("=")
    if is_task and task_name not in TASKS:
        raise argparse.ArgumentTypeError(f"{task_name!r} in {text!r} is not a task; the tasks "
                                         f"are {', '.join(TASKS)}")
    return task_name or None, positive_float(number)


def _lora_epochs(items: list[tuple[str | None, float]]) -> dict:
    """The DemoConfig fields `--lora-epochs N TASK=N ...` sets: at most one plain N, each task
    at most once."""
    plain = [epochs for task_name, epochs in items if task_name is None]
    named = [task_name for task_name, _ in items if task_name is not None]
    if len(plain) > 1:
        raise ConfigError(f"--lora-epochs: one plain number (every task), not {len(plain)}")
    if len(set(named)) < len(named):
        twice = sorted({t for t in named if named.count(t) > 1})
        raise ConfigError(f"--lora-epochs: {', '.join(twice)} given more than once")
    fields = {"lora_task_epochs": {t: e for t, e in items if t is not None}}
    if plain:
        fields["lora_epochs"] = plain[0]
    return fields


def cmd_stage_create(args) -> int:
    from fthss.prompts.stage import Stage

    out = output_folder(args.out, "--out")
    if any(out.iterdir()) and not args.overwrite:  # its files would be replaced one by one
        raise OutputExistsError(f"--out {out}: is not empty; pass --overwrite to replace the "
                                "stage there, or choose another folder")
    base = load_base(args)
    config = _stage_config(args, args.name)
    Stage.create(config, base, seed=args.seed).save_pretrained(args.out, base)
    lora = (f", LoRA r={config.lora_rank} on {','.join(config.lora_targets)}"
            if config.kind == "lora" else "")
    print(f"stage {args.name} ({args.kind}, {config.num_virtual_tokens} virtual tokens{lora}) "
          f"-> {args.out}")
    return 0


def _stage_config(args, name: str):
    """The StageConfig of a new stage named `name`, from the options `_add_stage_arguments`
    adds."""
    from fthss.prompts.stage import StageConfig

    tokens = args.tokens if args.tokens is not None else 0 if args.kind == "lora" else 100
    return StageConfig(name, args.kind, tokens, args.init, args.init_text,
                       lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                       lora_targets=tuple(args.lora_targets))


def _add_stage_arguments(parser: argparse.ArgumentParser) -> None:
    """What a new stage is: kind, soft prompt, and for the lora kind its deltas."""
    from fthss.models.lora import LORA_TARGETS
    from fthss.prompts.stage import INITS, KINDS

    parser.add_argument("--kind", choices=KINDS, default="prompt",
                        help="prompt (soft prompt), prefix (K/V per layer), or lora (low-rank "
                        "deltas on the tokens the stage owns, plus an optional soft prompt)")
    parser.add_argument("--tokens", type=NON_NEGATIVE.arg, default=None,
                        help="virtual tokens (default: 100; 0 for --kind lora)")
    parser.add_argument("--init", choices=INITS, default="random",
                        help="how a new prompt starts")
    parser.add_argument("--init-text", default=None, help="the text of --init text")
    parser.add_argument("--lora-rank", type=COUNT.arg, default=16, help="lora stages: rank r")
    parser.add_argument("--lora-alpha", type=POSITIVE.arg, default=32.0,
                        help="lora stages: the deltas are scaled by alpha / r")
    parser.add_argument("--lora-targets", nargs="+", choices=LORA_TARGETS, default=LORA_TARGETS,
                        metavar="MODULE", help="lora stages: the linear layers adapted "
                        f"(default: all of {' '.join(LORA_TARGETS)})")


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless it has none worth saying (None, off)
    or the help already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or "default" in text
                or action.default in (None, False, argparse.SUPPRESS)):
            return action.help
        return f"{text} (default: %(default)s)".lstrip()


class _Parser(argparse.ArgumentParser):
    """fthss's parsers, the subcommands' included (argparse makes those of the parent's class):
    help with defaults."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    from fthss import __version__
    from fthss.engine.engine import MODES
    from fthss.tasks import TASKS
    from fthss.training.methods import METHODS
    from fthss.training.run import ROUNDS

    parser = _Parser(prog="fthss", description=__doc__)
    parser.add_argument("--version", action="version",
                        version=f"fthss {__version__} (torch {torch.__version__})")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="the whole method on the embedded default: world, "
                               "base, every method on the four tasks, evaluation, report")
    demo.add_argument("--quick", action="store_true", help="a smoke run (a few minutes)")
    demo.add_argument("--seed", type=SEED.arg, default=0, help="the world's seed")
    demo.add_argument("--out", default="runs/demo", help="folder for the world, stages, report")
    demo.add_argument("--base", default=None, help="a base pretrained on this seed's world "
                      "(`fthss base pretrain`), instead of the embedded one")
    demo.add_argument("--shared-mode-base", action="store_true",
                      help="the bases whose second pretraining phase ran in shared mode "
                      "(docs/experiments.md) instead of the text-only ones")
    demo.add_argument("--test-records", type=positive_int, default=None,
                      help="test questions per task (default: 500, --quick 48; 1000 for the "
                      "intervals of docs/experiments.md, about 10 min more)")
    demo.add_argument("--train-samples", type=positive_int, default=None,
                      help="train chains per task and method, the first N of the task's split "
                      "(default 1,024; --quick 64; 2,048 made FTHSS's compressor as reliable as "
                      "the chain's over three training seeds on world 1's compress_qa, at twice "
                      "the training time: exp32)")
    demo.add_argument("--lora-epochs", type=_task_epochs, nargs="+", default=None,
                      metavar="N|TASK=N",
                      help="epochs of every lora-kind method, for every task (N) or one task "
                      "(TASK=N) (default 1; 2 brings FTHSS within 2 points of the chain on more "
                      "cells and takes about 8 min more: exp28, exp29; memory_reasoning=8 closes "
                      "its gap on the bases where 2 do not: exp31)")
    demo.add_argument("--tasks", nargs="+", choices=list(TASKS), default=None,
                      help="run only these tasks (default: all four); a task's figures are the "
                      "same as in the full demo")
    add_device_argument(demo)
    demo.set_defaults(func=cmd_demo)

    verify = commands.add_parser("verify", help="check shared-KV inference is exact on a model")
    add_base_arguments(verify)
    verify.add_argument("--chains", type=positive_int, default=16,
                        help="random chains to check")
    verify.add_argument("--batch-size", type=positive_int, default=4,
                        help="requests per batch (padding is part of what is checked)")
    verify.add_argument("--seed", type=SEED.arg, default=0, help="seed of the random stages "
                        "and chains")
    verify.add_argument("--tol", type=NON_NEGATIVE_FLOAT.arg, default=None,
                        help="largest logit difference allowed (default 1e-4 fp32, 5e-2 else)")
    verify.set_defaults(func=cmd_verify)

    run = commands.add_parser("run", help="run chain requests from a JSONL (or authors' JSON) file")
    add_base_arguments(run)
    add_stage_argument(run, True, "a stage folder (repeat for each stage)")
    run.add_argument("--input", required=True, help="requests: .jsonl (ours) or .json (authors')")
    run.add_argument("--output", required=True, help="results JSONL: texts and per-step stats")
    run.add_argument("--mode", choices=MODES, default="shared",
                     help="shared: one cache per request (FTHSS); text: the chain-of-models "
                     "baseline; text-cached: that baseline with a prefix cache per stage")
    run.add_argument("--given-outputs", action="store_true",
                     help="use outputs present in the input as given (teacher-forced) instead "
                     "of generating them")
    run.add_argument("--batch-size", type=positive_int, default=8, help="requests run together")
    run.add_argument("--max-request-tokens", type=positive_int, default=None,
                     help="K/V slots one request may hold; a request that needs more fails "
                     "alone (its error in the output), as one past the base's positions does")
    run.add_argument("--max-new-tokens", type=positive_int, default=64,
                     help="per-step limit unless the request sets max_new_tokens")
    run.add_argument("--temperature", type=NON_NEGATIVE_FLOAT.arg, default=0.0, help="0 = greedy")
    run.add_argument("--top-k", type=NON_NEGATIVE.arg, default=0,
                     help="sample from the k likeliest tokens (0: no cut)")
    run.add_argument("--top-p", type=PROBABILITY.arg, default=1.0, help="nucleus sampling mass")
    run.add_argument("--seed", type=SEED.arg, default=0,
                     help="sampling seed (each request's generator is keyed to it and the "
                     "request)")
    add_skip_bad(run)
    run.set_defaults(func=cmd_run)

    train = commands.add_parser("train", help="train stages (FTHSS or a baseline method)")
    add_base_arguments(train)
    train.add_argument("--method", choices=METHODS,
                       default="fthss",
                       help="what to train: fthss (stages reading each other's K/V), or a baseline "
                       "(docs/training.md)")
    train.add_argument("--rounds", choices=ROUNDS, default="multi",
                       help="fthss/adapt: 'single' trains stages one by one in chain order, "
                       "'multi' jointly")
    train.add_argument("--data", action="append", required=True, metavar="FILE",
                       help="training chains: .jsonl (ours) or .json (authors'); repeatable")
    add_stage_argument(train, False, "an existing stage: frozen upstream, or the start for "
                       "--train")
    train.add_argument("--train", nargs="+", metavar="NAME",
                       help="stages to train (default: every stage the chains use)")
    train.add_argument("--out", required=True, help="output folder (rerun to resume)")
    train.add_argument("--extend", action="store_true",
                       help="resume a run to more steps (a larger --max-steps or --epochs); any "
                       "other change of settings on rerun is refused")
    _add_stage_arguments(train)  # the stages created here
    from fthss.training.config import TrainConfig

    for option in dataclasses.fields(TrainConfig):  # one option per hyper-parameter
        flags = [f"--{option.name.replace('_', '-')}", *option.metadata["aliases"]]
        if option.type == "bool" or isinstance(option.default, bool):
            train.add_argument(*flags, dest=option.name, action="store_true",
                               help=option.metadata["help"])
        else:
            train.add_argument(*flags, dest=option.name, type=option.metadata["range"].arg,
                               default=option.default, help=option.metadata["help"])
    train.add_argument("--max-samples", type=NON_NEGATIVE.arg, default=None,
                       help="use the first N samples of --data")
    add_skip_bad(train)
    train.set_defaults(func=cmd_train)

    evaluate = commands.add_parser("eval", help="evaluate methods on a task and write a report")
    add_base_arguments(evaluate)
    evaluate.add_argument("--task", required=True,
                          choices=list(TASKS),
                          help="which task's records and metric")
    evaluate.add_argument("--data", required=True, help="task records (authors' JSON or JSONL)")
    evaluate.add_argument("--stages", action="append", required=True, metavar="METHOD=DIR",
                          help="stages trained by METHOD (single, distill, chain, fthss, adapt), "
                          "one folder per stage inside DIR; repeatable")
    evaluate.add_argument("--corpus", help="retrieval corpus JSONL (rewrite_qa, active_rag)")
    evaluate.add_argument("--out", default="runs/eval", help="report folder")
    evaluate.add_argument("--overwrite", action="store_true",
                          help="replace an older report in --out (its files removed first)")
    evaluate.add_argument("--max-records", type=NON_NEGATIVE.arg, default=None,
                          help="evaluate the first N records")
    evaluate.add_argument("--batch-size", type=COUNT.arg, default=16,
                          help="requests run together")
    evaluate.add_argument("--max-new-tokens", type=COUNT.arg, default=None,
                          help="cap every step's generation (the tasks' own limits otherwise)")
    evaluate.add_argument("--no-gold-upstream", action="store_true",
                          help="skip the gold-intermediate ablation")
    add_skip_bad(evaluate)
    evaluate.set_defaults(func=cmd_eval)

    world = commands.add_parser("world", help="the synthetic world (offline data for the demo)")
    world_commands = world.add_subparsers(dest="world_command", required=True)
    build = world_commands.add_parser("build", help="generate world, corpus, tasks, tokenizer")
    build.add_argument("--out", default="runs/world", help="folder for the world")
    build.add_argument("--seed", type=SEED.arg, default=0, help="the world's seed")
    build.add_argument("--renderings", type=COUNT.arg, default=8,
                       help="pretraining renderings of each entity's facts")
    build.add_argument("--test-size", type=COUNT.arg, default=1000,
                       help="test questions per task")
    build.add_argument("--dev-size", type=COUNT.arg, default=200,
                       help="dev questions per task")
    build.add_argument("--vocab-size", type=COUNT.arg, default=2048,
                       help="BPE vocabulary size of the world's tokenizer")
    build.set_defaults(func=cmd_world_build)

    base_parser = commands.add_parser("base", help="the demo's small base model")
    base_commands = base_parser.add_subparsers(dest="base_command", required=True)
    pre = base_commands.add_parser("pretrain", help="pretrain a small Llama on a built world")
    pre.add_argument("--world", default="runs/world", help="folder from `fthss world build`")
    pre.add_argument("--out", default="runs/base", help="folder for the base")
    add_device_argument(pre)
    from fthss.world.pretrain import PretrainConfig

    ranges = {"seed": SEED, "warmup_steps": NON_NEGATIVE, "learning_rate": POSITIVE,
              "weight_decay": NON_NEGATIVE_FLOAT}
    for field in dataclasses.fields(PretrainConfig):  # one option per recipe field
        kind = type(field.default)
        parse = (ranges[field.name].arg if field.name in ranges else COUNT.arg if kind is int
                 else SHARE.arg if field.name.endswith("_share") else kind)
        pre.add_argument(f"--{field.name.replace('_', '-')}", type=parse, default=field.default,
                         help=f"the recipe's {field.name.replace('_', ' ')} (PretrainConfig)")
    pre.add_argument("--save-every", type=NON_NEGATIVE.arg, default=100,
                     help="checkpoint every K steps into OUT (0: never); rerunning the same "
                     "command resumes from the last one")
    pre.set_defaults(func=cmd_base_pretrain)
    select = base_commands.add_parser(
        "select", help="keep the pretraining draw with the lowest loss on the world's dev splits")
    select.add_argument("candidates", nargs="+", help="bases of this world (`fthss base pretrain`)")
    select.add_argument("--world", default="runs/world", help="folder from `fthss world build`")
    select.add_argument("--out", required=True, help="where the chosen base is copied")
    add_device_argument(select)
    select.set_defaults(func=cmd_base_select)

    stage = commands.add_parser("stage", help="stage tools")
    stage_commands = stage.add_subparsers(dest="stage_command", required=True)
    create = stage_commands.add_parser("create", help="initialise an untrained stage")
    add_base_arguments(create)
    create.add_argument("--name", required=True, help="the stage's name (a chain's steps use it)")
    _add_stage_arguments(create)
    create.add_argument("--seed", type=SEED.arg, default=0, help="initialisation seed")
    create.add_argument("--out", required=True, help="folder for the stage")
    create.add_argument("--overwrite", action="store_true",
                        help="replace the stage in a folder that holds one")
    create.set_defaults(func=cmd_stage_create)

    from fthss.benchmarks.commands import add_bench_commands
    from fthss.serve.command import add_serve_command

    add_bench_commands(commands)
    add_serve_command(commands)
    return parser


def describe_os_error(err: OSError) -> str:
    """`PATH: REASON` (both paths of a failed rename), as the user needs it: which file, and
    what the system said (permission denied, no space left on device, ...)."""
    paths = [str(p) for p in (err.filename, err.filename2) if p is not None]
    reason = err.strerror or str(err)
    return f"{' -> '.join(paths)}: {reason}" if paths else reason


def main(argv: list[str] | None = None) -> int:
    """Run one command. A user's error (`FthssError`: a bad file, option or folder) exits 2 and
    a failing file system (`OSError`: permissions, a full disk) exits 1, each as one line
    `fthss CMD: error: ...`; anything else is a bug and keeps its traceback."""
    for stream in (sys.stdout, sys.stderr):
        # a file name or option that is not valid Unicode must not turn the message about it
        # into a UnicodeEncodeError
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded by `fthss bench`
    try:
        return args.func(args)
    except FthssError as err:
        print(f"fthss {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"fthss {args.command}: error: {describe_os_error(err)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
