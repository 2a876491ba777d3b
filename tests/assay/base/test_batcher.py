"""The dynamic batcher on its own: length-aware formation, budgets, deadlines, back-pressure, cancellation."""

from __future__ import annotations

import asyncio
import random
import threading

import pytest

from assay.base.batcher import Batcher, BatchTimes, form_batches
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


# --- length-aware formation ----------------------------------------------------------------


def test_a_batch_is_the_oldest_item_and_its_nearest_neighbours_in_length():
    # Arrival order 40, 900, 35, 1000, 50: the short ones batch together, then the long ones.
    assert list(form_batches([40, 900, 35, 1000, 50], max_items=3, max_tokens=10**6)) == [[0, 2, 4], [1, 3]]
    # The oldest goes first even when it is the odd one out; its nearest neighbours join it.
    assert list(form_batches([500, 10, 11, 12, 480, 520], max_items=3, max_tokens=10**6)) == [[0, 4, 5], [1, 2, 3]]


def test_the_budget_counts_padded_tokens_and_shorter_items_still_join_when_a_longer_one_cannot():
    # Oldest 100; 120 is nearer than 60, but 2 x 120 > 200: the batch takes the shorter 60 instead.
    assert list(form_batches([100, 120, 60], max_items=8, max_tokens=200)) == [[0, 2], [1]]
    # Three items of 100 are 300 padded tokens: over a budget of 250 even though no item is.
    assert list(form_batches([100, 100, 100], max_items=8, max_tokens=250)) == [[0, 1], [2]]


def test_an_item_over_the_budget_runs_alone_and_equal_lengths_keep_arrival_order():
    assert list(form_batches([5, 300, 5, 5], max_items=2, max_tokens=100)) == [[0, 2], [1], [3]]


def test_every_batch_holds_the_oldest_item_left_and_keeps_the_limits():
    rng = random.Random(0)
    for _ in range(200):
        costs = [int(rng.lognormvariate(5.9, 0.9)) + 1 for _ in range(rng.randint(1, 60))]
        max_items, max_tokens = rng.randint(1, 16), rng.choice([500, 2000, 8000])
        left = list(range(len(costs)))
        for batch in form_batches(costs, max_items, max_tokens):
            assert batch[0] == left[0] and batch == sorted(batch)  # the oldest, then arrival order
            assert len(batch) <= max_items
            assert len(batch) == 1 or len(batch) * max(costs[k] for k in batch) <= max_tokens
            left = [k for k in left if k not in batch]
        assert left == []


def test_sorted_batches_waste_less_padding_than_arrival_order_ones():
    rng = random.Random(1)
    costs = [min(2000, int(rng.lognormvariate(5.93, 0.87)) + 1) for _ in range(256)]
    padded = lambda batches: sum(len(b) * max(costs[k] for k in b) for b in batches)
    arrival = [list(range(s, s + 32)) for s in range(0, 256, 32)]
    aware = list(form_batches(costs, max_items=32, max_tokens=10**9))
    assert padded(aware) < 0.5 * padded(arrival)


def test_concurrent_requests_of_mixed_lengths_batch_by_length_and_get_their_own_results():
    async def go():
        batches: list[list[int]] = []
        b = make(batches, max_items=2, max_tokens=10**6, max_wait_s=10)  # batches close full, never on time
        b.start()
        first = b.submit([1, 2], [10, 1000])
        second = b.submit([3, 4], [1000, 10])
        out = [await asyncio.gather(*first), await asyncio.gather(*second)]
        await b.close()
        return out, batches

    out, batches = run(go())
    assert out == [[10, 20], [30, 40]]
    assert batches == [[1, 4], [2, 3]]


def test_the_wait_for_room_follows_the_length_aware_batches():
    async def go():
        batches: list[list[int]] = []
        gate = threading.Event()
        b = make(batches, gate=gate, max_items=2, max_tokens=10**6, max_queue=5, max_wait_s=0)
        b.start()
        running = b.submit([0], [1])
        while not batches:
            await asyncio.sleep(0.01)
        waiting = b.submit([1, 2, 3, 4, 5], [10, 500, 11, 490, 12])  # batches [1, 3], [2, 4], [5]
        sizes = [b._batches_to_take(n) for n in (1, 2, 3, 5)]
        gate.set()
        await asyncio.gather(*running, *waiting)
        await b.close()
        return sizes, batches

    sizes, batches = run(go())
    assert sizes == [[1], [2], [2, 1], [2, 2, 1]]
    assert batches == [[0], [1, 3], [2, 4], [5]]


def test_an_async_run_batch_keeps_up_to_concurrency_batches_in_flight_while_the_queue_fills():
    """A remote reward's batches: awaited on the loop, `concurrency` at once; while every slot is busy
    the items that arrive wait, and go together in the next batch."""

    async def go():
        batches: list[list[int]] = []
        release = asyncio.Event()
        in_flight = peak = 0

        async def run_batch(payloads: list[int]) -> list[int]:
            nonlocal in_flight, peak
            batches.append(list(payloads))
            in_flight += 1
            peak = max(peak, in_flight)
            await release.wait()
            in_flight -= 1
            return [p * 10 for p in payloads]

        b = Batcher(run_batch, name="t", max_items=2, max_tokens=2, max_wait_s=0, max_queue=16, concurrency=2)
        b.start()
        first = b.submit([0, 1, 2, 3], [1] * 4)  # two full batches take both slots
        while len(batches) < 2:
            await asyncio.sleep(0.01)
        later = b.submit([4, 5], [1] * 2)  # no slot: they wait, together
        await asyncio.sleep(0.05)
        assert len(batches) == 2 and b.depth() == 2
        release.set()
        out = await asyncio.gather(*first, *later)
        await b.close()
        return out, batches, peak

    out, batches, peak = run(go())
    assert out == [p * 10 for p in range(6)]
    assert batches == [[0, 1], [2, 3], [4, 5]] and peak == 2


def test_concurrency_needs_an_async_run_batch():
    with pytest.raises(ValueError, match="async run_batch"):
        Batcher(lambda p: p, name="t", max_items=2, max_tokens=2, max_wait_s=0, max_queue=4, concurrency=2)
