"""`fthss bench serve`: the HTTP server under load, against the engine run offline.

A live server (`fthss.serve`, uvicorn in a thread of this process) serves the two-stage chain of
`fthss bench throughput` (the question, stage A's output of L tokens given, stage B writing
exactly `new_tokens`), or a mix of multi-round chains of it (`chain_rounds`: A, B repeated). An
httpx asyncio load generator keeps `concurrency` clients busy, each posting its next request
(streamed, so time to first token is seen by the client) as soon as its last reply is in, for
`rounds` × `concurrency` requests per point. Per (batching, mode, concurrency), with a server of
each batching policy (`fthss.serve.scheduler`) in turn: requests/s, p50/p99 latency and time to
first token as clients see them, the mean batch the server ran (members per engine step), stage
B's median wall time inside the server, and the ceiling: `engine.run` on a batch of
`concurrency` requests offline (whole chain; measured just before each point, on an engine of
its own with the same base and stages), of which the server reaches `share_of_offline`.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import httpx
from tqdm.auto import tqdm

from fthss.benchmarks.chains import bench_engine, stage_b_request
from fthss.engine.engine import MODES, ChainEngine
from fthss.layout.chain import ChainSample, Step
from fthss.models.base import BaseModel

# the baselines shared mode is compared with: re-encoding text, and text with a prefix cache
# per stage (which saves, on multi-round chains, what the rounds before a stage's last step
# cost it)
BASELINES = ("text", "text-cached")


def bench_request(base: BaseModel, intermediate_tokens: int, new_tokens: int,
                  prompt_tokens: int, generate_intermediate: bool, rounds: int = 1
                  ) -> ChainSample:
    """The throughput benchmark's chain over `rounds` rounds; `generate_intermediate`: stage A
    writes its `intermediate_tokens` instead of having them given."""
    request = stage_b_request(base, intermediate_tokens, new_tokens, prompt_tokens, rounds)
    if generate_intermediate:
        request.steps[::2] = [Step("A", max_new_tokens=intermediate_tokens,
                                   min_new_tokens=intermediate_tokens) for _ in range(rounds)]
    return request


def percentile(values: list[float], share: float) -> float:
    """The nearest-rank percentile (`share` in [0, 1]) of `values`."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]


async def _one(client: httpx.AsyncClient, body: dict) -> tuple[float, float, dict]:
    """Post `body` streamed: (latency, time to first token event, the reply)."""
    started, first, reply, event = time.perf_counter(), None, None, None
    async with client.stream("POST", "/v1/chains", json={**body, "stream": True}) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
                if event == "tokens" and first is None:
                    first = time.perf_counter() - started
            elif line.startswith("data: ") and event == "done":
                reply = httpx.Response(200, content=line.removeprefix("data: ")).json()
    if reply is None or reply["error"]:
        raise RuntimeError(f"the server failed a request: {reply}")
    return time.perf_counter() - started, first, reply


async def drive(base_url: str, bodies: list[dict], concurrency: int, requests: int) -> dict:
    """`requests` posts from `concurrency` clients, request j posting `bodies[j % len(bodies)]`;
    requests/s and client-side latency and time to first token (p50, p99), and the median wall
    time of each reply's last step (stage B)."""
    runs, left = [], iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:
        async def client_loop():
            for j in left:
                runs.append(await _one(client, bodies[j % len(bodies)]))
        started = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    latency, ttft = [r[0] for r in runs], [r[1] for r in runs]
    return {"requests": requests, "seconds": seconds, "requests_per_s": requests / seconds,
            "latency_p50_s": percentile(latency, 0.5), "latency_p99_s": percentile(latency, 0.99),
            "ttft_p50_s": percentile(ttft, 0.5), "ttft_p99_s": percentile(ttft, 0.99),
            "stage_b_s": statistics.median(r[2]["steps"][-1]["stats"]["wall_s"] for r in runs)}


def offline_requests_per_s(engine, requests: list[ChainSample], batch: int, mode: str,
                           repeats: int) -> float:
    """`engine.run` on a batch of `batch` requests (request j is `requests[j % len(requests)]`)
    at once: requests/s of the whole chains (median over `repeats` runs after a warm-up run)."""
    batch_requests = [requests[j % len(requests)] for j in range(batch)]
    seconds = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        engine.run(batch_requests, mode)
        seconds.append(time.perf_counter() - started)
    return batch / statistics.median(seconds[1:])


