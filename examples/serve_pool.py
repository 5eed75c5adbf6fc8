"""Spread chain requests over several `fthss serve` processes (one per device), the smallest
load balancer: each request goes to the next server in turn; a server that answers 503 (queue
full or draining) or cannot be reached is skipped for that request, which the next one takes.
Replies are written in input order, as `fthss run` writes its results.

    fthss serve --base DIR --stage A --stage B --device cuda:0 --port 8001 &
    fthss serve --base DIR --stage A --stage B --device cuda:1 --port 8002 &
    python examples/serve_pool.py --server http://127.0.0.1:8001 --server http://127.0.0.1:8002 \
        --input requests.jsonl --output replies.jsonl --concurrency 16

In production put any HTTP load balancer (nginx `upstream`, HAProxy, a cloud one) in front of
the servers instead, with `/health` as its health check: it answers 503 while a server drains.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
from pathlib import Path

import httpx


async def spread(servers: list[str], bodies: list[dict], concurrency: int,
                 api_key: str | None = None) -> list[dict]:
    """Post every body to the servers in turn from `concurrency` clients; one reply each (with
    the server that answered under `"server"`). Raises if every server refuses a request."""
    turn = itertools.cycle(range(len(servers)))
    replies: list = [None] * len(bodies)
    todo = iter(range(len(bodies)))
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(timeout=600, headers=headers) as client:
        async def worker():
            for i in todo:
                for _ in servers:  # each server at most once per request
                    server = servers[next(turn)]
                    try:
                        response = await client.post(f"{server}/v1/chains", json=bodies[i])
                    except httpx.TransportError:
                        continue
                    if response.status_code != 503:
                        replies[i] = {**response.json(), "server": server}
                        break
                else:
                    raise RuntimeError(f"request {i}: every server refused it")
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return replies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", action="append", required=True, help="a server's base URL")
    parser.add_argument("--input", type=Path, required=True, help="requests, one JSON a line")
    parser.add_argument("--output", type=Path, required=True, help="replies, in input order")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args()
    bodies = [json.loads(line) for line in args.input.read_text().splitlines() if line.strip()]
    replies = asyncio.run(spread(args.server, bodies, args.concurrency, args.api_key))
    args.output.write_text("".join(json.dumps(r) + "\n" for r in replies))
    counts = {s: sum(r["server"] == s for r in replies) for s in args.server}
    print(f"{len(replies)} replies -> {args.output}; per server: {counts}")


if __name__ == "__main__":
    main()
