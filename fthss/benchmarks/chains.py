"""Latency and KV memory of a chain, text mode against shared mode, measured on the engine.

`stage_b_latency`: the paper's Table 5 (top). Stage A has written an intermediate of L tokens;
stage B then writes exactly `new_tokens` tokens. In text mode B must first re-encode the
question and those L tokens; in shared mode it reads the K/V A already wrote, so its latency
should not grow with L. Medians over repeated runs after a warm-up run.

`kv_memory`: the paper's Table 5 (bottom). A multi-round chain over 1, 2, 3, ... stages, every
step generating the same number of tokens up to a fixed total: shared mode holds one cache per
request whatever the number of stages; text mode keeps one per stage. Bytes are read from the
cache tensors the engine allocated, and checked against the per-token formula.

Weights do not change these figures (only shapes do), so the stages are freshly initialised.
"""

from __future__ import annotations

import statistics

import torch

from fthss import plots
from fthss.engine.engine import ChainEngine
from fthss.layout.chain import ChainSample, Step
from fthss.models.base import BaseModel
from fthss.prompts.stage import Stage, StageConfig

QUESTION = "What does the passage say?"


def filler_text(base: BaseModel, length: int, seed: int = 0) -> str:
    """Text of about `length` tokens: random vocabulary tokens that are printable text and
    encode back to themselves (so the length survives decoding and re-encoding)."""
    tokenizer = base.tokenizer
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randperm(len(tokenizer), generator=generator)[:4096].tolist()
    words = [i for i in sample if i not in tokenizer.all_special_ids
             and tokenizer.decode([i]).isascii() and tokenizer.decode([i]).isprintable()
             and tokenizer.encode(tokenizer.decode([i]), add_special_tokens=False) == [i]]
    picks = torch.randint(len(words), (length,), generator=generator).tolist()
    ids = tokenizer.encode(tokenizer.decode([words[p] for p in picks]), add_special_tokens=False)
    return tokenizer.decode(ids[:length])


def bytes_per_token(base: BaseModel) -> int:
    """K and V of one token in every layer."""
    element = torch.empty((), dtype=base.dtype).element_size()
    return base.num_layers * 2 * base.num_kv_heads * base.head_dim * element


def _stages(base: BaseModel, names: list[str], prompt_tokens: int) -> list[Stage]:
    return [Stage.create(StageConfig(name, "prompt", prompt_tokens), base, seed=i)
            for i, name in enumerate(names)]


def stage_b_latency(base: BaseModel, lengths: list[int], new_tokens: int = 16, repeats: int = 3,
                    prompt_tokens: int = 16, modes: tuple[str, ...] = ("text", "shared")
                    ) -> list[dict]:
    """One row per (intermediate length, mode): stage B's median latency and time to first
    token over `repeats` runs, after one warm-up run, batch 1."""
    engine = ChainEngine(base, _stages(base, ["A", "B"], prompt_tokens))
    rows = []
    for length in lengths:
        request = ChainSample(QUESTION, [
            Step("A", output=filler_text(base, length)),
            Step("B", max_new_tokens=new_tokens, min_new_tokens=new_tokens)])
        for mode in modes:
            runs = [engine.run([request], mode)[0].steps[1].stats for _ in range(repeats + 1)][1:]
            rows.append({"intermediate_tokens": length, "mode": mode, "new_tokens": new_tokens,
                         "latency_s": statistics.median(r.wall_s for r in runs),
                         "ttft_s": statistics.median(r.time_to_first_token_s for r in runs),
                         "prefilled_tokens": runs[0].prefilled_tokens, "repeats": repeats})
    return rows


def kv_memory(base: BaseModel, stage_counts: list[int], total_tokens: int = 1000,
              rounds: int = 2, prompt_tokens: int = 16) -> list[dict]:
    """One row per (number of stages, mode): the most K/V bytes held during the chain."""
    rows = []
    for count in stage_counts:
        names = [chr(ord("A") + i) for i in range(count)]
        per_step = max(1, total_tokens // (rounds * count))
        request = ChainSample(QUESTION, [
            Step(name, max_new_tokens=per_step, min_new_tokens=per_step)
            for _ in range(rounds) for name in names])
        engine = ChainEngine(base, _stages(base, names, prompt_tokens))
        for mode in ("text", "shared"):
            result = engine.run([request], mode)[0]
            held = max(result.steps, key=lambda s: s.stats.kv_bytes).stats
            if held.kv_bytes != held.kv_tokens * bytes_per_token(base):
                raise AssertionError(f"{mode} mode: the cache holds {held.kv_bytes} bytes, the "
                                     f"formula gives {held.kv_tokens} tokens × "
                                     f"{bytes_per_token(base)} bytes")
            rows.append({"stages": count, "mode": mode, "rounds": rounds,
                         "chain_tokens": len(result.tokens.shared_ids) + sum(
                             len(s.input_ids) + len(s.output_ids) for s in result.tokens.steps),
                         "kv_tokens": held.kv_tokens, "kv_bytes": held.kv_bytes})
    return rows


def plot(latency: list[dict], memory: list[dict], path) -> None:
    """Stage-B latency against intermediate length, and KV memory against stages."""
    fig, (left, right) = plots.subplots(1, 2, figsize=(10, 3.8))
    for mode, colour in (("text", "#c55"), ("shared", "#3a7")):
        rows = [r for r in latency if r["mode"] == mode]
        left.plot([r["intermediate_tokens"] for r in rows], [1000 * r["latency_s"] for r in rows],
                  "o-", color=colour, label=f"{mode}: latency")
        left.plot([r["intermediate_tokens"] for r in rows], [1000 * r["ttft_s"] for r in rows],
                  "x--", color=colour, label=f"{mode}: first token")
    left.set(xlabel="intermediate tokens (stage A's output)", ylabel="stage B, ms",
             title="Stage-B latency")
    left.legend(fontsize=8)
    counts = sorted({r["stages"] for r in memory})
    for offset, (mode, colour) in zip((-0.2, 0.2), (("text", "#c55"), ("shared", "#3a7"))):
        rows = {r["stages"]: r for r in memory if r["mode"] == mode}
        right.bar([c + offset for c in counts], [rows[c]["kv_bytes"] / 2**20 for c in counts],
                  width=0.4, color=colour, label=mode)
    right.set(xticks=counts, xlabel="stages in the multi-round chain", ylabel="KV MiB held",
              title="KV memory")
    right.legend(fontsize=8)
    plots.save(fig, path)
