"""`fthss serve` against live servers (uvicorn in a thread; subprocesses for SIGTERM and for two
servers behind a client) on tiny-llama: replies equal to `engine.run` alone, streaming, errors
naming the field, a too-long request failing alone, 503 on a full queue, disconnects cancelling
their own work, the bearer token, the body limit, metrics, the drain, two processes behind
`examples/serve_pool.py`, and a load test."""

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import get_base

from fthss.cli import build_parser, main
from fthss.engine.engine import ChainEngine
from fthss.engine.sampling import SamplingConfig
from fthss.layout.chain import chain_from_json
from fthss.prompts.stage import Stage, StageConfig
from fthss.serve import create_app
from fthss.serve import running as live


@pytest.fixture(scope="module")
def stages():
    base = get_base("tiny-llama")
    return [Stage.create(StageConfig("A", "prompt", 3), base, seed=1),
            Stage.create(StageConfig("B", "prefix", 4), base, seed=2)]


def new_engine(stages) -> ChainEngine:
    return ChainEngine(get_base("tiny-llama"), stages)


@pytest.fixture(scope="module")
def reference(stages):
    """An engine of its own for the replies' references (a server's worker owns its engine)."""
    return new_engine(stages)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def url(stages):
    with live(create_app(new_engine(stages), max_wait_ms=5)) as base_url:
        yield base_url


def request(i: int = 0, **extra) -> dict:
    return {"id": f"q{i}", "shared": f"question {i}?",
            "steps": [{"stage": "A", "input": f"passage {i % 7} " * (1 + i % 3),
                       "max_new_tokens": 2 + i % 3},
                      {"stage": "B", "max_new_tokens": 1 + i % 4}], **extra}


def alone(engine, body: dict, mode: str = "shared", sampling=None):
    """The request run alone through `engine.run`, as the server replies."""
    chain = chain_from_json({k: body[k] for k in ("id", "shared", "steps")}, "test")
    [result] = engine.run([chain], mode, sampling)
    return result


def assert_reply_equals(reply: dict, result) -> None:
    assert reply["error"] is None and result.error is None
    assert reply["id"] == result.id and reply["output"] == result.output
    assert [(s["stage"], s["output"]) for s in reply["steps"]] == [
        (s.stage, s.output) for s in result.steps]
    assert [s["stats"]["decoded_tokens"] for s in reply["steps"]] == [
        len(s.output_ids) for s in result.steps]


def metric(base_url: str, name: str, headers=None) -> float:
    text = httpx.get(f"{base_url}/metrics", headers=headers).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


async def post_all(base_url: str, bodies: list[dict], concurrency: int) -> list[httpx.Response]:
    """`bodies` posted by `concurrency` clients at once, each taking the next body."""
    replies: list = [None] * len(bodies)
    todo = iter(range(len(bodies)))
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as client:
        async def worker():
            for i in todo:
                replies[i] = await client.post("/v1/chains", json=bodies[i])
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return replies


@pytest.mark.parametrize("mode", ["shared", "text", "text-cached"])
def test_reply_equals_the_request_run_alone(url, reference, mode):
    body = request(3, mode=mode)
    reply = httpx.post(f"{url}/v1/chains", json=body, timeout=60)
    assert reply.status_code == 200
    assert reply.json()["mode"] == mode
    assert_reply_equals(reply.json(), alone(reference, body, mode))
    assert set(reply.json()["steps"][0]["stats"]) >= {"prefilled_tokens", "kv_bytes",
                                                      "time_to_first_token_s"}


def test_sampled_requests_sample_as_alone_in_any_batch(url, reference):
    """Each request brings its seed: batched together, each samples what it would alone."""
    bodies = [request(i, temperature=1.0, top_p=0.9, seed=100 + i) for i in range(6)]
    replies = asyncio.run(post_all(url, bodies, concurrency=6))
    for body, reply in zip(bodies, replies, strict=True):
        assert_reply_equals(reply.json(), alone(reference, body, sampling=SamplingConfig(
            temperature=1.0, top_p=0.9, seed=body["seed"])))


def events(text: str) -> list[tuple[str, dict]]:
    out = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in fields:
            out.append((fields["event"], json.loads(fields["data"])))
    return out


