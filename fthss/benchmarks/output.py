"""What every `fthss bench` command records, prints and writes.

A record says where and how its figures were made: device, versions, dtype, model, date and the
exact command line. The command prints its tables, writes the record as JSON atomically, and
prints it again as the last line of stdout, for scripts.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import torch

from fthss.atomic import atomic_write_text
from fthss.models.base import BaseModel

Column = tuple[str, Callable[[dict], str]]  # header, the cell of a row


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")  # Linux names the CPU model only here
    if cpuinfo.is_file():
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                      if line.startswith("model name")), model)
    return f"{model}, {os.cpu_count()} cores"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def record(benchmark: str, argv: list[str], settings: dict, base: BaseModel) -> dict:
    """Where and how: `settings` are the command's options (the model's among them)."""
    return {"benchmark": benchmark, "command": shlex.join(["fthss", *argv]),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "device": str(base.device), "device_name": device_name(base.device),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": _version("transformers"), "peft": _version("peft"),
            "dtype": str(base.dtype).removeprefix("torch."),
            "parameters": sum(p.numel() for p in base.model.parameters()),
            "settings": settings}


def table(rows: list[dict], columns: list[Column]) -> str:
    cells = [[header for header, _ in columns]] + [[cell(r) for _, cell in columns] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True))
                     for line in cells)


def emit(result: dict, tables: list[str], out: str | Path, as_json: bool = False) -> None:
    """Write `result` to `out` atomically; print the tables and the path, or with `as_json`
    the record alone (for a pipe)."""
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    if as_json:
        print(json.dumps(result))
        return
    for text in tables:
        print(text + "\n")
    print(f"-> {out}")


@contextmanager
def profiled(out: str | Path | None, device: torch.device) -> Iterator[None]:
    """Run the block under `torch.profiler` when `out` (the record's path) is given: the
    operators with the most self time go to `OUT.profile.txt` and the whole trace to
    `OUT.trace.json.gz` (open it in Perfetto or chrome://tracing). Where the time goes when a
    figure misses its target."""
    if out is None:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        yield
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    stem = Path(out).with_suffix("")
    atomic_write_text(f"{stem}.profile.txt", prof.key_averages().table(sort_by=sort, row_limit=40))
    prof.export_chrome_trace(f"{stem}.trace.json.gz")
