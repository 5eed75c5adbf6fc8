"""`fthss bench latency | memory | throughput | decode | serve`: the command-line side of the
benchmarks (options, tables, the JSON record and plots); the measurements live in `chains`,
`hf_peft`, `decode` and `serve`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from fthss.benchmarks.chains import BENCH_KINDS, SYSTEMS
from fthss.engine.engine import BATCHING, MODES
from fthss.options import add_base_arguments, load_base, positive_float, positive_int


def _bench_result(args, base, **results) -> dict:
    from fthss.benchmarks.output import record

    options = {k: v for k, v in vars(args).items()
               if k not in ("func", "argv", "command", "bench_command")}
    return {**record(args.bench_command, args.argv, options, base), **results}


def _emit(args, base, tables: list[str], **results) -> int:
    """Print the tables and where the record went (or, with --json, the record alone) and write
    the JSON record to --out."""
    from fthss.benchmarks.output import emit

    emit(_bench_result(args, base, **results), tables, args.out, as_json=args.json)
    return 0


def _ms(key: str) -> Callable[[dict], str]:
    return lambda row: f"{1000 * row[key]:.1f}"


def _mib(key: str) -> Callable[[dict], str]:
    return lambda row: f"{row[key] / 2**20:.2f}"


def _cell(key: str, form: str = "") -> Callable[[dict], str]:
    return lambda row: "-" if row[key] is None else format(row[key], form)


def _timed(func: Callable) -> Callable:
    """A timed benchmark's options. `--compile`: a shape that would recompile past torch's
    limit raises instead of running that shape eager (a figure labelled compiled must come
    from compiled code). `--profile`: the benchmark runs under torch.profiler."""
    def run(args) -> int:
        from fthss.benchmarks.output import profiled

        if args.compile:
            from torch import _dynamo

            _dynamo.config.fail_on_recompile_limit_hit = True
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        with profiled(args.out if args.profile else None, device):
            return func(args)
    return run


def cmd_bench_latency(args) -> int:
    from fthss.benchmarks import chains, figures
    from fthss.benchmarks.output import table

    base = load_base(args)
    rows = chains.stage_b_latency(base, args.lengths, args.new_tokens, args.repeats,
                                  args.prompt_tokens, tuple(args.systems), progress=True,
                                  compile=args.compile, kinds=tuple(args.kinds))
    ratios = chains.latency_ratios(rows)
    routing = chains.routing_cost(rows, "intermediate_tokens", ("latency_s", "ttft_s"))
    others = [s for s in args.systems if s != "shared"]
    ratio_columns = [("intermediate", _cell("intermediate_tokens")), ("kind", _cell("kind"))] + [
        (f"{mode}/shared {what}", lambda r, m=mode, k=key: f"{r[k][m]:.2f}x" if m in r[k] else "-")
        for mode in others for what, key in (("latency", "latency_ratio"), ("TTFT", "ttft_ratio"))
    ] + [(f"strongest/shared {label}",
          lambda r, w=what: "{ratio:.2f}x ({system})".format(**r["strongest_baseline"][w]))
         for label, what in (("latency", "latency"), ("TTFT", "ttft"))]
    tables = [table(rows, [("system", _cell("mode")), ("kind", _cell("kind")),
                           ("intermediate", _cell("intermediate_tokens")),
                           ("latency ms", _ms("latency_s")), ("TTFT ms", _ms("ttft_s")),
                           ("prefilled", _cell("prefilled_tokens"))])]
    if ratios:
        tables.append(table(ratios, ratio_columns))
    if routing:
        tables.append(table(routing, [("intermediate", _cell("intermediate_tokens")),
                                      ("system", _cell("mode")),
                                      ("lora/prompt latency", _cell("latency_s_ratio", ".2f")),
                                      ("lora/prompt TTFT", _cell("ttft_s_ratio", ".2f"))]))
    figures.latency(rows, Path(args.out).with_suffix(".png"))
    return _emit(args, base, tables, rows=rows, ratios=ratios, routing_cost=routing)


def cmd_bench_memory(args) -> int:
    from fthss.benchmarks import figures
    from fthss.benchmarks.chains import compress_qa_memory, kv_memory
    from fthss.benchmarks.output import table

    base = load_base(args)
    multi = kv_memory(base, args.stages, args.total_tokens, args.rounds, args.prompt_tokens,
                      progress=True)
    compress = compress_qa_memory(base, args.passage_tokens, args.compression_tokens,
                                  args.answer_tokens, args.prompt_tokens, progress=True)
    tables = [
        table(multi, [("stages", _cell("stages")), ("mode", _cell("mode")),
                      ("chain tokens", _cell("chain_tokens")), ("KV tokens", _cell("kv_tokens")),
                      ("KV MiB", _mib("kv_bytes"))]),
        table(compress, [("compress->QA", _cell("mode")), ("passages", _cell("passage_tokens")),
                         ("KV MiB after A", _mib("kv_bytes_after_a")),
                         ("KV MiB during B", _mib("kv_bytes_during_b")),
                         ("passage tokens held after A", _cell("passage_tokens_held_after_a")),
                         ("during B", _cell("passage_tokens_held_during_b"))])]
    figures.memory(multi, compress, Path(args.out).with_suffix(".png"))
    return _emit(args, base, tables, multi_round=multi, compress_qa=compress)


def cmd_bench_throughput(args) -> int:
    from fthss.benchmarks import chains, figures
    from fthss.benchmarks.output import table

    base = load_base(args)
    rows = chains.throughput(base, args.batch_sizes, args.intermediate_tokens, args.new_tokens,
                             args.repeats, args.prompt_tokens, progress=True,
                             compile=args.compile)
    ratios = chains.throughput_ratios(rows)
    tables = [table(rows, [("batch", _cell("batch")), ("mode", _cell("mode")),
                           ("stage B s", _cell("stage_b_s", ".3f")),
                           ("requests/s", _cell("requests_per_s", ".2f")),
                           ("tokens/s", _cell("tokens_per_s", ".1f")),
                           ("chain s", _cell("chain_s", ".3f"))]),
              table(ratios, [("batch", _cell("batch")),
                             ("shared/text requests/s", _cell("requests_ratio", ".2f"))])]
    figures.throughput(rows, Path(args.out).with_suffix(".png"))
    return _emit(args, base, tables, rows=rows, ratios=ratios)


def cmd_bench_decode(args) -> int:
    from fthss.benchmarks.chains import routing_cost
    from fthss.benchmarks.decode import decode_speed, known_bandwidth_gbs
    from fthss.benchmarks.output import table

    base = load_base(args)
    bandwidth = args.bandwidth_gbs or known_bandwidth_gbs(base.device)
    rows = decode_speed(base, args.contexts, args.new_tokens, args.repeats, args.prompt_tokens,
                        bandwidth, progress=True, compile=args.compile, kinds=tuple(args.kinds))
    routing = routing_cost(rows, "context_tokens", ("ms_per_token",))
    note = None if bandwidth else (f"memory bandwidth of {base.device} unknown: pass "
                                   "--bandwidth-gbs for the floor")
    tables = [table(rows, [("context", _cell("context_tokens")), ("kind", _cell("kind")),
                           ("ms/token", _cell("ms_per_token", ".2f")),
                           ("weights MB", lambda r: f"{r['weight_bytes'] / 1e6:.1f}"),
                           ("KV MB", lambda r: f"{r['kv_bytes'] / 1e6:.1f}"),
                           ("floor ms", _cell("floor_ms_per_token", ".2f")),
                           ("share of floor", _cell("share_of_floor", ".1%"))])]
    if routing:
        tables.append(table(routing, [
            ("context", _cell("context_tokens")),
            ("lora/prompt ms/token", _cell("ms_per_token_ratio", ".2f"))]))
    if note:
        tables.append(note)
    return _emit(args, base, tables, rows=rows, routing_cost=routing, note=note)


def _add_kinds(parser) -> None:
    parser.add_argument("--kinds", nargs="+", choices=BENCH_KINDS, default=["prompt"],
                        help="stage kinds, side by side in one run: 'prompt lora' measures "
                        "what routing every token through its stage's LoRA deltas costs")


def cmd_bench_serve(args) -> int:
    from fthss.benchmarks.output import table
    from fthss.benchmarks.serve import mode_ratios, serve_throughput

    base = load_base(args)
    rows = serve_throughput(base, args.concurrency, args.intermediate_tokens, args.new_tokens,
                            args.prompt_tokens, args.rounds, args.max_wait_ms, args.repeats,
                            args.generate_intermediate, progress=True, compile=args.compile,
                            batchings=tuple(args.batching),
                            chain_rounds=tuple(args.chain_rounds), modes=tuple(args.modes))
    ratios = mode_ratios(rows)
    tables = [table(rows, [("batching", _cell("batching")), ("mode", _cell("mode")),
                           ("clients", _cell("concurrency")),
                           ("requests/s", _cell("requests_per_s", ".2f")),
                           ("p50 ms", _ms("latency_p50_s")), ("p99 ms", _ms("latency_p99_s")),
                           ("TTFT p50 ms", _ms("ttft_p50_s")), ("TTFT p99 ms", _ms("ttft_p99_s")),
                           ("mean batch", _cell("mean_batch", ".1f")),
                           ("stage B ms", _ms("stage_b_s")),
                           ("offline requests/s", _cell("offline_requests_per_s", ".2f")),
                           ("of offline", _cell("share_of_offline", ".0%"))]),
              table(ratios, [("batching", _cell("batching")), ("clients", _cell("concurrency")),
                             ("strongest baseline", _cell("baseline")),
                             ("shared/baseline requests/s", _cell("requests_ratio", ".2f")),
                             ("baseline/shared stage B", _cell("stage_b_ratio", ".2f"))])]
    return _emit(args, base, tables, rows=rows, ratios=ratios)


def add_bench_commands(commands) -> None:
    bench = commands.add_parser("bench", help="speed and memory: text vs shared mode (and "
                                "PEFT + generate), JSON and plots")
    kinds = bench.add_subparsers(dest="bench_command", required=True)

    def add(name, func, help, repeats):
        parser = kinds.add_parser(name, help=help)
        add_base_arguments(parser)
        parser.add_argument("--prompt-tokens", type=positive_int, default=16,
                            help="virtual tokens of every stage")
        if repeats is not None:  # a timed benchmark
            parser.add_argument("--repeats", type=positive_int, default=repeats,
                                help="timed runs after a warm-up run (the median is reported)")
            parser.add_argument("--compile", action="store_true",
                                help="the engine's compiled decode step (CUDA graphs on a GPU)")
            parser.add_argument("--profile", action="store_true",
                                help="run under torch.profiler: the top operators by self time "
                                "to OUT.profile.txt, the trace to OUT.trace.json.gz (keep the "
                                "run short: one length, --repeats 1)")
            func = _timed(func)
        parser.add_argument("--out", default=f"runs/bench/{name}.json",
                            help="JSON record (a plot beside it as .png)")
        parser.add_argument("--json", action="store_true",
                            help="print the JSON record instead of the tables")
        parser.set_defaults(func=func)
        return parser

    latency = add("latency", cmd_bench_latency, "stage-B latency and time to first token "
                  "against intermediate length, batch 1", 3)
    latency.add_argument("--lengths", type=positive_int, nargs="+",
                         default=[250, 500, 1000, 3000], help="intermediate tokens")
    latency.add_argument("--new-tokens", type=positive_int, default=16,
                         help="tokens stage B writes (forced)")
    _add_kinds(latency)
    latency.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS),
                         help="shared and text: the engine's modes; hf-peft: PEFT + generate")

    memory = add("memory", cmd_bench_memory, "KV memory: multi-round chains of 1, 2, 3 "
                 "stages; compress -> QA", None)
    memory.add_argument("--stages", type=positive_int, nargs="+", default=[1, 2, 3],
                        help="stages in the multi-round chain")
    memory.add_argument("--total-tokens", type=positive_int, default=1000,
                        help="tokens the multi-round chain generates in all")
    memory.add_argument("--rounds", type=positive_int, default=2,
                        help="rounds of the multi-round chain")
    memory.add_argument("--passage-tokens", type=positive_int, default=800,
                        help="compress -> QA: stage A's passages")
    memory.add_argument("--compression-tokens", type=positive_int, default=150,
                        help="compress -> QA: tokens stage A writes")
    memory.add_argument("--answer-tokens", type=positive_int, default=16,
                        help="compress -> QA: tokens stage B writes")

    throughput = add("throughput", cmd_bench_throughput, "requests/s and tokens/s of a "
                     "2-stage chain's stage B against batch size", 2)
    throughput.add_argument("--batch-sizes", type=positive_int, nargs="+",
                            default=[1, 8, 32, 64],
                            help="batch sizes, side by side")
    throughput.add_argument("--intermediate-tokens", type=positive_int, default=1000,
                            help="stage A's output, given")
    throughput.add_argument("--new-tokens", type=positive_int, default=16,
                            help="tokens stage B writes per request (forced)")

    decode = add("decode", cmd_bench_decode, "ms per decoded token (batch 1) against the "
                 "memory-bandwidth floor", 3)
    decode.add_argument("--contexts", type=positive_int, nargs="+", default=[1000],
                        help="context tokens before the decoded ones")
    decode.add_argument("--new-tokens", type=positive_int, default=64,
                        help="tokens decoded per run (forced)")
    _add_kinds(decode)
    decode.add_argument("--bandwidth-gbs", type=positive_float, default=None,
                        help="device memory bandwidth, GB/s (default: known GPUs by name)")

    serve = add("serve", cmd_bench_serve, "a live `fthss serve` under 1, 8, 32, 64 concurrent "
                "clients against offline engine.run throughput", 1)
    serve.add_argument("--concurrency", type=positive_int, nargs="+", default=[1, 8, 32, 64],
                       help="concurrent clients (the offline ceiling runs batches this size)")
    serve.add_argument("--intermediate-tokens", type=positive_int, default=1000,
                       help="stage A's output: given, unless --generate-intermediate")
    serve.add_argument("--generate-intermediate", action="store_true",
                       help="stage A writes its intermediate instead of having it given")
    serve.add_argument("--new-tokens", type=positive_int, default=16,
                       help="tokens stage B writes per request (forced)")
    serve.add_argument("--rounds", type=positive_int, default=3,
                       help="requests per point: rounds × concurrency")
    serve.add_argument("--max-wait-ms", type=float, default=10.0,
                       help="the server's wait for batch-mates")
    serve.add_argument("--chain-rounds", type=positive_int, nargs="+", default=[1],
                       help="rounds of the chain (A, B repeated), the clients' requests cycling "
                       "through them: '1 2 3' mixes chains of 2, 4 and 6 steps")
    serve.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                       help="modes measured: shared, and the baselines text (re-encoding) and "
                       "text-cached (a prefix cache per stage); ratios are taken against the "
                       "faster baseline")
    serve.add_argument("--batching", nargs="+", choices=BATCHING, default=["dynamic"],
                       help="the servers' batching policies, measured in turn in one run "
                       "('continuous dynamic' compares them)")