def test_stream_sends_each_steps_tokens_then_the_reply(url, reference):
    body = request(5, steps=[{"stage": "A", "input": "doc", "max_new_tokens": 20},
                             {"stage": "B", "max_new_tokens": 12}], stream=True)
    reply = httpx.post(f"{url}/v1/chains", json=body, timeout=60)
    assert (reply.status_code == 200
            and reply.headers["content-type"].startswith("text/event-stream"))
    sent = events(reply.text)
    result = alone(reference, body)
    assert [name for name, _ in sent if name != "tokens"] == ["step", "step", "done"]
    for k, step in enumerate(result.steps):
        tokens = [data for name, data in sent if name == "tokens" and data["step"] == k]
        assert len(tokens) >= 2  # the first token, then at the engine's looks
        assert all(data["stage"] == step.stage for data in tokens)
        assert sum((data["token_ids"] for data in tokens), []) == step.output_ids
        [done] = [data for name, data in sent if name == "step" and data["step"] == k]
        assert done["stage"] == step.stage and done["output"] == step.output
    assert_reply_equals(sent[-1][1], result)


@pytest.mark.parametrize("body, status, names", [
    ({"shared": "q"}, 422, "steps"),
    ({"steps": [{"stage": "A", "max_new_tokens": "3"}]}, 422, "max_new_tokens"),
    ({"steps": [{"stage": "A", "colour": 1}]}, 422, "colour"),
    ({"steps": [{"stage": "A"}], "top_p": 0}, 422, "top_p"),
    ({"steps": [{"stage": "A"}], "mode": "fast"}, 422, "mode"),
    ({"steps": [{"stage": "a b"}]}, 422, "steps[0].stage"),
    ({"steps": [{"stage": "A", "max_new_tokens": 0}]}, 422, "steps[0].max_new_tokens"),
    ({"steps": [{"stage": "A"}, {"stage": "Z"}]}, 422, "steps[1].stage: no stage 'Z'"),
])
def test_a_malformed_request_gets_an_error_naming_the_field(url, body, status, names):
    reply = httpx.post(f"{url}/v1/chains", json=body)
    assert reply.status_code == status
    assert names in str(reply.json()["detail"]).replace("'", "") or names in str(reply.json())


def test_invalid_json_is_refused(url):
    reply = httpx.post(f"{url}/v1/chains", content=b"{not json",
                       headers={"content-type": "application/json"})
    assert reply.status_code == 422 and "json" in reply.text.lower()


def test_a_request_too_long_fails_alone(stages, reference):
    """Batched with two others (a long wait makes one batch of the three), the request past the
    model's positions gets 400 naming why; the others get what they would alone."""
    bodies = [request(1), request(2, shared="x" * 5000), request(3)]
    with live(create_app(new_engine(stages), max_wait_ms=500)) as base_url:
        replies = asyncio.run(post_all(base_url, bodies, concurrency=3))
        # one batch of the three: a step ran them together
        assert (metric(base_url, 'fthss_batch_size_bucket{le="2.0"}')
                < metric(base_url, "fthss_batch_size_count"))
        assert metric(base_url, 'fthss_requests_total{outcome="failed"}') == 1
    assert replies[1].status_code == 400
    assert "needs position" in replies[1].json()["error"] and replies[1].json()["output"] == ""
    for i in (0, 2):
        assert replies[i].status_code == 200
        assert_reply_equals(replies[i].json(), alone(reference, bodies[i]))


def test_a_raising_between_steps_callable_fails_its_request_alone(stages, reference):
    def step_input(chain, k, outputs):
        if chain.id == "q2" and k == 1:
            raise RuntimeError("retriever down")
        return None

    bodies = [request(1), request(2)]
    with live(create_app(new_engine(stages), step_input, max_wait_ms=300)) as base_url:
        replies = asyncio.run(post_all(base_url, bodies, concurrency=2))
    assert replies[1].status_code == 400 and "retriever down" in replies[1].json()["error"]
    assert_reply_equals(replies[0].json(), alone(reference, bodies[0]))


class Gate:
    """A between-steps callable that holds the worker at its first call for step `step` until
    opened, and records every (request id, step) it is asked about."""

    def __init__(self, step: int = 0):
        self.step, self.calls = step, []
        self.open, self.held = threading.Event(), threading.Event()

    def __call__(self, chain, k, outputs):
        self.calls.append((chain.id, k))
        if k == self.step and not self.held.is_set():
            self.held.set()
            assert self.open.wait(60)
        return None


