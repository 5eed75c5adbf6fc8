"""The server's Prometheus metrics, in a registry of their own (two apps in one process, as
in the tests, do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

OUTCOMES = ("ok", "failed", "error", "cancelled", "rejected", "invalid")
# seconds: a tiny model answers in milliseconds, an 8B chain on a busy GPU in tens of seconds
TIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """Requests by outcome (`ok`; `failed`: the engine failed the request alone, e.g. too long,
    400; `error`: its batch failed, 500; `cancelled`: the client left; `rejected`: 503;
    `invalid`: 422), queue length, batch sizes (members per engine step), tokens prefilled and
    decoded, request latency and time to first token (both from arrival), and the K/V bytes the
    running batch holds."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("fthss_requests", "Chain requests by outcome", ["outcome"],
                                registry=r)
        for outcome in OUTCOMES:  # every outcome is exported from the start, at 0
            self.requests.labels(outcome)
        self.queue_length = Gauge("fthss_queue_length", "Requests waiting for a batch",
                                  registry=r)
        self.batch_size = Histogram("fthss_batch_size", "Requests in the running batch at "
                                    "each engine step (each runs every member's next step)",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.prefilled = Counter("fthss_tokens_prefilled", "Tokens encoded before generating",
                                 registry=r)
        self.decoded = Counter("fthss_tokens_decoded", "Tokens generated", registry=r)
        self.latency = Histogram("fthss_request_latency_seconds", "Arrival to reply",
                                 buckets=TIME_BUCKETS, registry=r)
        self.ttft = Histogram("fthss_time_to_first_token_seconds",
                              "Arrival to the first generated token", buckets=TIME_BUCKETS,
                              registry=r)
        self.kv_bytes = Gauge("fthss_kv_bytes_held", "K/V bytes held by the running batch "
                              "(all its caches, at its latest step's end)", registry=r)

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes."""
        return generate_latest(self.registry)
