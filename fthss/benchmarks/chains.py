"""Latency, throughput and KV memory of chains, text mode against shared mode, measured on the
engine.

`stage_b_latency`: the paper's Table 5 (top). Stage A has written an intermediate of L tokens;
stage B then writes exactly `new_tokens` tokens. In text mode B must first re-encode the
question and those L tokens; in shared mode it reads the K/V A already wrote, so its latency
should not grow with L. PEFT + `generate` is the third system. Medians over repeated runs after
a warm-up run; the ratios name the strongest baseline (the fastest of the others).

`throughput`: beyond the paper. The same two-stage chain for a batch of requests: stage B's
requests/s and generated tokens/s. Text mode prefills batch × L tokens, shared mode only decodes.

`kv_memory`: the paper's Table 5 (bottom). A multi-round chain over 1, 2, 3, ... stages, every
step generating the same number of tokens up to a fixed total: shared mode holds one cache per
request whatever the number of stages; text mode keeps one per stage.

`compress_qa_memory`: compress -> QA. Stage A reads passages no later step can see and writes a
compression; what is held after A and during B, and how many passage tokens are still held.

Bytes are read from the cache tensors the engine allocated, and checked against the per-token
formula. Weights do not change these figures (only shapes do), so the stages are freshly
initialised.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from fthss.benchmarks import hf_peft
from fthss.engine.engine import ChainEngine, StepStats
from fthss.errors import ConfigError
from fthss.layout.chain import ChainSample, Step
from fthss.models.base import BaseModel
from fthss.prompts.stage import Stage, StageConfig

QUESTION = "What does the passage say?"
MODES = ("text", "shared")
SYSTEMS = ("shared", "text", "hf-peft")  # the latency benchmark's
BENCH_KINDS = ("prompt", "lora")  # stage kinds a benchmark can run: lora adds the routing


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


def bench_engine(base: BaseModel, names: list[str], prompt_tokens: int, batch_size: int = 8,
                 compile: bool = False, kind: str = "prompt") -> ChainEngine:
    """The engine every benchmark runs, with untrained stages `names` (weights change neither
    speed nor memory): prompt stages, or lora stages (StageConfig's default rank and targets,
    and the same soft prompt) whose every own token runs through its deltas; `compile`: a
    compiled decode step (CUDA graphs on a GPU)."""
    stages = [Stage.create(StageConfig(name, kind, prompt_tokens), base, seed=i)
              for i, name in enumerate(names)]
    return ChainEngine(base, stages, batch_size=batch_size, compile=compile)


def stage_b_request(base: BaseModel, intermediate_tokens: int, new_tokens: int,
                    prompt_tokens: int, rounds: int = 1) -> ChainSample:
    """The question, stage A's output given (`intermediate_tokens` of filler), and stage B
    writing exactly `new_tokens`; with `rounds` > 1, A then B that many times (each A's output
    other filler, each B reading every earlier output: a multi-round chain). Refuses a chain
    longer than the base's positions."""
    # prompt slots, BOS + question, per round two step markers, A's output + EOS, B's output
    needed = (prompt_tokens + len(base.tokenizer.encode(QUESTION, add_special_tokens=False))
              + rounds * (intermediate_tokens + new_tokens + 3) + 1)
    if needed > base.position_limit:
        raise ConfigError(f"intermediate length {intermediate_tokens} over {rounds} round(s): "
                          f"the chain needs {needed} positions, the base has "
                          f"{base.position_limit}")
    return ChainSample(QUESTION, [
        step for r in range(rounds)
        for step in (Step("A", output=filler_text(base, intermediate_tokens, seed=r)),
                     Step("B", max_new_tokens=new_tokens, min_new_tokens=new_tokens))])


def latency_row(length: int, mode: str, kind: str, new_tokens: int, wall_s: list[float],
                ttft_s: list[float], prefilled_tokens: int) -> dict:
    """One system with stages of one kind at one intermediate length: medians of the timed
    runs."""
    return {"intermediate_tokens": length, "mode": mode, "kind": kind, "new_tokens": new_tokens,
            "latency_s": statistics.median(wall_s), "ttft_s": statistics.median(ttft_s),
            "prefilled_tokens": prefilled_tokens, "repeats": len(wall_s)}


# One run of stage B: (seconds from the start of its step to its last token, seconds to its
# first token, tokens encoded before the first token).
StageBRun = tuple[float, float, int]


def engine_system(engine: ChainEngine, mode: str) -> Callable[[ChainSample], StageBRun]:
    """Stage B of a request run by the engine in `mode`, as one latency system."""
    def run(request: ChainSample) -> StageBRun:
        stats = engine.run([request], mode)[0].steps[1].stats
        return stats.wall_s, stats.time_to_first_token_s, stats.prefilled_tokens
    return run