def post_in_thread(base_url: str, body: dict) -> dict:
    """Post `body` from a thread; the returned dict gets its "reply" when done."""
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault(
        "reply", httpx.post(f"{base_url}/v1/chains", json=body, timeout=60)))
    thread.start()
    box["thread"] = thread
    return box


def wait_for(condition, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_full_queue_gets_503_with_retry_after(stages):
    gate = Gate()
    with live(create_app(new_engine(stages), gate, max_batch_size=1, max_wait_ms=0,
                         max_queue=1)) as base_url:
        first = post_in_thread(base_url, request(1))
        assert gate.held.wait(20)  # the worker runs the first request, held
        second = post_in_thread(base_url, request(2))
        wait_for(lambda: metric(base_url, "fthss_queue_length") == 1)
        third = httpx.post(f"{base_url}/v1/chains", json=request(3))
        assert third.status_code == 503 and third.headers["retry-after"] == "1"
        assert "queue is full" in third.json()["detail"]
        gate.open.set()
        for box in (first, second):
            box["thread"].join(60)
            assert box["reply"].status_code == 200
        assert metric(base_url, 'fthss_requests_total{outcome="rejected"}') == 1


@contextlib.contextmanager
def leaving_client(base_url: str, body: dict):
    """A client that sends a request on a raw socket and, at the end of the block, closes the
    connection without reading the reply."""
    host, port = base_url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/chains HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
        yield


def cancelled(base_url: str) -> float:
    return metric(base_url, 'fthss_requests_total{outcome="cancelled"}')


def test_a_client_that_leaves_cancels_its_own_work_only(stages, reference):
    """Running: the request whose client leaves ends at its next step boundary (the
    between-steps callable is not asked about its next step). Queued: it is never run. Its
    batch-mates' replies are what they would be alone."""
    gate = Gate(step=1)
    with live(create_app(new_engine(stages), gate, max_batch_size=2, max_wait_ms=1000)) as base_url:
        kept = post_in_thread(base_url, request(1))
        wait_for(lambda: metric(base_url, "fthss_queue_length") == 1)  # q1 first in the batch
        with leaving_client(base_url, request(2)):  # one batch with q1, held before step 1
            assert gate.held.wait(20)
            queued = post_in_thread(base_url, request(3))
            with leaving_client(base_url, request(4)):
                wait_for(lambda: metric(base_url, "fthss_queue_length") == 2)
            wait_for(lambda: cancelled(base_url) == 1)  # q4 left the queue
            assert metric(base_url, "fthss_queue_length") == 1
        time.sleep(0.2)  # the server sees q2's client gone
        gate.open.set()
        for box, body in ((kept, request(1)), (queued, request(3))):
            box["thread"].join(60)
            assert box["reply"].status_code == 200
            assert_reply_equals(box["reply"].json(), alone(reference, body))
        wait_for(lambda: cancelled(base_url) == 2)
    assert ("q2", 0) in gate.calls and ("q2", 1) not in gate.calls
    assert ("q1", 1) in gate.calls and ("q3", 1) in gate.calls
    assert not any(name == "q4" for name, _ in gate.calls)


@pytest.mark.parametrize("batching", ["continuous", "dynamic"])
def test_a_request_joins_the_running_batch_at_a_step_boundary(stages, reference, batching):
    """Continuous batching: a request posted while a three-step chain runs starts at that
    chain's next step boundary (one engine step runs both, at different steps); dynamic: it
    waits for the batch to end. Both replies are what each request gives alone."""
    gate = Gate(step=1)
    long = request(1)
    long["steps"].append({"stage": "A", "input": "more", "max_new_tokens": 3})
    app = create_app(new_engine(stages), gate, max_wait_ms=0, batching=batching)
    with live(app) as base_url:
        first = post_in_thread(base_url, long)
        assert gate.held.wait(20)  # q1 alone in its batch, before its step 1
        second = post_in_thread(base_url, request(2))
        wait_for(lambda: metric(base_url, "fthss_queue_length") == 1)
        gate.open.set()
        for box, body in ((first, long), (second, request(2))):
            box["thread"].join(60)
            assert box["reply"].status_code == 200
            assert_reply_equals(box["reply"].json(), alone(reference, body))
        together = (metric(base_url, "fthss_batch_size_count")
                    - metric(base_url, 'fthss_batch_size_bucket{le="1.0"}'))
    assert together == (1 if batching == "continuous" else 0)



def test_an_unknown_batching_policy_is_refused(stages):
    with pytest.raises(ValueError, match="unknown batching 'eager'; choose one of"):
        create_app(new_engine(stages), batching="eager")


def test_the_api_key_is_required_as_a_bearer_token(stages):
    with live(create_app(new_engine(stages), api_key="s3cret")) as base_url:
        post = f"{base_url}/v1/chains"
        assert httpx.post(post, json=request()).status_code == 401
        assert httpx.post(post, json={"steps": 1}).status_code == 401  # not even validated
        wrong = httpx.post(post, json=request(), headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        good = httpx.post(post, json=request(), headers={"Authorization": "Bearer s3cret"},
                          timeout=60)
        assert good.status_code == 200
        assert httpx.get(f"{base_url}/metrics").status_code == 401
        assert httpx.get(f"{base_url}/health").status_code == 200  # for load balancers


def test_a_large_body_gets_413(stages):
    with live(create_app(new_engine(stages), max_body_bytes=1000)) as base_url:
        reply = httpx.post(f"{base_url}/v1/chains", json=request(1, shared="x" * 2000))
        assert reply.status_code == 413
        assert httpx.post(f"{base_url}/v1/chains", json=request(1), timeout=60).status_code == 200


def test_health_and_metrics(url):
    health = httpx.get(f"{url}/health")
    assert health.status_code == 200 and health.json() == {"status": "ok", "stages": ["A", "B"]}
    before = metric(url, 'fthss_requests_total{outcome="ok"}')
    assert httpx.post(f"{url}/v1/chains", json=request(2), timeout=60).status_code == 200
    assert metric(url, 'fthss_requests_total{outcome="ok"}') == before + 1
    for name in ("fthss_queue_length", "fthss_batch_size_count", "fthss_tokens_prefilled_total",
                 "fthss_tokens_decoded_total", "fthss_request_latency_seconds_count",
                 "fthss_time_to_first_token_seconds_count", "fthss_kv_bytes_held"):
        assert name in httpx.get(f"{url}/metrics").text
    assert metric(url, "fthss_tokens_decoded_total") > 0
    assert metric(url, "fthss_time_to_first_token_seconds_count") > 0


@pytest.fixture
def stage_dirs(tmp_path):
    for name in "AB":
        assert main(["stage", "create", "--arch", "tiny-llama", "--name", name, "--tokens", "2",
                     "--out", str(tmp_path / name)]) == 0
    return [str(tmp_path / "A"), str(tmp_path / "B")]


def test_the_command_binds_localhost_and_reads_the_key_from_the_env(stage_dirs, monkeypatch):
    from fastapi.testclient import TestClient

    import fthss.serve.server

    argv = ["serve", "--arch", "tiny-llama", "--stage", stage_dirs[0], "--stage", stage_dirs[1],
            "--device", "cpu"]
    assert build_parser().parse_args(argv).host == "127.0.0.1"
    served = {}
    monkeypatch.setattr(fthss.serve.server, "serve",
                        lambda app, host, port, log_level: served.update(app=app, host=host))
    monkeypatch.setenv("FTHSS_API_KEY", "from-env")
    assert main(argv) == 0
    assert served["host"] == "127.0.0.1"
    client = TestClient(served["app"])  # no lifespan: the key is checked before the scheduler
    assert client.post("/v1/chains", json=request()).status_code == 401


def test_the_corpus_option_retrieves_for_a_step_without_input(tmp_path):
    from fthss.retrieval.bm25 import BM25Retriever
    from fthss.serve.command import retrieval_step_input

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"id": 1, "text": "Winter was shot in Oslo."}) + "\n"
                      + json.dumps({"id": 2, "text": "Rome has old bridges."}) + "\n")
    retrieve = retrieval_step_input(BM25Retriever.from_file(corpus), passages=1)
    chain = chain_from_json({"steps": [{"stage": "A"}, {"stage": "B"},
                                       {"stage": "B", "input": "given"}]}, "test")
    assert retrieve(chain, 0, []) is None  # the first step keeps its own input
    assert retrieve(chain, 1, ["film\nOslo"]) == "Winter was shot in Oslo."
    assert retrieve(chain, 2, ["Oslo", "x"]) is None  # the request gave this step's input


