"""Continuous against dynamic batching in process, without the server: where the time goes.

`concurrency` closed-loop members run the mixed multi-round load of `fthss bench serve
--chain-rounds 1 2 3` (A's 1,000 tokens given, B writing 16, chains of 1-3 rounds) on
`small-llama`: dynamic batching runs them `concurrency` at a time with `engine.run`; continuous
keeps one `RunningBatch` full, a new request joining whenever one leaves. Printed per policy:
requests/s, seconds in prefill and decode, and the prefill's work: tokens run (padding
included) and token-columns attended over (each group's rows x width x columns read), the
figure the row grouping of `fthss.engine.cache.append` is about (docs/design.md).

usage: OMP_NUM_THREADS=1 python scripts/closed_loop_batching.py --concurrency 8 --mode shared \
           --late-share 0.5
"""
import argparse
import collections
import functools
import json
import random
import time

from fthss.benchmarks.chains import bench_engine
from fthss.benchmarks.serve import bench_request
from fthss.engine import cache
from fthss.engine.engine import MODES, ChainEngine, RunningBatch
from fthss.models.presets import preset_base

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--concurrency", type=int, default=8)
parser.add_argument("--mode", default="shared", choices=MODES)
parser.add_argument("--requests-per-member", type=int, default=4)
parser.add_argument("--late-share", type=float, default=0.0,
                    help="share of new requests that join one step late (as a server's clients' "
                    "next requests miss a step boundary), so members' steps fall out of phase")
args = parser.parse_args()

seconds, work = collections.Counter(), collections.Counter()


def timed(owner, name):
    method = getattr(owner, name)

    @functools.wraps(method)
    def wrapper(*a, **k):
        started = time.perf_counter()
        try:
            return method(*a, **k)
        finally:
            seconds[name.strip("_")] += time.perf_counter() - started
    setattr(owner, name, wrapper)


timed(ChainEngine, "_prefill")
timed(ChainEngine, "_decode")
append_rows = cache.ChainCache._append_rows


def counted(self, rows, first, input_ids, *rest):
    count, width = input_ids.shape
    work["prefill_tokens"] += count * width
    work["token_columns"] += count * width * (first + width)
    return append_rows(self, rows, first, input_ids, *rest)


cache.ChainCache._append_rows = counted

base = preset_base("small-llama")
members = args.concurrency
engine = bench_engine(base, ["A", "B"], 16, members)
requests = [bench_request(base, 1000, 16, 16, False, rounds) for rounds in (1, 2, 3)]
total = args.requests_per_member * members
engine.run(requests[:1] * 2, args.mode)  # warm-up
for policy in ("dynamic", "continuous"):
    seconds.clear()
    work.clear()
    started = time.perf_counter()
    if policy == "dynamic":
        for first in range(0, total, members):
            engine.run([requests[j % 3] for j in range(first, first + members)], args.mode)
    else:
        batch, done, late = RunningBatch(engine, args.mode), 0, []
        draws = random.Random(0)
        for sent in range(members):
            batch.join(requests[sent % 3], sent)
        sent = members
        while done < total:
            finished = batch.step()
            done += len(finished)
            for index in late:
                batch.join(requests[index % 3], index)
            late = []
            for _ in finished:
                if sent < total:
                    if draws.random() < args.late_share:
                        late.append(sent)
                    else:
                        batch.join(requests[sent % 3], sent)
                    sent += 1
    wall = time.perf_counter() - started
    print(json.dumps({"policy": policy, "mode": args.mode, "concurrency": members,
                      "late_share": args.late_share if policy == "continuous" else None,
                      "requests_per_s": round(total / wall, 3),
                      **{f"{k}_s": round(v, 2) for k, v in seconds.items()}, **work}))
