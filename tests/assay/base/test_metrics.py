"""The one request Timer both services record with: the status code each way a request can end."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

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
