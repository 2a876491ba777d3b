"""The dynamic batcher on its own: budgets, deadlines, back-pressure, cancellation."""

from __future__ import annotations

import asyncio
import threading

import pytest

from assay.base.batcher import Batcher, BatchTimes
from assay.base.errors import InvalidRequest, Overloaded

pytestmark = pytest.mark.unit


def run(coro):
    return asyncio.run(coro)


def make(batches: list[list[int]], gate: threading.Event | None = None, **kw) -> Batcher:
    def run_batch(payloads: list[int]) -> list[int]:
        batches.append(list(payloads))
        if gate is not None:
            gate.wait(10)
        return [p * 10 for p in payloads]

    opts = {"max_items": 4, "max_tokens": 100, "max_wait_s": 0.05, "max_queue": 16} | kw
    return Batcher(run_batch, name="t", **opts)


def test_items_are_packed_under_the_item_cap_and_results_come_back_in_order():
    async def go():
        batches: list[list[int]] = []
        b = make(batches)
        b.start()
        futs = b.submit(list(range(10)), [1] * 10)
        out = await asyncio.gather(*futs)
        await b.close()
        return out, batches

    out, batches = run(go())
    assert out == [p * 10 for p in range(10)]
    assert batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_token_budget_closes_a_batch_and_an_oversized_item_runs_alone():
    async def go():
        batches: list[list[int]] = []
        b = make(batches, max_items=10, max_tokens=10)
        b.start()
        await asyncio.gather(*b.submit([1, 2, 3, 4], [4, 4, 30, 1]))
        await b.close()
        return batches

    assert run(go()) == [[1, 2], [3], [4]]


def test_concurrent_requests_share_a_batch_within_the_wait_deadline():
    async def go():
        batches: list[list[int]] = []
        b = make(batches, max_items=8, max_wait_s=0.2)
        b.start()
        first = b.submit([1], [1])
        await asyncio.sleep(0.02)  # a second request arrives while the first waits for company
        second = b.submit([2, 3], [1, 1])
        await asyncio.gather(*first, *second)
        await b.close()
        return batches

    assert run(go()) == [[1, 2, 3]]


def test_full_queue_refuses_whole_requests_and_oversized_requests_are_invalid():
    async def go():
        batches: list[list[int]] = []
        gate = threading.Event()
        b = make(batches, gate=gate, max_items=1, max_queue=3, max_wait_s=0)
        b.start()
        running = b.submit([0], [1])
        while not batches:
            await asyncio.sleep(0.01)
        waiting = b.submit([1, 2], [1, 1])
        with pytest.raises(Overloaded) as full:
            b.submit([3, 4], [1, 1])  # 2 + 2 > 3: none of the two is queued
        assert b.depth() == 2 and full.value.retry_after_s > 0
        with pytest.raises(InvalidRequest, match="split"):
            b.submit([5, 6, 7, 8], [1] * 4)
        gate.set()
        await asyncio.gather(*running, *waiting)
        await b.close()
        return batches

    assert run(go()) == [[0], [1], [2]]


def test_cancelled_items_are_never_computed():
    async def go():
        batches: list[list[int]] = []
        gate = threading.Event()
        b = make(batches, gate=gate, max_items=8, max_wait_s=0)
        b.start()
        running = b.submit([0], [1])
        while not batches:
            await asyncio.sleep(0.01)
        abandoned = b.submit([1, 2], [1, 1])
        kept = b.submit([3], [1])
        for f in abandoned:
            f.cancel()
        assert b.depth() == 1
        gate.set()
        await asyncio.gather(*running, *kept)
        await b.close()
        return batches

    assert run(go()) == [[0], [3]]


def test_a_failing_batch_fails_its_waiters_and_the_batcher_keeps_going():
    async def go():
        calls = []

        def run_batch(payloads):
            calls.append(payloads)
            if 0 in payloads:
                raise RuntimeError("boom")
            return payloads

        b = Batcher(run_batch, name="t", max_items=8, max_tokens=100, max_wait_s=0, max_queue=8)
        b.start()
        with pytest.raises(RuntimeError, match="boom"):
            await b.submit([0], [1])[0]
        assert await b.submit([5], [1])[0] == 5
        await b.close()

    run(go())


def test_batch_times_are_a_line_in_the_items_fitted_to_recent_batches():
    times = BatchTimes(forget=0.8, first_guess_s=1.0)
    assert times.predict(8) == 1.0  # nothing measured yet
    for _ in range(3):
        times.add(1, 0.5)
    assert times.predict(8) == pytest.approx(0.5)  # one size seen: no per-item part yet
    times.add(4, 1.1)
    assert times.predict(1) == pytest.approx(0.5) and times.predict(4) == pytest.approx(1.1)
    assert times.predict(8) == pytest.approx(1.9)  # 0.3 s fixed + 0.2 s per item


def test_the_wait_for_room_counts_the_batches_that_must_leave_the_queue_first():
    """Retry-After is the time until enough queued items have been taken into batches: packed by the
    batcher's rule (items and tokens), each taken when the one before it ends."""

    async def go():
        batches: list[list[int]] = []
        gate = threading.Event()
        b = make(batches, gate=gate, max_items=2, max_tokens=10, max_queue=6, max_wait_s=0)
        b.start()
        running = b.submit([0], [1])
        while not batches:
            await asyncio.sleep(0.01)
        waiting = b.submit([1, 2, 3, 4, 5], [1, 1, 10, 1, 1])  # batches [1, 2], [3] (tokens), [4, 5]
        sizes = [b._batches_to_take(n) for n in (1, 2, 3, 4, 5)]
        gate.set()
        await asyncio.gather(*running, *waiting)
        await b.close()
        return sizes

    assert run(go()) == [[1], [2], [2, 1], [2, 1, 1], [2, 1, 2]]
