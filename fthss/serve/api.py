"""`create_app`: the HTTP API over a `ChainEngine` (FastAPI).

`POST /v1/chains` takes one request in the JSONL format of the README plus `mode`, sampling
(`temperature`, `top_k`, `top_p`, `seed`) and `stream`. The reply is
`{"id", "mode", "output", "steps": [{"stage", "output", "stats"}], "error"}`: 200 when the chain
ran, 400 when the engine failed it alone (too long for the model or the cache budget; its
batch-mates ran on), 500 when its batch failed. `"stream": true` answers with server-sent events
instead: `tokens` (the step, its stage, the new token ids and the text they complete; sent at
each of the engine's looks, i.e. after the first token and then every `check_every` tokens),
`step` (a finished step: its output, authoritative, and stats) and finally `done` (the whole
reply). `GET /health` answers 200 while the scheduler runs and takes requests, `GET /metrics`
the Prometheus metrics.

Malformed bodies get 422 naming the field, bodies over `max_body_bytes` 413, a full queue or a
draining server 503 with `Retry-After`; with `api_key`, `/v1/chains` and `/metrics` want
`Authorization: Bearer KEY` (401 otherwise; `/health` stays open for load balancers). A client
that disconnects cancels its own request only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
from contextlib import asynccontextmanager
from typing import Literal

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.sse import EventSourceResponse, format_sse_event
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field

from fthss.engine.engine import ChainEngine, ChainResult, StepInput
from fthss.engine.sampling import SamplingConfig
from fthss.layout.chain import ChainFormatError, ChainSample, chain_from_json
from fthss.serve.metrics import Metrics
from fthss.serve.scheduler import Job, Refused, Scheduler

RETRY_AFTER_S = 1  # what a refused client is told to wait: room frees as each batch ends


class StepBody(BaseModel):
    """One step, as in the README's JSONL format (`fthss.layout.chain` checks the rest)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    stage: str
    input: str | None = None
    output: str | None = None
    input_visible: bool = False
    max_new_tokens: int | None = None
    stop: list[str] = []
    stop_token_ids: list[int] = []
    min_new_tokens: int = 0


class ChainBody(BaseModel):
    """A chain request: the README's JSONL record plus how to run it."""

    model_config = ConfigDict(extra="forbid", strict=True)
    id: str | int | None = None
    shared: str = ""
    steps: list[StepBody] = Field(min_length=1)
    mode: Literal["shared", "text", "text-cached"] = "shared"
    temperature: float = Field(0.0, ge=0, description="0: greedy")
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = Field(0, ge=0, description="the request's own sampling seed, whatever its batch")
    stream: bool = False

    def chain(self, stages: set[str]) -> ChainSample:
        """The request as the engine takes it; `HTTPException` 422 naming the field if the
        format's rules (`chain_from_json`) refuse it or it names a stage not loaded."""
        record = self.model_dump(include={"id", "shared", "steps"})
        try:
            chain = chain_from_json(record, "body")
        except ChainFormatError as err:
            raise HTTPException(422, str(err)) from err
        for k, step in enumerate(chain.steps):
            if step.stage not in stages:
                raise HTTPException(422, f"body: steps[{k}].stage: no stage '{step.stage}' is "
                                         f"loaded (loaded: {', '.join(sorted(stages))})")
        return chain


def reply(result: ChainResult) -> dict:
    """The JSON reply for a result: its steps' stage, output and stats (not their inputs)."""
    return {"id": result.id, "mode": result.mode, "output": result.output,
            "steps": [{"stage": s.stage, "output": s.output,
                       "stats": dataclasses.asdict(s.stats)} for s in result.steps],
            "error": result.error}


def _status_and_body(result: ChainResult | Exception, job: Job) -> tuple[int, dict]:
    """Status and body of a finished job."""
    if isinstance(result, Exception):
        failed = ChainResult(job.request.id, job.mode, [], None, f"server error: {result!r}")
        return 500, reply(failed)
    return (400 if result.error else 200), reply(result)


