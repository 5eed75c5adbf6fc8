"""The scheduler: one worker thread owns the engine and runs queued requests in batches.

A batch starts from the oldest queued job: the worker waits for batch-mates until
`max_wait_ms` after that job's arrival or after the last batch's end, whichever is later, and
starts every queued job that can share a batch with it (same mode and sampling settings; each
brings its own seed) up to `max_batch_size`. Waiting after a batch's end too lets its clients'
next requests join the requests queued meanwhile: under steady load, batches started from the
oldest's arrival alone split the clients into two groups that alternate, each half a batch.

Then, with `batching="dynamic"` (the default), requests that arrive while the batch runs queue
for the next one; with `"continuous"` they join it at its next step boundary
(`fthss.engine.engine.RunningBatch`), as long as there is room and the oldest queued job can
share the batch (one that cannot waits for the batch to drain, so that no setting starves).
Either way a member whose chain is done leaves the batch and is answered at once. A joiner's
long prefill runs in a row group of its own (`fthss.engine.cache.row_groups`), so members in
short steps do not pay for its width, and members whose steps only encode take turns with
those that decode (`RunningBatch`), so that no step holds both. On a mix of 1- to 3-round
chains continuous batching measured 0.95-1.09x dynamic's requests/s in shared mode and
0.73-1.28x in text mode (docs/benchmarks.md, busy machine), so dynamic stays the default.

The queue is bounded: a full queue refuses a job (the API answers 503). A cancelled job (its
client left) leaves the queue; if it is already running, it ends at its next step boundary (the
between-steps callable returns `END` for it), so batch-mates are never touched. A between-steps
callable that raises fails that request alone. `close` drains: new jobs are refused, accepted
ones still run.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from fthss.engine.engine import (
    BATCHING,
    END,
    ChainEngine,
    ChainResult,
    RunningBatch,
    StepInput,
    StepResult,
)
from fthss.engine.sampling import SamplingConfig
from fthss.layout.chain import ChainSample
from fthss.serve.metrics import Metrics


class Refused(Exception):
    """A job the scheduler will not take: the queue is full, or the server is draining."""


# (kind, payload) told to a job's owner from the worker thread: ("tokens", (step, ids so far)),
# ("step", (step, StepResult)), ("done", ChainResult) or ("done", an exception).
Notify = Callable[[str, object], None]


@dataclass(eq=False)  # jobs compare by identity: two equal requests are two jobs
class Job:
    request: ChainSample
    mode: str
    sampling: SamplingConfig
    notify: Notify
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    first_token_at: float | None = None
    error: str | None = None  # set by the worker when the between-steps callable raised

    @property
    def batch_key(self) -> tuple:
        """Jobs with equal keys can run in one `engine.run` call (seeds are per request; greedy
        jobs ignore the sampling settings)."""
        s = self.sampling
        return (self.mode,) if s.greedy else (self.mode, s.temperature, s.top_k, s.top_p)


class _Listener:
    """Relays a batch's progress (`fthss.engine.engine.RunListener`) to its jobs, by the index
    each joined the batch with."""

    def __init__(self, jobs: dict[int, Job], metrics: Metrics):
        self.jobs, self.metrics = jobs, metrics

    def tokens(self, request: int, step: int, ids: list[int]) -> None:
        job = self.jobs[request]
        if job.first_token_at is None and ids:
            job.first_token_at = time.perf_counter()
            self.metrics.ttft.observe(job.first_token_at - job.arrived)
        job.notify("tokens", (step, ids))

    def step_done(self, request: int, step: int, result: StepResult) -> None:
        self.metrics.prefilled.inc(result.stats.prefilled_tokens)
        self.metrics.decoded.inc(result.stats.decoded_tokens)
        self.metrics.kv_bytes.set(result.stats.kv_bytes)
        self.jobs[request].notify("step", (step, result))


class Scheduler:
    def __init__(self, engine: ChainEngine, step_input: StepInput | None = None,
                 max_batch_size: int = 32, max_wait_ms: float = 10.0, max_queue: int = 1024,
                 metrics: Metrics | None = None, batching: str = "dynamic"):
        """Args:
            engine: the engine the worker owns (nothing else may run it meanwhile).
            step_input: the between-steps callable, as `ChainEngine.run` takes it.
            max_batch_size: the most requests in one batch at once.
            max_wait_ms: how long the oldest queued job waits for batch-mates.
            max_queue: the most jobs waiting; more are refused.
            metrics: where queue, batch and token figures go.
            batching: "dynamic" (jobs wait for the next batch) or "continuous" (they join
                the running batch at step boundaries).
        """
        if batching not in BATCHING:
            raise ValueError(f"unknown batching '{batching}'; choose one of {BATCHING}")
        self.engine, self.step_input, self.batching = engine, step_input, batching
        self.max_batch_size, self.max_wait_s = max_batch_size, max_wait_ms / 1000
        self.max_queue = max_queue
        self.metrics = metrics or Metrics()
        self._queue: deque[Job] = deque()
        self._changed = threading.Condition()
        self._closed = False  # draining: no new jobs
        self._stopped = False  # the worker exits once the queue is empty
        self._running = 0  # jobs in the batch being run
        self._joined = 0  # jobs joined so far: each job's index in its batch
        self._last_end = 0.0  # when the last batch ended (perf_counter)
        self._thread = threading.Thread(target=self._work, name="fthss-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def closed(self) -> bool:
        """New jobs are refused (the server drains)."""
        return self._closed

    @property
    def idle(self) -> bool:
        """Nothing queued and no batch running."""
        with self._changed:
            return not self._queue and not self._running

    def submit(self, job: Job) -> None:
        """Queue `job`; raises `Refused` when the queue is full or the scheduler is closed."""
        with self._changed:
            if self._closed:
                raise Refused("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise Refused(f"the queue is full ({self.max_queue} requests)")
            self._queue.append(job)
            self.metrics.queue_length.set(len(self._queue))
            self._changed.notify()

    def cancel(self, job: Job) -> None:
        """Its client is gone: drop `job` from the queue, or end it at its next step."""
        with self._changed:
            job.cancelled = True
            if job in self._queue:
                self._queue.remove(job)
                self.metrics.queue_length.set(len(self._queue))
                self.metrics.requests.labels("cancelled").inc()

    def close(self) -> None:
        """Refuse new jobs; queued and running ones still finish."""
        with self._changed:
            self._closed = True

    def stop(self, timeout: float | None = None) -> None:
        """Close, let the worker finish the queue, and wait for it."""
        with self._changed:
            self._closed = self._stopped = True
            self._changed.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _work(self) -> None:
        while batch := self._next_batch():
            self._run(batch)

    def _next_batch(self) -> list[Job]:
        """The oldest job and every queued job that can share its batch, after waiting up to
        `max_wait_s` (from the oldest's arrival or the last batch's end, the later) for a full
        batch; [] when stopped."""
        with self._changed:
            while True:
                while not self._queue:
                    if self._stopped:
                        return []
                    self._changed.wait()
                deadline = max(self._queue[0].arrived, self._last_end) + self.max_wait_s
                while (len(self._queue) < self.max_batch_size and not self._stopped
                       and (left := deadline - time.perf_counter()) > 0):
                    self._changed.wait(left)
                if self._queue:  # else all were cancelled while waiting
                    break
            return self._take(self._queue[0].batch_key, self.max_batch_size)

    def _take(self, key: tuple, room: int) -> list[Job]:
        """Up to `room` queued jobs of batch key `key`, oldest first, out of the queue (the
        caller holds the lock)."""
        batch = [job for job in self._queue if job.batch_key == key][:room]
        for job in batch:
            self._queue.remove(job)
        self._running += len(batch)
        self.metrics.queue_length.set(len(self._queue))
        return batch

    def _joiners(self, key: tuple, room: int) -> list[Job]:
        """Continuous batching: the queued jobs that join the running batch at this step
        boundary (none while the oldest queued job needs another batch: it goes next)."""
        with self._changed:
            if room <= 0 or not self._queue or self._queue[0].batch_key != key:
                return []
            return self._take(key, room)

    def _run(self, first: list[Job]) -> None:
        """Run a batch from `first` until its last member is done; with continuous batching,
        queued jobs join it at each step boundary."""
        jobs: dict[int, Job] = {}  # by the index each joined the batch with
        by_request = {}  # id of a job's request -> the job, for the between-steps callable

        def step_input(request: ChainSample, k: int, outputs: list[str]):
            job = by_request[id(request)]
            if job.cancelled:
                return END
            if self.step_input is None:
                return None
            try:
                return self.step_input(request, k, outputs)
            except Exception as err:  # noqa: BLE001 - the user's callable fails its request alone
                job.error = f"step {k}: the between-steps callable raised {err!r}"
                return END

        key, leader = first[0].batch_key, first[0]
        batch = RunningBatch(self.engine, leader.mode, leader.sampling, step_input,
                             listener=_Listener(jobs, self.metrics))
        joining = first
        while joining or jobs:
            for job in joining:
                jobs[self._joined], by_request[id(job.request)] = job, job
                batch.join(job.request, self._joined, job.sampling.seed)
                self._joined += 1
            self.metrics.batch_size.observe(len(jobs))
            try:
                finished = batch.step()
            except Exception as err:  # noqa: BLE001 - the batch fails, the server goes on
                finished = [(index, err) for index in jobs]
            for index, result in finished:
                job = jobs.pop(index)
                del by_request[id(job.request)]
                if isinstance(result, ChainResult) and job.error:
                    result.error = job.error
                self._finish(job, result)
            if not jobs:  # the batch's caches are gone
                self.metrics.kv_bytes.set(0)
            joining = (self._joiners(key, self.max_batch_size - len(jobs))
                       if self.batching == "continuous" and jobs else [])
        with self._changed:
            self._last_end = time.perf_counter()

    def _finish(self, job: Job, result: ChainResult | Exception) -> None:
        if job.cancelled:
            outcome = "cancelled"
        elif isinstance(result, Exception):
            outcome = "error"
        else:
            outcome = "failed" if result.error else "ok"
        self.metrics.requests.labels(outcome).inc()
        self.metrics.latency.observe(time.perf_counter() - job.arrived)
        with self._changed:
            self._running -= 1
        job.notify("done", result)
