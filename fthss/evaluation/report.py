"""The evaluation report: `report.json` (per task, per method, each metric), `report.md` (the
paper's table layout: methods × tasks), `accuracy.png`, `tuning.png` (no tuning / adapt / full
FTHSS, the paper's Fig. 4), `predictions.jsonl` (one line per task, method and request: every
step's output, the prediction, the gold answer, its scores) and, when latency and memory were
measured (`fthss demo`), their tables and `latency_memory.png`."""

from __future__ import annotations

import json
from pathlib import Path

from fthss import plots
from fthss.atomic import atomic_write_text


def _label(row: dict) -> str:
    """A method row's or comparison's name: its stage kind first when the report has kinds."""
    return _kind(row) + row["method"] + (" (gold upstream)" if row["gold_upstream"] else "")


def _kind(row: dict) -> str:
    return f"{row['kind']} " if row.get("kind") else ""


def markdown(reports: list[dict]) -> str:
    tasks = [r["task"] for r in reports]
    labels = list(dict.fromkeys(_label(m) for r in reports for m in r["methods"]))
    header = "| method | " + " | ".join(
        f"{r['task']} {m.upper()}" for r in reports for m in _metrics(r)) + " |"
    lines = ["# fthss evaluation", "", f"Tasks: {', '.join(tasks)}. Scores in %.", "",
             "![accuracy](accuracy.png)", "", header,
             "|" + "---|" * (1 + sum(len(_metrics(r)) for r in reports))]
    for label in labels:
        cells = []
        for r in reports:
            row = next((m for m in r["methods"] if _label(m) == label), None)
            cells += [f"{row[m]:.1f}" if row else "–" for m in _metrics(r)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    comparisons = [(r["task"], c) for r in reports for c in r["comparisons"]]
    if comparisons:
        lines += ["", "## Paired differences (bootstrap, 95% interval)", "",
                  "| task | difference | upstream | metric | value | 95% interval |",
                  "|---|---|---|---|---|---|"]
        for task, c in comparisons:
            lines.append(f"| {task} | {_kind(c)}{c['a']} − {c['b']} | "
                         f"{'gold' if c['gold_upstream'] else 'generated'} | "
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
    fig, axes = plots.subplots(1, len(reports), figsize=(4.5 * len(reports), 3.6), squeeze=False)
    for ax, r in zip(axes[0], reports, strict=True):
        main = _metrics(r)[0]
        rows = r["methods"]
        ax.bar(range(len(rows)), [m[main] for m in rows],
               color=["#999" if m["gold_upstream"] else "#3a7" for m in rows])
        ax.set_xticks(range(len(rows)), [_label(m).replace(" (gold upstream)", "\n(gold)")
                                         for m in rows], rotation=45, ha="right", fontsize=8)
        ax.set(title=r["task"], ylabel=f"{main.upper()} %", ylim=(0, 100))
    plots.save(fig, path)


TUNING = ("fthss-untuned", "adapt", "fthss")


def plot_tuning(reports: list[dict], path: Path) -> bool:
    """Shared mode without FTHSS tuning, with `adapt`, with full FTHSS tuning, per task (and
    per stage kind when the report has kinds): one bar series per kind and method present."""
    rows = [m for r in reports for m in r["methods"]
            if m["method"] in TUNING and not m["gold_upstream"]]
    kinds = list(dict.fromkeys(m.get("kind") or "" for m in rows))  # in the report's order
    series = sorted({(m.get("kind") or "", m["method"]) for m in rows},
                    key=lambda s: (kinds.index(s[0]), TUNING.index(s[1])))
    if not series:
        return False
    fig, ax = plots.subplots(figsize=(1.8 + 0.6 * len(series) * len(reports), 3.6))
    width = 0.8 / len(series)
    for i, (kind, method) in enumerate(series):
        values = [next((m[_metrics(r)[0]] for m in r["methods"] if not m["gold_upstream"]
                        and (m.get("kind") or "", m["method"]) == (kind, method)), 0)
                  for r in reports]
        ax.bar([t + width * (i - (len(series) - 1) / 2) for t in range(len(reports))], values,
               width=width, label=f"{kind} {method}".strip())
    ax.set_xticks(range(len(reports)), [r["task"] for r in reports], fontsize=8)
    ax.set(ylabel="EM / Acc %", ylim=(0, 100), title="Shared mode: no tuning, adapt, FTHSS")
    ax.legend(fontsize=8)
    plots.save(fig, path)
    return True


def benchmark_markdown(latency: list[dict], memory: list[dict]) -> str:
    lines = ["", "## Stage-B latency against intermediate length (batch 1, median)", "",
             ("| intermediate tokens | text ms | shared ms | text/shared | text TTFT ms | "
              "shared TTFT ms | TTFT ratio |"), "|---|---|---|---|---|---|---|"]
    for length in dict.fromkeys(r["intermediate_tokens"] for r in latency):
        text, shared = (next(r for r in latency if r["intermediate_tokens"] == length and
                             r["mode"] == mode) for mode in ("text", "shared"))
        lines.append(f"| {length} | {1000 * text['latency_s']:.1f} | "
                     f"{1000 * shared['latency_s']:.1f} | "
                     f"{text['latency_s'] / shared['latency_s']:.2f}× | "
                     f"{1000 * text['ttft_s']:.1f} | "
                     f"{1000 * shared['ttft_s']:.1f} | {text['ttft_s'] / shared['ttft_s']:.2f}× |")
    lines += ["", "## KV memory held by a two-round chain, against the number of stages", "",
              "| stages | chain tokens | text KV MiB | shared KV MiB | text/shared |",
              "|---|---|---|---|---|"]
    for count in dict.fromkeys(r["stages"] for r in memory):
        text, shared = (next(r for r in memory if r["stages"] == count and r["mode"] == mode)
                        for mode in ("text", "shared"))
        lines.append(f"| {count} | {shared['chain_tokens']} | {text['kv_bytes'] / 2**20:.2f} | "
                     f"{shared['kv_bytes'] / 2**20:.2f} | "
                     f"{text['kv_bytes'] / shared['kv_bytes']:.2f}× |")
    return "\n".join(lines) + "\n"


REPORT_FILES = ("report.json", "report.md", "predictions.jsonl", "accuracy.png", "tuning.png",
                "latency_memory.png")


def write_report(reports: list[dict], out: str | Path, extra: dict | None = None) -> Path:
    """`extra` (run settings, timings, and `latency`/`memory` rows from
    `fthss.benchmarks.chains`) is stored in report.json and tabled in report.md."""
    from fthss.benchmarks.figures import latency_memory

    out, extra = Path(out), extra or {}
    out.mkdir(parents=True, exist_ok=True)
    for name in REPORT_FILES:  # an older report's plot must not stay beside this report
        (out / name).unlink(missing_ok=True)
    rows = [json.dumps({"task": r["task"], **row})
            for r in reports for row in r.get("predictions", [])]
    reports = [{k: v for k, v in r.items() if k != "predictions"} for r in reports]
    text = markdown(reports)
    plot(reports, out / "accuracy.png")
    if plot_tuning(reports, out / "tuning.png"):
        text += "\n![no tuning / adapt / FTHSS](tuning.png)\n"
    if extra.get("latency") and extra.get("memory"):
        text += benchmark_markdown(extra["latency"], extra["memory"])
        latency_memory(extra["latency"], extra["memory"], out / "latency_memory.png")
        text += "\n![latency and memory](latency_memory.png)\n"
    if "base" in extra:
        text += f"\nBase: `{extra['base']}`.\n"
    if "wall_s" in extra:
        text += f"\nWall time: {extra['wall_s'] / 60:.1f} min on {extra.get('device', '?')}.\n"
    atomic_write_text(out / "report.json", json.dumps({"tasks": reports, **extra}, indent=2))
    atomic_write_text(out / "report.md", text)
    atomic_write_text(out / "predictions.jsonl", "".join(row + "\n" for row in rows))
    return out
