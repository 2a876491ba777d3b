"""What both services record about requests, and the one timer that records it.

Each service keeps its Prometheus metrics in a registry of its own (one per server) and adds
what only it measures (`rm_server.metrics`, `policy_server.metrics`); `RequestMetrics` holds what
both have: requests by route, label (the reward or the model) and status code, their latency,
and the queue depth per label. Label values must come only from names the server declares, so
client text can never add series to /metrics: callers pass `Timer` a label they have checked.

`Timer` records a request's status the same way on every edge of both services: a refused
request (`ServiceError`) its status, a cancelled one 499 (the client went away or gave up, or
the drain cut it off: nobody reads the answer), anything else 500.
"""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from assay.base.errors import ServiceError
from assay.base.logs import note

SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
CANCELLED = "499"  # nginx's "client closed request": no HTTP status says it


class RequestMetrics:
    """A registry with the metrics every service has, named `{prefix}_...`, labelled by `label`."""

    def __init__(self, prefix: str, label: str, queue_help: str) -> None:
        self.label_name = label  # what the label is: "reward", "model" (the access line's field)
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            f"{prefix}_requests", f"Requests by route, {label} and status code", ["route", label, "code"], registry=r
        )
        self.latency = Histogram(
            f"{prefix}_request_seconds", f"Request latency by route and {label}", ["route", label], registry=r
        )
        self.queue_depth = Gauge(f"{prefix}_queue_depth", queue_help, [label], registry=r)

    def render(self, queue_depths: dict[str, int]) -> bytes:
        """The Prometheus text, with the queue depths as they are now."""
        for name, depth in queue_depths.items():
            self.queue_depth.labels(name).set(depth)
        return generate_latest(self.registry)


class Timer:
    """Records one request's latency and status code: `with Timer(metrics, route, label) as t: ...`.

    The code is 200 unless the block raises (see the module docstring) or sets `t.code` itself."""

    def __init__(self, metrics: RequestMetrics, route: str, label: str) -> None:
        self.metrics, self.route, self.label, self.code = metrics, route, label, "200"

    def __enter__(self) -> Timer:
        note(**{self.metrics.label_name: self.label})  # the access line says which reward or model
        self.start = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if isinstance(exc, ServiceError):
            self.code = str(exc.status)
        elif isinstance(exc, asyncio.CancelledError):
            self.code = CANCELLED
        elif exc is not None:
            self.code = "500"
        self.metrics.latency.labels(self.route, self.label).observe(time.perf_counter() - self.start)
        self.metrics.requests.labels(self.route, self.label, self.code).inc()
