"""Figures of benchmark rows: stage-B latency against intermediate length (and each system's
slowdown against shared mode), throughput against batch size, and the demo's latency-and-memory
figure."""

from __future__ import annotations

from fthss import plots
from fthss.benchmarks.chains import latency_ratios, throughput_ratios

COLOURS = {"text": "#c55", "shared": "#3a7", "hf-peft": "#57a"}


def _latency_panel(ax, rows: list[dict]) -> None:
    """Latency (solid) and time to first token (dashed) of every system in `rows`."""
    kinds = set(r["kind"] for r in rows)
    for mode, kind in dict.fromkeys((r["mode"], r["kind"]) for r in rows):
        mine = [r for r in rows if (r["mode"], r["kind"]) == (mode, kind)]
        lengths = [r["intermediate_tokens"] for r in mine]
        name = f"{mode} ({kind})" if len(kinds) > 1 else mode
        marker = "s" if kind == "lora" else "o"
        ax.plot(lengths, [1000 * r["latency_s"] for r in mine], f"{marker}-",
                color=COLOURS[mode], label=f"{name}: latency")
        ax.plot(lengths, [1000 * r["ttft_s"] for r in mine], "x--", color=COLOURS[mode],
                label=f"{name}: first token")
    ax.set(xlabel="intermediate tokens (stage A's output)", ylabel="stage B, ms",
           title="Stage-B latency")
    ax.legend(fontsize=8)


def latency(rows: list[dict], path) -> None:
    """Latency against intermediate length, and each system's ratio to shared mode."""
    fig, (left, right) = plots.subplots(1, 2, figsize=(10, 3.8))
    _latency_panel(left, rows)
    ratios = latency_ratios(rows)
    kinds = set(r["kind"] for r in ratios)
    for mode, kind in dict.fromkeys((m, r["kind"]) for r in ratios for m in r["latency_ratio"]):
        mine = [r for r in ratios if r["kind"] == kind and mode in r["latency_ratio"]]
        lengths = [r["intermediate_tokens"] for r in mine]
        name = f"{mode}/shared ({kind})" if len(kinds) > 1 else f"{mode}/shared"
        marker = "s" if kind == "lora" else "o"
        right.plot(lengths, [r["latency_ratio"][mode] for r in mine], f"{marker}-",
                   color=COLOURS[mode], label=f"{name}: latency")
        right.plot(lengths, [r["ttft_ratio"][mode] for r in mine], "x--",
                   color=COLOURS[mode], label=f"{name}: first token")
    right.axhline(1, color="grey", linewidth=0.8)
    right.set(xlabel="intermediate tokens", ylabel="× shared mode", yscale="log",
              title="Slower than shared mode by")
    right.legend(fontsize=8)
    plots.save(fig, path)


def throughput(rows: list[dict], path) -> None:
    """Stage B's requests/s against batch size per mode, and shared over text."""
    fig, (left, right) = plots.subplots(1, 2, figsize=(10, 3.8))
    batches = sorted({r["batch"] for r in rows})
    for mode in dict.fromkeys(r["mode"] for r in rows):
        mine = [r for r in rows if r["mode"] == mode]
        left.plot([r["batch"] for r in mine], [r["requests_per_s"] for r in mine], "o-",
                  color=COLOURS[mode], label=mode)
    left.set(xlabel="batch size", ylabel="stage B requests/s", title="Throughput")
    left.legend(fontsize=8)
    ratios = throughput_ratios(rows)
    right.plot([r["batch"] for r in ratios], [r["requests_ratio"] for r in ratios], "o-",
               color=COLOURS["shared"])
    right.axhline(1, color="grey", linewidth=0.8)
    right.set(xlabel="batch size", ylabel="shared / text requests/s", title="Shared mode's gain")
    for ax in (left, right):  # batch sizes grow geometrically: a log axis labelled by them
        ax.set_xscale("log")
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.minorticks_off()
    plots.save(fig, path)


def _memory_panel(ax, memory: list[dict]) -> None:
    """KV MiB held by text and shared mode against the number of stages of a multi-round
    chain."""
    counts = sorted({r["stages"] for r in memory})
    for offset, mode in zip((-0.2, 0.2), ("text", "shared"), strict=True):
        rows = {r["stages"]: r for r in memory if r["mode"] == mode}
        ax.bar([c + offset for c in counts], [rows[c]["kv_bytes"] / 2**20 for c in counts],
               width=0.4, color=COLOURS[mode], label=mode)
    ax.set(xticks=counts, xlabel="stages in the multi-round chain", ylabel="KV MiB held",
           title="KV memory")
    ax.legend(fontsize=8)


def latency_memory(latency: list[dict], memory: list[dict], path) -> None:
    """The demo's figure: stage-B latency against intermediate length, KV memory against
    stages."""
    fig, (left, right) = plots.subplots(1, 2, figsize=(10, 3.8))
    _latency_panel(left, latency)
    _memory_panel(right, memory)
    plots.save(fig, path)


def memory(multi_round: list[dict], compress_qa: list[dict], path) -> None:
    """`fthss bench memory`: KV held against the number of stages, and compress → QA's KV
    during stage B per mode, split into the passages held and the rest."""
    fig, (left, right) = plots.subplots(1, 2, figsize=(10, 3.8))
    _memory_panel(left, multi_round)
    for x, row in enumerate(compress_qa):
        total = row["kv_bytes_during_b"] / 2**20
        passages = total * row["passage_tokens_held_during_b"] / max(row["kv_tokens_during_b"], 1)
        right.bar(x, total - passages, color=COLOURS[row["mode"]])
        right.bar(x, passages, bottom=total - passages, color=COLOURS[row["mode"]], alpha=0.4,
                  hatch="//", label="passages held" if passages else None)
    right.set(xticks=range(len(compress_qa)), xticklabels=[r["mode"] for r in compress_qa],
              ylabel="KV MiB during stage B", title="compress → QA")
    if any(r["passage_tokens_held_during_b"] for r in compress_qa):
        right.legend(fontsize=8)
    plots.save(fig, path)