def _batch_totals(metrics) -> tuple[float, float]:
    """(engine steps run, members in them) so far, from a server's metrics."""
    samples = metrics.batch_size.collect()[0].samples
    return tuple(sum(s.value for s in samples if s.name.endswith(suffix))
                 for suffix in ("_count", "_sum"))


def serve_throughput(base: BaseModel, concurrencies: list[int], intermediate_tokens: int = 1000,
                     new_tokens: int = 16, prompt_tokens: int = 16, rounds: int = 3,
                     max_wait_ms: float = 10.0, repeats: int = 1,
                     generate_intermediate: bool = False, modes: tuple[str, ...] = MODES,
                     progress: bool = False, compile: bool = False,
                     batchings: tuple[str, ...] = ("dynamic",),
                     chain_rounds: tuple[int, ...] = (1,)) -> list[dict]:
    """One row per (batching, mode, concurrency): the server's figures (`drive`), the mean
    batch it ran, and the offline ceiling at batch = concurrency, measured just before on an
    engine of the same base and stages (the server's worker owns its own), so that a machine
    whose load drifts slows both alike. The server batches up to the largest concurrency.
    `chain_rounds`: request j's chain runs `chain_rounds[j % len(chain_rounds)]` rounds; with
    mixed lengths a batch's members finish at different steps (docs/benchmarks.md measures
    both batching policies on such a mix)."""
    from fthss.serve import create_app, running

    requests = [bench_request(base, intermediate_tokens, new_tokens, prompt_tokens,
                              generate_intermediate, r) for r in chain_rounds]
    engine = bench_engine(base, ["A", "B"], prompt_tokens, max(concurrencies), compile)
    offline_engine = ChainEngine(base, list(engine.stages.values()), batch_size=max(concurrencies),
                                 compile=compile)
    bodies = [{**request.to_json(), "id": "bench"} for request in requests]
    cases = [(b, mode, c) for b in batchings for mode in modes for c in concurrencies]
    rows, bar = [], tqdm(total=len(cases), desc="offline, then server", disable=not progress)
    for batching in batchings:
        app = create_app(engine, max_batch_size=max(concurrencies), max_wait_ms=max_wait_ms,
                         max_queue=max(concurrencies) * rounds, batching=batching)
        with running(app) as base_url:
            for mode in modes:  # a warm-up request per mode
                asyncio.run(drive(base_url, [{**bodies[0], "mode": mode}], 1, 1))
            for _, mode, concurrency in [case for case in cases if case[0] == batching]:
                offline = offline_requests_per_s(offline_engine, requests, concurrency, mode,
                                                 repeats)
                count, total = _batch_totals(app.state.metrics)
                figures = asyncio.run(drive(base_url, [{**b, "mode": mode} for b in bodies],
                                            concurrency, rounds * concurrency))
                count, total = (now - then for now, then in
                                zip(_batch_totals(app.state.metrics), (count, total),
                                    strict=True))
                rows.append({"batching": batching, "mode": mode, "concurrency": concurrency,
                             "intermediate_tokens": intermediate_tokens,
                             "new_tokens": new_tokens, "chain_rounds": list(chain_rounds),
                             "intermediate": "generated" if generate_intermediate else "given",
                             **figures, "mean_batch": total / count,
                             "offline_requests_per_s": offline,
                             "share_of_offline": figures["requests_per_s"] / offline})
                bar.update()
    bar.close()
    return rows


def mode_ratios(rows: list[dict]) -> list[dict]:
    """Per batching and concurrency: shared mode's requests/s over the strongest baseline's
    (the text mode of the same run with the most requests/s, named), and that baseline's
    stage-B time over shared mode's."""
    ratios = []
    for batching, concurrency in dict.fromkeys((r["batching"], r["concurrency"]) for r in rows):
        at = {r["mode"]: r for r in rows
              if (r["batching"], r["concurrency"]) == (batching, concurrency)}
        baselines = [mode for mode in BASELINES if mode in at]
        if "shared" in at and baselines:
            strongest = at[max(baselines, key=lambda mode: at[mode]["requests_per_s"])]
            ratios.append({"batching": batching, "concurrency": concurrency,
                           "baseline": strongest["mode"], "requests_ratio":
                           at["shared"]["requests_per_s"] / strongest["requests_per_s"],
                           "stage_b_ratio": strongest["stage_b_s"] / at["shared"]["stage_b_s"]})
    return ratios