def stage_b_latency(base: BaseModel, lengths: list[int], new_tokens: int = 16, repeats: int = 3,
                    prompt_tokens: int = 16, systems: tuple[str, ...] = MODES,
                    progress: bool = False, compile: bool = False,
                    kinds: tuple[str, ...] = ("prompt",)) -> list[dict]:
    """One row per (intermediate length, stage kind, system): stage B's median latency and
    time to first token over `repeats` runs, after one warm-up run, batch 1. Systems: "shared"
    and "text" (the engine's modes) and "hf-peft" (PEFT + `generate`,
    `fthss.benchmarks.hf_peft`; prompt stages only: with lora stages, text mode is the chain of
    LoRA models). The systems and kinds take turns, run by run, so a machine whose load
    drifts during the benchmark slows them alike."""
    unknown = set(systems) - set(SYSTEMS) or set(kinds) - set(BENCH_KINDS)
    if unknown:
        raise ConfigError(f"unknown latency system(s) or kind(s) {sorted(unknown)}; choose "
                          f"from {SYSTEMS} and {BENCH_KINDS}")
    runners = {}
    for kind in kinds:
        engine = bench_engine(base, ["A", "B"], prompt_tokens, compile=compile, kind=kind)
        for system in systems:
            if system in MODES:
                runners[system, kind] = engine_system(engine, system)
            elif kind == "prompt":
                runners[system, kind] = hf_peft.peft_system(base, prompt_tokens)
    rows = []
    for length in tqdm(lengths, desc="stage-B latency", disable=not progress):
        request = stage_b_request(base, length, new_tokens, prompt_tokens)
        runs = {key: [] for key in runners}
        for _ in range(repeats + 1):  # the first run of each system warms it up
            for key, run in runners.items():
                runs[key].append(run(request))
        for (system, kind), (_, *timed) in runs.items():
            rows.append(latency_row(length, system, kind, new_tokens,
                                    [wall for wall, _, _ in timed],
                                    [first for _, first, _ in timed], timed[0][2]))
    return rows


def latency_ratios(rows: list[dict]) -> list[dict]:
    """Per intermediate length and stage kind: each other system's latency and time to first
    token over shared mode's, taken from the same run, and the strongest baseline's (the
    fastest other system, for latency and for time to first token apart), named."""
    ratios = []
    for length, kind in dict.fromkeys((r["intermediate_tokens"], r["kind"]) for r in rows):
        at = {r["mode"]: r for r in rows if (r["intermediate_tokens"], r["kind"]) == (length, kind)}
        if "shared" not in at or len(at) < 2:
            continue
        shared = at.pop("shared")  # `at` keeps the other systems
        ratio = {what: {m: r[key] / shared[key] for m, r in at.items()}
                 for what, key in (("latency", "latency_s"), ("ttft", "ttft_s"))}
        strongest = {what: min(by_system.items(), key=lambda item: item[1])
                     for what, by_system in ratio.items()}
        ratios.append({"intermediate_tokens": length, "kind": kind,
                       "latency_ratio": ratio["latency"],
                       "ttft_ratio": ratio["ttft"],
                       "strongest_baseline": {what: {"system": system, "ratio": value}
                                              for what, (system, value) in strongest.items()}})
    return ratios


def routing_cost(rows: list[dict], where: str, figures: tuple[str, ...]) -> list[dict]:
    """What routing each token through its stage's deltas costs: per value of `where` (and per
    system, for rows that name one), lora stages' `figures` over prompt stages' from the same
    run (`{figure}_ratio`). Nothing when the rows hold one kind only."""
    cost = []
    for value, mode in dict.fromkeys((r[where], r.get("mode")) for r in rows):
        at = {r["kind"]: r for r in rows if (r[where], r.get("mode")) == (value, mode)}
        if set(BENCH_KINDS) <= set(at):
            cost.append({where: value, "mode": mode or "shared",
                         **{f"{f}_ratio": at["lora"][f] / at["prompt"][f] for f in figures}})
    return cost


def throughput(base: BaseModel, batch_sizes: list[int], intermediate_tokens: int = 1000,
               new_tokens: int = 16, repeats: int = 1, prompt_tokens: int = 16,
               modes: tuple[str, ...] = MODES, progress: bool = False,
               compile: bool = False) -> list[dict]:
    """One row per (batch size, mode): a batch of requests whose stage A wrote
    `intermediate_tokens`, run together; stage B's requests/s and generated tokens/s (medians
    after a warm-up run). `chain_s` also counts step A, where shared mode encodes the given
    intermediate (a real stage A would have encoded it while writing it)."""
    request = stage_b_request(base, intermediate_tokens, new_tokens, prompt_tokens)
    rows = []
    cases = [(batch, mode) for batch in batch_sizes for mode in modes]
    for batch, mode in tqdm(cases, desc="throughput", disable=not progress):
        engine = bench_engine(base, ["A", "B"], prompt_tokens, batch, compile)
        stage_b, chain = [], []
        for _ in range(repeats + 1):
            started = time.perf_counter()
            results = engine.run([request] * batch, mode)
            chain.append(time.perf_counter() - started)
            # every row of a batch finishes step B together
            stage_b.append(max(r.steps[1].stats.wall_s for r in results))
        decoded = sum(r.steps[1].stats.decoded_tokens for r in results)
        seconds = statistics.median(stage_b[1:])
        rows.append({"batch": batch, "mode": mode, "intermediate_tokens": intermediate_tokens,
                     "new_tokens": new_tokens, "stage_b_s": seconds,
                     "requests_per_s": batch / seconds, "tokens_per_s": decoded / seconds,
                     "chain_s": statistics.median(chain[1:]), "repeats": repeats})
    return rows


