"""The evaluation report: `report.json` (per task, per method, each metric), `report.md` (the
paper's table layout: methods × tasks) and `accuracy.png`."""

from __future__ import annotations

import json
from pathlib import Path

from fthss.atomic import atomic_write_text


def _label(row: dict) -> str:
    return row["method"] + (" (gold upstream)" if row["gold_upstream"] else "")


def markdown(reports: list[dict]) -> str:
    tasks = [r["task"] for r in reports]
    labels = list(dict.fromkeys(_label(m) for r in reports for m in r["methods"]))
    header = "| method | " + " | ".join(
        f"{r['task']} {m.upper()}" for r in reports for m in _metrics(r)) + " |"
    lines = ["# fthss evaluation", "", f"Tasks: {', '.join(tasks)}. Scores in %.", "", header,
             "|" + "---|" * (1 + sum(len(_metrics(r)) for r in reports))]
    for label in labels:
        cells = []
        for r in reports:
            row = next((m for m in r["methods"] if _label(m) == label), None)
            cells += [f"{row[m]:.1f}" if row else "–" for m in _metrics(r)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    comparisons = [(r["task"], c) for r in reports for c in r["comparisons"]]
    if comparisons:
        lines += ["", "## FTHSS − chain (paired bootstrap, 95% interval)", "",
                  "| task | upstream | metric | difference | 95% interval |", "|---|---|---|---|---|"]
        for task, c in comparisons:
            lines.append(f"| {task} | {'gold' if c['gold_upstream'] else 'generated'} | "
                         f"{c['metric'].upper()} | {c['diff']:+.1f} | "
                         f"[{c['ci95'][0]:+.1f}, {c['ci95'][1]:+.1f}] |")
    lines += ["", "## Per stage (means over requests)", "",
              "| task | method | stage | latency s | TTFT s | prefilled | decoded | KV MB |",
              "|---|---|---|---|---|---|---|---|"]
    for r in reports:
        for m in r["methods"]:
            for stage, s in m["stages"].items():
                lines.append(f"| {r['task']} | {_label(m)} | {stage} | {s['latency_s']:.3f} | "
                             f"{s['ttft_s']:.3f} | {s['prefilled_tokens']:.0f} | "
                             f"{s['decoded_tokens']:.1f} | {s['kv_bytes'] / 2**20:.2f} |")
    return "\n".join(lines) + "\n"


def _metrics(report: dict) -> tuple[str, ...]:
    return ("acc",) if report["metric"] == "choice" else ("em", "f1")


def plot(reports: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(reports), figsize=(4.5 * len(reports), 3.6), squeeze=False)
    for ax, r in zip(axes[0], reports):
        main = _metrics(r)[0]
        rows = r["methods"]
        ax.bar(range(len(rows)), [m[main] for m in rows],
               color=["#999" if m["gold_upstream"] else "#3a7" for m in rows])
        ax.set_xticks(range(len(rows)), [_label(m).replace(" (gold upstream)", "\n(gold)")
                                         for m in rows], rotation=45, ha="right", fontsize=8)
        ax.set(title=r["task"], ylabel=f"{main.upper()} %", ylim=(0, 100))
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def write_report(reports: list[dict], out: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report.json", json.dumps({"tasks": reports}, indent=2))
    atomic_write_text(out / "report.md", markdown(reports))
    plot(reports, out / "accuracy.png")
    return out
