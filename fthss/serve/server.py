"""Running an app on uvicorn with a drain: on SIGTERM (or Ctrl-C) the scheduler stops taking
requests (new ones get 503, `/health` 503, so a load balancer moves on), every accepted request
finishes and is answered, then the process exits 0. A second signal exits at once."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI

from fthss.serve.scheduler import Scheduler

# Seconds an idle keep-alive connection stays open. uvicorn's 5 s invites the keep-alive race (the
# server closes a connection just as a client or load balancer reuses it, and that request is
# lost); clients and balancers close theirs sooner (nginx upstream 60 s, httpx 5 s).
KEEP_ALIVE_S = 75


class DrainingServer(uvicorn.Server):
    """uvicorn's server, draining the app's scheduler before it shuts down."""

    def __init__(self, config: uvicorn.Config, scheduler: Scheduler):
        super().__init__(config)
        self.scheduler = scheduler
        self.draining = False

    def handle_exit(self, sig: int, frame) -> None:
        # a signal handler: only flags here, the event loop's tick does the work
        if self.draining:
            self.should_exit = self.force_exit = True
        self.draining = True

    async def on_tick(self, counter: int) -> bool:
        if self.draining and not self.should_exit:
            self.scheduler.close()
            self.should_exit = self.scheduler.idle  # answered: uvicorn sends the replies
        return await super().on_tick(counter)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """As uvicorn's, but a drained server exits normally (0) instead of re-raising the
        signal it caught."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info") -> None:
    """Serve `app` (from `create_app`) until SIGTERM or Ctrl-C, then drain and return.

    Args:
        app: the app; its scheduler is drained on the first signal.
        host: the interface to bind (127.0.0.1: this machine only).
        port: the TCP port.
        log_level: uvicorn's log level.
    """
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_keep_alive=KEEP_ALIVE_S,
                            timeout_graceful_shutdown=None)  # every accepted reply is sent
    DrainingServer(config, app.state.scheduler).run()


@contextlib.contextmanager
def running(app: FastAPI, host: str = "127.0.0.1", port: int = 0,
            log_level: str = "warning") -> Iterator[str]:
    """`app` served by uvicorn in a background thread of this process (tests, benchmarks).

    Args:
        app: the app to serve.
        host: the interface to bind.
        port: the TCP port; 0 takes a free one.
        log_level: uvicorn's log level.

    Yields:
        The server's base URL; leaving the block stops it (replies in flight are sent).
    """
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                           timeout_keep_alive=KEEP_ALIVE_S))
    thread = threading.Thread(target=server.run, name="fthss-uvicorn", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server did not start (see its log)")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join()
