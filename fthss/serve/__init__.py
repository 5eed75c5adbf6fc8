"""fthss over HTTP: `create_app` (the FastAPI app, `api`), its `Scheduler` (continuous or
dynamic batching on a worker thread that owns the engine), `Metrics` (Prometheus) and `serve`
(uvicorn, drained on SIGTERM; `running` serves in a background thread). Needs the `serve`
extra: `pip install -e ".[serve]"`."""

from fthss.serve.api import create_app
from fthss.serve.server import running, serve

__all__ = ["create_app", "running", "serve"]
