"""Training feedback on disk: a JSONL metrics log (one line per optimizer step) and a loss
curve PNG."""

from __future__ import annotations

import json
from pathlib import Path

from fthss import plots
from fthss.atomic import atomic_write_text


class MetricsLog:
    def __init__(self, path: Path, enabled: bool = True, keep_until: int = 0):
        """`keep_until`: on resume, lines past this step (written after the checkpoint the run
        resumes from) are dropped, so the log never shows a step twice."""
        self.path, self.enabled = Path(path), enabled
        self.rows: list[dict] = []
        if self.path.is_file():
            self.rows = [r for r in _complete_rows(self.path) if r["step"] <= keep_until]
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))

    def write(self, **row) -> None:
        self.rows.append(row)
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def losses(self) -> list[float]:
        return [r["loss"] for r in self.rows]

    def plot(self, path: Path, title: str) -> None:
        fig, ax = plots.subplots(figsize=(6, 3.5))
        ax.plot([r["step"] for r in self.rows], self.losses(), lw=1.5)
        ax.set(xlabel="optimizer step", ylabel="loss (outputs of trained stages)", title=title)
        ax.grid(alpha=0.3)
        plots.save(fig, path)


def _complete_rows(path: Path) -> list[dict]:
    """The log's rows, less a last line cut short by a run killed mid-append. Such a line is
    past the last checkpoint (a checkpoint is written after its step's line), so a resumed run
    drops it anyway."""
    rows = []
    for line in path.read_bytes().decode("utf-8", "replace").splitlines():
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            continue
        # only rows this log could have written: an edited or damaged line is dropped as well
        if isinstance(row, dict) and type(row.get("step")) is int and all(
                isinstance(row.get(k, 0), (int, float)) for k in ("tokens", "wall_s", "loss")):
            rows.append(row)
    return rows
