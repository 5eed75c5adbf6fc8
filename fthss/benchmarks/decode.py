"""Decode speed against the memory-bandwidth floor.

At batch 1 every decoded token reads each weight once and the whole K/V of its context once,
so (weight bytes + KV bytes) / memory bandwidth is a floor on the time per token. The share of
that floor a decode step reaches says how much speed is left (docs/design.md, "Measured on an
H100 before fthss": ~30 ms per token for a Python loop over the HF forward, ~9.6 ms compiled,
floor ~5.4 ms for Llama-3-8B in bf16).
"""

from __future__ import annotations

import statistics

import torch
from tqdm.auto import tqdm

from fthss.benchmarks.chains import bench_engine, bytes_per_token, stage_b_request
from fthss.benchmarks.output import device_name
from fthss.errors import ConfigError
from fthss.models.base import BaseModel

# Peak memory bandwidth, GB/s, by a fragment of torch.cuda.get_device_name; the first match
# wins, so a variant comes before its family.
BANDWIDTH_GBS = (("H100 PCIe", 2000), ("H100 NVL", 3900), ("H100", 3350), ("H200", 4800),
                 ("A100 80GB PCIe", 1935), ("A100-SXM4-80GB", 2039))


def known_bandwidth_gbs(device: torch.device) -> float | None:
    """The device's peak memory bandwidth when it is in the table, else None."""
    name = device_name(device) if device.type == "cuda" else ""
    return next((gbs for fragment, gbs in BANDWIDTH_GBS if fragment in name), None)


def weight_bytes_read(base: BaseModel) -> int:
    """Weight bytes one decode step reads: every parameter once, but of an input embedding not
    tied to the output layer only the one row it looks up."""
    model = base.model
    total = sum(p.numel() * p.element_size() for p in model.parameters())  # tied ones once
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    if output is None or output.weight is not embedding:
        total -= (embedding.shape[0] - 1) * embedding.shape[1] * embedding.element_size()
    return total


def decode_speed(base: BaseModel, contexts: list[int], new_tokens: int = 64, repeats: int = 3,
                 prompt_tokens: int = 16, bandwidth_gbs: float | None = None,
                 progress: bool = False, compile: bool = False,
                 kinds: tuple[str, ...] = ("prompt",)) -> list[dict]:
    """One row per (context length, stage kind): shared mode's milliseconds per decoded token
    at batch 1 (stage B's time after its first token over the tokens after the first; median
    of `repeats` runs after a warm-up run) and the bandwidth floor for the bytes each step
    reads (the base's: a lora stage's deltas add a few MB more). The kinds take turns, run by
    run."""
    if new_tokens < 2:
        raise ConfigError(f"new tokens {new_tokens}: the time per token needs at least 2")
    engines = {kind: bench_engine(base, ["A", "B"], prompt_tokens, compile=compile, kind=kind)
               for kind in kinds}
    weights = weight_bytes_read(base)
    rows = []
    for context in tqdm(contexts, desc="decode", disable=not progress):
        request = stage_b_request(base, context, new_tokens, prompt_tokens)
        by_kind = {kind: [] for kind in kinds}
        for _ in range(repeats + 1):
            for kind, engine in engines.items():
                by_kind[kind].append(engine.run([request], "shared")[0].steps[1].stats)
        rows += [_decode_row(base, context, kind, new_tokens, runs[1:], weights, bandwidth_gbs)
                 for kind, runs in by_kind.items()]
    return rows


def _decode_row(base: BaseModel, context: int, kind: str, new_tokens: int, runs: list,
                weights: int, bandwidth_gbs: float | None) -> dict:
    """One (context, kind) row of `decode_speed` from its timed runs' step statistics."""
    ms = statistics.median(1000 * (r.wall_s - r.time_to_first_token_s) / (new_tokens - 1)
                           for r in runs)
    # the context grows by one token a step: on average the cache held at the end of the step
    # less half the new tokens
    kv = runs[0].kv_bytes - new_tokens // 2 * bytes_per_token(base)
    floor = None if bandwidth_gbs is None else 1000 * (weights + kv) / (bandwidth_gbs * 1e9)
    return {"context_tokens": context, "kind": kind, "new_tokens": new_tokens,
            "ms_per_token": ms, "weight_bytes": weights, "kv_bytes": kv,
            "bandwidth_gbs": bandwidth_gbs, "floor_ms_per_token": floor,
            "share_of_floor": None if floor is None else floor / ms, "repeats": len(runs)}