def throughput_ratios(rows: list[dict]) -> list[dict]:
    """Per batch size: shared mode's requests/s over text mode's, from the same run."""
    ratios = []
    for batch in dict.fromkeys(r["batch"] for r in rows):
        at = {r["mode"]: r for r in rows if r["batch"] == batch}
        if set(MODES) <= set(at):
            ratios.append({"batch": batch, "requests_ratio":
                           at["shared"]["requests_per_s"] / at["text"]["requests_per_s"]})
    return ratios


def _checked(base: BaseModel, mode: str, stats: StepStats) -> StepStats:
    """The step's cache bytes, checked against tokens held × bytes per token."""
    if stats.kv_bytes != stats.kv_tokens * bytes_per_token(base):
        raise AssertionError(f"{mode} mode: the cache holds {stats.kv_bytes} bytes, the "
                             f"formula gives {stats.kv_tokens} tokens × "
                             f"{bytes_per_token(base)} bytes")
    return stats


def kv_memory(base: BaseModel, stage_counts: list[int], total_tokens: int = 1000,
              rounds: int = 2, prompt_tokens: int = 16, progress: bool = False) -> list[dict]:
    """One row per (number of stages, mode): the most K/V bytes held during the chain."""
    rows = []
    for count in tqdm(stage_counts, desc="multi-round KV", disable=not progress):
        names = [chr(ord("A") + i) for i in range(count)]
        per_step = max(1, total_tokens // (rounds * count))
        request = ChainSample(QUESTION, [
            Step(name, max_new_tokens=per_step, min_new_tokens=per_step)
            for _ in range(rounds) for name in names])
        engine = bench_engine(base, names, prompt_tokens)
        for mode in MODES:
            result = engine.run([request], mode)[0]
            held = _checked(base, mode, max((s.stats for s in result.steps),
                                            key=lambda stats: stats.kv_bytes))
            rows.append({"stages": count, "mode": mode, "rounds": rounds,
                         "chain_tokens": len(result.tokens.shared_ids) + sum(
                             len(s.input_ids) + len(s.output_ids) for s in result.tokens.steps),
                         "kv_tokens": held.kv_tokens, "kv_bytes": held.kv_bytes})
    return rows


def compress_qa_memory(base: BaseModel, passage_tokens: int = 800, compression_tokens: int = 150,
                       answer_tokens: int = 16, prompt_tokens: int = 16,
                       progress: bool = False) -> list[dict]:
    """One row per mode: K/V held at the end of stage A (which reads passages and writes a
    compression) and at the end of stage B (which answers from the question and the
    compression), and how many passage tokens are still held then: tokens held beyond those of
    the same chain run with no passages (at least 0: freeing the passages frees stage A's
    one-token step marker too, which the run without passages keeps: too small to free)."""
    engine = bench_engine(base, ["A", "B"], prompt_tokens)
    passages = filler_text(base, passage_tokens)

    def chain(passages):
        return ChainSample(QUESTION, [
            Step("A", input=passages, max_new_tokens=compression_tokens,
                 min_new_tokens=compression_tokens),
            Step("B", max_new_tokens=answer_tokens, min_new_tokens=answer_tokens)])

    rows = []
    for mode in tqdm(MODES, desc="compress -> QA KV", disable=not progress):
        after_a, during_b = (_checked(base, mode, s.stats)
                             for s in engine.run([chain(passages)], mode)[0].steps)
        bare_a, bare_b = (s.stats for s in engine.run([chain(None)], mode)[0].steps)
        rows.append({"mode": mode,
                     "passage_tokens": len(base.tokenizer.encode(passages,
                                                                 add_special_tokens=False)),
                     "compression_tokens": compression_tokens, "answer_tokens": answer_tokens,
                     "kv_tokens_after_a": after_a.kv_tokens, "kv_bytes_after_a": after_a.kv_bytes,
                     "kv_tokens_during_b": during_b.kv_tokens,
                     "kv_bytes_during_b": during_b.kv_bytes,
                     "passage_tokens_held_after_a": max(0, after_a.kv_tokens - bare_a.kv_tokens),
                     "passage_tokens_held_during_b": max(0, during_b.kv_tokens - bare_b.kv_tokens)})
    return rows