def create_app(engine: ChainEngine, step_input: StepInput | None = None, *,
               max_batch_size: int = 32, max_wait_ms: float = 10.0, max_queue: int = 1024,
               batching: str = "dynamic", api_key: str | None = None,
               max_body_bytes: int = 1 << 20) -> FastAPI:
    """The app serving `engine`; its scheduler starts and stops with the app's lifespan.

    Args:
        engine: the loaded chain engine (the app's worker thread owns it).
        step_input: the between-steps callable, as `ChainEngine.run` takes it.
        max_batch_size, max_wait_ms, max_queue, batching: the scheduler's, see `Scheduler`.
        api_key: when set, the bearer token `/v1/chains` and `/metrics` require.
        max_body_bytes: larger request bodies get 413.

    Returns:
        The FastAPI app; `app.state.scheduler` and `app.state.metrics` are its parts.
    """
    metrics = Metrics()
    scheduler = Scheduler(engine, step_input, max_batch_size, max_wait_ms, max_queue, metrics,
                          batching)
    stages = set(engine.stages)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="fthss", summary="FTHSS chains over one shared KV cache",
                  lifespan=lifespan, max_body_size=max_body_bytes)
    app.state.scheduler, app.state.metrics = scheduler, metrics
    bearer = HTTPBearer(auto_error=False)

    def authorized(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if api_key is None:
            return
        if credentials is None or not secrets.compare_digest(credentials.credentials.encode(),
                                                             api_key.encode()):
            raise HTTPException(401, "a bearer token is required (Authorization: Bearer KEY)",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        metrics.requests.labels("invalid").inc()
        return JSONResponse({"detail": _validation_errors(err)}, status_code=422)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = scheduler.alive and not scheduler.closed
        return JSONResponse({"status": "ok" if ok else "unavailable",
                             "stages": sorted(stages)}, status_code=200 if ok else 503)

    @app.get("/metrics", dependencies=[Depends(authorized)])
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/chains", dependencies=[Depends(authorized)])
    async def chains(body: ChainBody, request: Request) -> Response:
        try:
            chain = body.chain(stages)
        except HTTPException:
            metrics.requests.labels("invalid").inc()
            raise
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = Job(chain, body.mode, SamplingConfig(body.temperature, body.top_k, body.top_p,
                                                   body.seed),
                  lambda kind, data: loop.call_soon_threadsafe(events.put_nowait, (kind, data)))
        try:
            scheduler.submit(job)
        except Refused as err:
            metrics.requests.labels("rejected").inc()
            raise HTTPException(503, str(err),
                                headers={"Retry-After": str(RETRY_AFTER_S)}) from err
        if body.stream:
            # no caching, and no buffering by a proxy in front (nginx reads X-Accel-Buffering)
            return EventSourceResponse(_events(job, events, scheduler, engine),
                                       headers={"Cache-Control": "no-cache",
                                                "X-Accel-Buffering": "no"})
        return await _answer(job, events, scheduler, request)

    return app


def _validation_errors(err: RequestValidationError) -> list[dict]:
    """Pydantic's errors with what JSON can hold (`loc` names the field)."""
    return [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in err.errors()]


async def _answer(job: Job, events: asyncio.Queue, scheduler: Scheduler,
                  request: Request) -> Response:
    """Wait for the job, or for the client to leave (then cancel the job)."""
    async def done():
        while True:
            kind, data = await events.get()
            if kind == "done":
                return data

    async def disconnected():  # the body is read: the next message is the disconnect
        while (await request.receive())["type"] != "http.disconnect":
            pass

    result, gone = asyncio.ensure_future(done()), asyncio.ensure_future(disconnected())
    await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
    gone.cancel()
    if not result.done():
        scheduler.cancel(job)
        result.cancel()
        return Response(status_code=499)  # nobody is there to read it
    status, body = _status_and_body(result.result(), job)
    return JSONResponse(body, status_code=status)


async def _events(job: Job, events: asyncio.Queue, scheduler: Scheduler, engine: ChainEngine):
    """The job's server-sent events; the job is cancelled if the stream stops early."""
    told: dict[int, tuple[str, int]] = {}  # step -> (text, token count) sent so far
    finished = False

    def event(name: str, data: dict) -> bytes:
        return format_sse_event(data_str=json.dumps(data), event=name)

    try:
        while True:
            kind, data = await events.get()
            if kind == "tokens":
                step, ids = data
                text, count = told.get(step, ("", 0))
                if len(ids) == count:
                    continue
                decoded = engine.codec.decode(ids)
                # the text is told once it is stable: a byte tokenizer may stop inside a
                # character (decoded as U+FFFD until its other bytes come)
                if decoded.endswith("\ufffd") or not decoded.startswith(text):
                    decoded = text
                told[step] = decoded, len(ids)
                yield event("tokens", {"step": step, "stage": job.request.steps[step].stage,
                                       "text": decoded[len(text):], "token_ids": ids[count:]})
            elif kind == "step":
                step, result = data
                yield event("step", {"step": step, "stage": result.stage,
                                     "output": result.output,
                                     "stats": dataclasses.asdict(result.stats)})
            else:
                finished = True
                yield event("done", _status_and_body(data, job)[1])
                return
    finally:
        if not finished:
            scheduler.cancel(job)
