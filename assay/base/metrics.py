"""What both services record about requests, and the one timer that records it.

Each service keeps its Prometheus metrics in a registry of its own (one per server) and adds
what only it measures (`rm_server.metrics`, `policy_server.metrics`); `RequestMetrics` holds what
both have: requests by route, label (the reward or the model) and status code, their latency,
and the queue depth per label. Label values must come only from names the server declares, so
client text can never add series to /metrics: callers pass `Timer` a label they have checked.

`Timer` records a request's status the same way on every edge of both services: a refused
request (`ServiceError`) its status, a cancelled one 499 (the client went away or gave up, or
the drain cut it off: nobody reads the answer), anything else 500.

Each registry also has what prometheus_client's default registry has: the process collector
(`process_cpu_seconds_total`, `process_resident_memory_bytes`, `process_open_fds`,
`process_start_time_seconds`, ...) and the Python ones (`python_info`, `python_gc_*`), an instance
per registry so that several servers in one process do not clash.

`render` answers in the format the scraper asks for (prometheus_client's `choose_encoder` on the
Accept header): OpenMetrics for `application/openmetrics-text`, the Prometheus text format
otherwise. The text format has no place for a counter's or histogram's creation time, so
prometheus_client writes it as one more gauge series per child (`<name>_created`), doubling the
series of every labelled counter; `render` leaves those out of the text format only. In
OpenMetrics `_created` is part of the metric family, and stays. (prometheus_client's own switch,
`disable_created_metrics()` or `PROMETHEUS_DISABLE_CREATED_SERIES`, is one module-wide flag read
at every collect: it would drop them from OpenMetrics too, and from every other registry in the
process.)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric

from assay.base.errors import ServiceError
from assay.base.logs import note

SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
CANCELLED = "499"  # nginx's "client closed request": no HTTP status says it


class RequestMetrics:
    """A registry with the metrics every service has, named `{prefix}_...`, labelled by `label`."""

    def __init__(self, prefix: str, label: str, queue_help: str) -> None:
        self.label_name = label  # what the label is: "reward", "model" (the access line's field)
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.requests = Counter(
            f"{prefix}_requests", f"Requests by route, {label} and status code", ["route", label, "code"], registry=r
        )
        self.latency = Histogram(
            f"{prefix}_request_seconds", f"Request latency by route and {label}", ["route", label], registry=r
        )
        self.queue_depth = Gauge(f"{prefix}_queue_depth", queue_help, [label], registry=r)

    def render(self, queue_depths: dict[str, int], accept: str = "") -> tuple[bytes, str]:
        """The metrics, with the queue depths as they are now, in the format `accept` (a request's
        Accept header) asks for; returns the body and its content type."""
        for name, depth in queue_depths.items():
            self.queue_depth.labels(name).set(depth)
        encode, content_type = choose_encoder(accept)
        return encode(_Shown(self.registry, openmetrics=content_type.startswith(OPENMETRICS))), content_type


OPENMETRICS = "application/openmetrics-text"


class _Shown:
    """A registry's metrics as one format shows them (see the module docstring): the text format
    without `_created` samples; OpenMetrics without the `_count` of a histogram whose `_sum`
    prometheus_client leaves out (it does for negative buckets, `assay_rm_reward_value`'s), as
    OpenMetrics has a count only beside a sum (and its own parser refuses the family otherwise)."""

    def __init__(self, registry: CollectorRegistry, openmetrics: bool) -> None:
        self.registry, self.openmetrics = registry, openmetrics

    def collect(self) -> Iterator[Metric]:
        for metric in self.registry.collect():
            dropped = self._dropped(metric)
            if dropped:
                # a new family: a collector may hand out the same object on every collect
                shown = Metric(metric.name, metric.documentation, metric.type, metric.unit)
                shown.samples = [s for s in metric.samples if s.name not in dropped]
                metric = shown
            yield metric

    def _dropped(self, metric: Metric) -> set[str]:
        names = {s.name for s in metric.samples}
        if not self.openmetrics:
            return {f"{metric.name}_created"} & names
        if metric.type == "histogram" and f"{metric.name}_sum" not in names:
            return {f"{metric.name}_count"} & names
        return set()


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
