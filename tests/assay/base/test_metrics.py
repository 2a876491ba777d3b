"""The one request Timer both services record with: the status code each way a request can end."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from assay.base.errors import NotReady, Overloaded
from assay.base.metrics import RequestMetrics, Timer

pytestmark = pytest.mark.unit


def recorded(metrics: RequestMetrics, code: str) -> float | None:
    return metrics.registry.get_sample_value("test_requests_total", {"route": "/r", "model": "m", "code": code})


@pytest.mark.parametrize(
    ("raised", "code"),
    [
        (None, "200"),
        (Overloaded("full", retry_after_s=1.0), "429"),
        (NotReady("loading"), "503"),
        (asyncio.CancelledError(), "499"),  # the client went away (or the drain cut it off)
        (RuntimeError("a bug"), "500"),
    ],
)
def test_the_timer_records_how_a_request_ended(raised, code):
    metrics = RequestMetrics("test", "model", "Sequences waiting")
    with pytest.raises(type(raised)) if raised else contextlib.nullcontext(), Timer(metrics, "/r", "m"):
        if raised:
            raise raised
    assert recorded(metrics, code) == 1
    count = metrics.registry.get_sample_value("test_request_seconds_count", {"route": "/r", "model": "m"})
    assert count == 1


def test_a_code_set_inside_the_block_stands():
    """The HTTP edge sets 499 itself when the client hangs up: the block then ends normally."""
    metrics = RequestMetrics("test", "model", "Sequences waiting")
    with Timer(metrics, "/r", "m") as timer:
        timer.code = "499"
    assert recorded(metrics, "499") == 1 and recorded(metrics, "200") is None


def _names(families) -> set[str]:
    return {sample.name for family in families for sample in family.samples}


def test_each_registry_has_the_process_and_python_collectors_and_two_do_not_clash():
    """Two servers in one process each build their registry; neither refuses the other's collectors."""
    first, second = RequestMetrics("test", "model", "waiting"), RequestMetrics("test", "model", "waiting")
    for metrics in (first, second):
        body, content_type = metrics.render({"m": 0})
        assert content_type.startswith("text/plain; version=0.0.4")
        names = _names(text_string_to_metric_families(body.decode()))
        assert {"process_cpu_seconds_total", "process_start_time_seconds", "python_info"} <= names
        assert {"process_resident_memory_bytes", "process_open_fds", "python_gc_collections_total"} <= names


def test_the_text_format_has_no_created_series_and_openmetrics_keeps_them():
    metrics = RequestMetrics("test", "model", "waiting")
    with Timer(metrics, "/r", "m"):
        pass
    text, _ = metrics.render({}, "text/plain")
    assert b"_created" not in text
    assert "test_requests_total" in _names(text_string_to_metric_families(text.decode()))

    body, content_type = metrics.render({}, "application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    families = {f.name: f for f in openmetrics_families(body.decode())}  # the strict OpenMetrics parser
    assert "test_requests_created" in {s.name for s in families["test_requests"].samples}
    assert "process_cpu_seconds" in families
