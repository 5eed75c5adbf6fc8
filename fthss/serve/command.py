"""`fthss serve`: load a base and stages as `fthss run` does, and serve them over HTTP."""

from __future__ import annotations

import os

from fthss.engine.engine import BATCHING
from fthss.options import (
    add_base_arguments,
    add_stage_argument,
    load_base,
    load_stages,
    positive_int,
)


def retrieval_step_input(retriever, passages: int):
    """The between-steps callable `--corpus` attaches: a step after the first whose request
    leaves `input` out reads the passages retrieved for the previous step's output (one query
    per line, `passages` per query), as rewrite_qa's and active_rag's stage B do."""
    from fthss.tasks.retrieval_tasks import passages_text, search_queries

    def retrieve(request, k, outputs):
        if k == 0 or request.steps[k].input is not None:
            return None
        return passages_text(retriever, search_queries(outputs[-1]), passages)
    return retrieve


def cmd_serve(args) -> int:
    from fthss.engine.engine import ChainEngine

    try:
        from fthss.serve.api import create_app
        from fthss.serve.server import serve
    except ImportError as err:
        raise ModuleNotFoundError(f"fthss serve needs the serve extra: pip install "
                                  f"'fthss[serve]' ({err})") from None

    base = load_base(args)
    engine = ChainEngine(base, load_stages(args.stage, base), max_new_tokens=args.max_new_tokens,
                         max_request_tokens=args.max_request_tokens)
    step_input = None
    if args.corpus:
        from fthss.retrieval.bm25 import BM25Retriever

        step_input = retrieval_step_input(BM25Retriever.from_file(args.corpus), args.passages)
    app = create_app(engine, step_input, max_batch_size=args.max_batch_size,
                     max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                     batching=args.batching,
                     api_key=args.api_key or os.environ.get("FTHSS_API_KEY") or None,
                     max_body_bytes=args.max_body_bytes)
    serve(app, args.host, args.port, args.log_level)
    return 0


def add_serve_command(commands) -> None:
    parser = commands.add_parser("serve", help="serve chains over HTTP (POST /v1/chains), "
                                 "batched under load")
    add_base_arguments(parser)
    add_stage_argument(parser, True, "a stage folder (repeat for each stage)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to bind (default: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--max-batch-size", type=positive_int, default=32,
                        help="requests run together at most")
    parser.add_argument("--max-wait-ms", type=float, default=10.0,
                        help="how long a request waits for batch-mates")
    parser.add_argument("--batching", choices=BATCHING, default="dynamic",
                        help="dynamic: requests that arrive while a batch runs wait for the next "
                        "one; continuous: they join the running batch at its next step boundary "
                        "(no faster than dynamic on the loads measured: docs/benchmarks.md)")
    parser.add_argument("--max-queue", type=positive_int, default=1024,
                        help="requests waiting beyond this get 503 with Retry-After")
    parser.add_argument("--api-key", default=None, help="bearer token required on /v1/chains "
                        "and /metrics (default: env FTHSS_API_KEY, better: a command line is "
                        "visible to other users; neither: no token needed)")
    parser.add_argument("--max-body-bytes", type=positive_int, default=1 << 20,
                        help="larger request bodies get 413")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64,
                        help="per-step limit unless the request sets max_new_tokens")
    parser.add_argument("--max-request-tokens", type=positive_int, default=None,
                        help="K/V slots one request may hold; a request that needs more fails "
                        "alone (400)")
    parser.add_argument("--corpus", default=None, help="BM25 corpus JSONL: a step after the "
                        "first with no input reads passages retrieved for the previous output")
    parser.add_argument("--passages", type=positive_int, default=1,
                        help="--corpus: passages per query")
    parser.add_argument("--log-level", default="info",
                        choices=("critical", "error", "warning", "info", "debug"),
                        help="uvicorn's log level")
    parser.set_defaults(func=cmd_serve)
