"""Command-line options and loaders shared by every fthss command (`fthss.cli`, `fthss bench`,
`fthss serve`): the base model and device, stage folders, --skip-bad. One module, imported by
each command module, so none of them imports another."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from fthss.errors import ConfigError
from fthss.ranges import COUNT, POSITIVE

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
positive_int, positive_float = COUNT.arg, POSITIVE.arg  # the argparse types most options take


def skip_report(args):
    """`--skip-bad`: bad records are reported and counted (`fthss.datafiles.SkipReport`)."""
    from fthss.datafiles import SkipReport

    return SkipReport() if args.skip_bad else None


def print_skipped(args, skips) -> None:
    if skips is not None and skips.skipped:
        print(f"fthss {args.command}: skipped {skips.skipped} bad record(s), listed above",
              file=sys.stderr)


def add_stage_argument(parser: argparse.ArgumentParser, required: bool, help: str) -> None:
    """`--stage [NAME=]DIR`, repeatable: a stage folder, optionally bound to the step name NAME
    (a PEFT adapter, or a stage trained under another name, runs as NAME without copying)."""
    parser.add_argument("--stage", action="append", required=required, metavar="[NAME=]DIR",
                        help=f"{help}; NAME= runs the folder's stage under that step name")


def stage_source(text: str) -> tuple[str | None, str]:
    """A `--stage` value as (NAME or None, DIR). `NAME=DIR` only when NAME is a stage name and
    the whole text is not itself an existing path (a folder may have '=' in its name)."""
    from fthss.layout.chain import is_stage_name

    name, sep, path = text.partition("=")
    if sep and is_stage_name(name) and not Path(text).exists():
        return name, path
    return None, text


def load_stages(sources, base) -> list:
    """The stages of `--stage` values (`[NAME=]DIR`); two with one name would silently shadow
    each other, so refuse them."""
    from fthss.prompts.stage import load_stage

    stages, seen = [], {}
    for source in sources:
        name, path = stage_source(source)
        stage = load_stage(path, base, name=name)
        if stage.name in seen:
            raise ConfigError(f"stages {seen[stage.name]} and {source} are both named "
                              f"'{stage.name}'")
        seen[stage.name] = source
        stages.append(stage)
    return stages


def device_arg(text: str) -> str:
    """An argparse `type` for --device: a device this torch can use, else a clear error (not
    an AssertionError from deep inside torch at the first tensor moved)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(
            f"not a device: {text!r} (cpu, cuda, cuda:1, mps, ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(
                f"{text}: this torch ({torch.__version__}) sees no CUDA device (a CPU-only "
                "build, or no GPU here); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"{text}: there are {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text}: MPS is not available in this torch")
    return text


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", type=device_arg, default=None,
                        help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")


def add_base_arguments(parser: argparse.ArgumentParser) -> None:
    from fthss.models.presets import PRESETS

    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--base", help="a Hugging Face model folder, or a hub id already in the "
                        "local Hugging Face cache (nothing is downloaded)")
    source.add_argument("--arch", choices=PRESETS, help="random-init architecture preset")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="weights dtype (default: the checkpoint's; float32 for --arch)")
    add_device_argument(parser)
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow the model directory's own Python code to run")


def add_skip_bad(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip bad records (reported on stderr with file:line and reason, "
                        "and counted) instead of stopping at the first")


def load_base(args):
    from fthss.models.base import BaseModel
    from fthss.models.presets import preset_base

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype] if args.dtype else None
    if args.arch:
        return preset_base(args.arch, dtype=dtype or torch.float32, device=device)
    return BaseModel.load(args.base, dtype=dtype, device=device,
                          trust_remote_code=args.trust_remote_code)