@contextlib.contextmanager
def server_process(stage_dirs: list[str], *options: str):
    """`fthss serve` on tiny-llama in a subprocess; yields (process, base URL) once healthy."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    stages = [option for path in stage_dirs for option in ("--stage", path)]
    process = subprocess.Popen([sys.executable, "-m", "fthss.cli", "serve", "--arch",
                                "tiny-llama", "--device", "cpu", *stages, "--port", str(port),
                                "--log-level", "warning", *options], env=env)
    base_url = f"http://127.0.0.1:{port}"
    try:
        def up():
            assert process.poll() is None, "the server exited"
            with contextlib.suppress(httpx.TransportError):
                return httpx.get(f"{base_url}/health").status_code == 200
        wait_for(up, timeout=120)
        yield process, base_url
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.slow  # a server process
def test_sigterm_drains_then_exits_0(stage_dirs):
    """Accepted requests finish; a request after SIGTERM gets 503; the process exits 0."""
    with server_process(stage_dirs, "--max-batch-size", "1") as (process, base_url):
        # 4 requests of 300 forced tokens, one per batch: seconds of work
        body = {"shared": "q", "steps": [{"stage": "A", "max_new_tokens": 300,
                                          "min_new_tokens": 300}]}
        accepted = [post_in_thread(base_url, {**body, "id": str(i)}) for i in range(4)]
        wait_for(lambda: metric(base_url, "fthss_queue_length") == 3)  # all 4 accepted
        process.send_signal(signal.SIGTERM)
        # the server acts on the signal at its next tick (0.1 s): /health turns 503 first
        wait_for(lambda: httpx.get(f"{base_url}/health").status_code == 503, timeout=10)
        refused = httpx.post(f"{base_url}/v1/chains", json=body)
        assert refused.status_code == 503 and "shutting down" in refused.json()["detail"]
        assert refused.headers["retry-after"] == "1"
        assert sum("reply" in box for box in accepted) < 4  # refused while work remained
        for box in accepted:
            box["thread"].join(60)
            assert box["reply"].status_code == 200
            assert box["reply"].json()["steps"][0]["stats"]["decoded_tokens"] == 300
        assert process.wait(30) == 0


@pytest.mark.slow  # two server processes
def test_two_server_processes_behind_the_example_client(stage_dirs, tmp_path):
    """Beyond one device: one process each, `examples/serve_pool.py` spreading the requests;
    every reply is what the request gives alone."""
    from fthss.options import load_stages

    bodies = [request(i) for i in range(12)]
    requests_file, replies_file = tmp_path / "requests.jsonl", tmp_path / "replies.jsonl"
    requests_file.write_text("".join(json.dumps(b) + "\n" for b in bodies))
    with server_process(stage_dirs) as (_, first), server_process(stage_dirs) as (_, second):
        subprocess.run([sys.executable, str(Path(__file__).parents[1] / "examples/serve_pool.py"),
                        "--server", first, "--server", second, "--input", str(requests_file),
                        "--output", str(replies_file), "--concurrency", "4"], check=True)
    replies = [json.loads(line) for line in replies_file.read_text().splitlines()]
    assert {r["server"] for r in replies} == {first, second}
    engine = ChainEngine(get_base("tiny-llama"), load_stages(stage_dirs, get_base("tiny-llama")))
    for body, reply in zip(bodies, replies, strict=True):
        assert_reply_equals(reply, alone(engine, body))


@pytest.mark.slow  # 1,000 requests
def test_load_1000_requests_from_64_clients(stages, reference):
    """No request is lost: 1,000 replies from 64 concurrent clients, each what the request
    gives alone (greedy). 40 distinct requests, each sent 25 times under its own id."""
    distinct = [request(i, mode="text" if i % 5 == 4 else "shared") for i in range(40)]
    expected = [alone(reference, body, body["mode"]) for body in distinct]
    bodies = [{**distinct[i % 40], "id": f"r{i}"} for i in range(1000)]
    with live(create_app(new_engine(stages), max_batch_size=32, max_wait_ms=5)) as base_url:
        started = time.perf_counter()
        replies = asyncio.run(post_all(base_url, bodies, concurrency=64))
        seconds = time.perf_counter() - started
        steps = metric(base_url, "fthss_batch_size_count")
    assert all(reply.status_code == 200 for reply in replies)
    for i, reply in enumerate(replies):
        result = expected[i % 40]
        result.id = f"r{i}"
        assert_reply_equals(reply.json(), result)
    assert steps < 2 * 1000 / 1.5, "requests arriving together must share engine steps"
    print(f"1000 requests in {seconds:.1f} s, {steps:.0f} engine steps")
