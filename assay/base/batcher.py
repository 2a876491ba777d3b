"""Dynamic batching: items from concurrent requests share model forward passes.

Requests put their items on one bounded queue per model, each with a cost (its length in
tokens). A collector task forms a batch when the batch it would take is full, or when the oldest
item has waited `max_wait_s`, and runs it on the model's own worker thread, so the event loop
never waits on a forward pass.

Length-aware formation (`form_batches`): a batch is the oldest item and its neighbours in cost,
nearest first, up to `max_items` items and a padded token budget, `max_tokens` >= items x the
longest item, which is what a padded forward computes and holds in memory. Taking the queue in
arrival order instead pads a 50-token item to the 2,000-token item that arrived beside it: on
lognormal reward traffic (p50 377, p90 1,149 tokens) arrival-order batches of 32 scored 3.6
items/s on one CPU thread where the same items in length-sorted batches scored 56. The oldest
item always goes, so an item waits at most for the items ahead of it, never for a better
neighbour; an item over the budget runs alone. Items of one cost keep their arrival order.
Results go to each item's own future, whatever batch it ran in, so each request's results stay
in its own order.

Remote work (`concurrency`): a `run_batch` that is a coroutine function runs on the event loop, not
the worker thread, up to `concurrency` batches at once (a reward served by another server takes
several requests in flight, each one batch). While every slot is busy, arrivals keep queuing and
join the next batch, so a slow server gets fuller batches rather than more of them.

Back-pressure: a request whose items do not all fit in the queue is refused whole
(`errors.Overloaded`, which becomes 429 / RESOURCE_EXHAUSTED). A request that gives up (its
deadline passed, its client went away) cancels its futures, and cancelled items are dropped
when the batch is formed, so abandoned work is not computed.

Retry-After: a refusal's `retry_after_s` estimates when the same request would fit. Items leave
the queue a batch at a time, each time the running batch ends; so the wait is what is left of
the running batch plus the time of each further batch needed before enough items have left,
those batches formed by the same rule (`form_batches`) over the queue as it stands. A batch's
time is a line in its items (fixed cost + cost per item) fitted to the recent batches
(`BatchTimes`): on a GPU the per-item part is near zero, on a CPU it is not. (With mixed lengths
a batch's time follows its padded tokens more than its items: the line is fitted to what ran.)
"""

from __future__ import annotations

import asyncio
import inspect
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from assay.base.errors import InvalidRequest, Overloaded

P = TypeVar("P")
R = TypeVar("R")

RETRY_AFTER_BOUNDS_S = (0.05, 120.0)  # the estimate is clamped to this range


class BatchTimes:
    """A batch's duration as `fixed + per_item * items`, fitted by least squares to the recent batches,
    each batch's weight decaying by `forget` per later batch. Until batches of two sizes have been
    seen there is no per-item part: every batch takes the (weighted) mean time."""

    def __init__(self, forget: float = 0.8, first_guess_s: float = 1.0) -> None:
        self.forget, self.first_guess_s = forget, first_guess_s
        self._w = self._x = self._y = self._xx = self._xy = 0.0  # weighted sums of 1, items, s, items², items*s

    def add(self, items: int, seconds: float) -> None:
        f = self.forget
        self._w, self._x, self._y = f * self._w + 1, f * self._x + items, f * self._y + seconds
        self._xx, self._xy = f * self._xx + items * items, f * self._xy + items * seconds

    def predict(self, items: int) -> float:
        if self._w == 0:
            return self.first_guess_s
        mean_x, mean_y = self._x / self._w, self._y / self._w
        var_x = self._xx / self._w - mean_x * mean_x
        per_item = max(0.0, (self._xy / self._w - mean_x * mean_y) / var_x) if var_x > 1e-9 else 0.0
        return max(0.0, mean_y + per_item * (items - mean_x))


def form_batches(costs: Sequence[int], max_items: int, max_tokens: int) -> Iterator[list[int]]:
    """The batches the batcher takes, one after another, from a queue of items with these costs
    (in arrival order) if nothing arrives meanwhile: each a list of positions, in arrival order.

    A batch is the oldest item left and a run of its neighbours in cost order, the nearer
    neighbour first (a tie goes to the shorter, which widens nothing), while the batch stays
    within `max_items` items and `max_tokens` >= items x its longest item. When the next longer
    neighbour would break the budget, shorter ones may still join; when a shorter one would, no
    item can. Example: costs [40, 900, 35, 1000, 50], max_items 3 -> [0, 2, 4], then [1, 3]."""
    keys = sorted((cost, k) for k, cost in enumerate(costs))  # cost order; one cost in arrival order
    taken = [False] * len(costs)
    oldest = 0
    while oldest < len(costs):
        anchor = width = costs[oldest]
        lo = bisect_left(keys, (anchor, oldest))
        hi, longer = lo + 1, True  # the batch is keys[lo:hi]; longer: a longer neighbour may still join
        while hi - lo < max_items:
            shorter = keys[lo - 1][0] if lo > 0 else None
            nxt = keys[hi][0] if longer and hi < len(keys) else None
            if shorter is not None and (nxt is None or anchor - shorter <= nxt - anchor):
                if (hi - lo + 1) * width > max_tokens:
                    break  # the batch is at its budget: no item, short or long, fits
                lo -= 1
            elif nxt is not None:
                if (hi - lo + 1) * nxt > max_tokens:
                    longer = False
                    continue
                hi, width = hi + 1, nxt
            else:
                break
        batch = sorted(k for _, k in keys[lo:hi])
        del keys[lo:hi]
        for k in batch:
            taken[k] = True
        while oldest < len(costs) and taken[oldest]:
            oldest += 1
        yield batch


@dataclass
class _Waiting(Generic[P]):
    payload: P
    cost: int
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)


class Batcher(Generic[P, R]):
    """Packs payloads into calls of `run_batch(list[P]) -> list[R]` on a worker thread, or, when
    `run_batch` is a coroutine function, on the event loop, `concurrency` batches at a time."""

    def __init__(
        self,
        run_batch: Callable[[list[P]], list[R]] | Callable[[list[P]], Awaitable[list[R]]],
        *,
        name: str,
        max_items: int,
        max_tokens: int,
        max_wait_s: float,
        max_queue: int,
        on_batch: Callable[[int, int], None] | None = None,
        concurrency: int = 1,
    ) -> None:
        self.name = name
        self._run_batch = run_batch
        self._remote = inspect.iscoroutinefunction(run_batch)
        if concurrency != 1 and not self._remote:
            raise ValueError("concurrency > 1 needs an async run_batch: a model's batches share one worker thread")
        self.max_items, self.max_tokens, self.max_wait_s, self.max_queue = max_items, max_tokens, max_wait_s, max_queue
        self.concurrency = concurrency
        self._on_batch = on_batch
        self._queue: list[_Waiting[P]] = []
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"batch-{name}")
        self._task: asyncio.Task | None = None
        self._slots = asyncio.Semaphore(concurrency)
        self._in_flight: set[asyncio.Task] = set()  # async batches running
        self._times = BatchTimes()  # for Retry-After
        self._running: dict[int, tuple[float, int]] = {}  # per running batch: its start and items

    def depth(self) -> int:
        """Items waiting, not counting those whose request already gave up."""
        self._drop_cancelled()
        return len(self._queue)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._collect(), name=f"batcher-{self.name}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for t in list(self._in_flight):
            t.cancel()
        if self._in_flight:
            await asyncio.gather(*self._in_flight, return_exceptions=True)
        for w in self._queue:
            w.future.cancel()
        self._queue.clear()
        self._executor.shutdown(wait=True, cancel_futures=True)

    def submit(self, payloads: Sequence[P], costs: Sequence[int]) -> list[asyncio.Future]:
        """Queue all payloads or none; raises `Overloaded` when they do not fit."""
        if self._task is None:
            raise RuntimeError(f"batcher {self.name} is not started")
        self._drop_cancelled()
        if len(payloads) > self.max_queue:  # would never fit: waiting cannot help
            raise InvalidRequest(
                f"reward {self.name!r}: {len(payloads)} items in one request, more than its queue holds "
                f"({self.max_queue}); split the request"
            )
        if len(self._queue) + len(payloads) > self.max_queue:
            wait = self.retry_after(len(self._queue) + len(payloads) - self.max_queue)
            raise Overloaded(
                f"reward {self.name!r}: queue is full ({len(self._queue)} of {self.max_queue} items waiting); "
                f"retry after {wait:.2f}s",
                retry_after_s=wait,
            )
        loop = asyncio.get_running_loop()
        futures = []
        for payload, cost in zip(payloads, costs, strict=True):
            w = _Waiting(payload, cost, loop.create_future())
            self._queue.append(w)
            futures.append(w.future)
        self._arrived.set()
        return futures

    async def _collect(self) -> None:
        while True:
            await self._slots.acquire()  # a batch slot: one for the model's thread, `concurrency` remote
            try:
                batch = await self._next_batch()
            except BaseException:
                self._slots.release()
                raise
            if not batch:
                self._slots.release()
                continue
            if self._remote:  # the next batch may form while this one is in flight
                task = asyncio.get_running_loop().create_task(self._run(batch), name=f"batch-{self.name}")
                self._in_flight.add(task)
                task.add_done_callback(self._in_flight.discard)
            else:
                await self._run(batch)

    async def _next_batch(self) -> list[_Waiting[P]]:
        """Wait for items, then for company until the batch the oldest item would go in is full, or
        until that item's deadline; arrivals and cancellations change the batch, so it is formed anew."""
        while True:
            self._drop_cancelled()
            if self._queue:
                break
            self._arrived.clear()
            await self._arrived.wait()
        deadline = self._queue[0].enqueued + self.max_wait_s
        while True:
            self._drop_cancelled()
            chosen = self._choose()
            if self._full(chosen) or (left := deadline - time.monotonic()) <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                pass  # formed once more, and taken
        return self._take(chosen)

    async def _run(self, batch: list[_Waiting[P]]) -> None:
        """Run one batch (on the worker thread, or awaited) and give each waiter its result; frees its slot."""
        key = id(batch)
        self._running[key] = (started := time.monotonic(), len(batch))
        payloads = [w.payload for w in batch]
        try:
            if self._remote:
                results = await self._run_batch(payloads)  # type: ignore[misc]
            else:
                loop = asyncio.get_running_loop()
                results = await loop.run_in_executor(self._executor, self._run_batch, payloads)
        except Exception as exc:  # noqa: BLE001 - the batch failed, for any reason: every waiter learns why
            for w in batch:
                if not w.future.done():
                    w.future.set_exception(exc)
            return
        finally:
            del self._running[key]
            self._slots.release()
        self._times.add(len(batch), time.monotonic() - started)
        if self._on_batch is not None:
            self._on_batch(len(batch), sum(w.cost for w in batch))
        for w, r in zip(batch, results, strict=True):
            if not w.future.done():
                w.future.set_result(r)

    def retry_after(self, items: int) -> float:
        """Seconds until `items` more items would fit: until that many queued ones have been taken
        into batches. The first batch is taken when a slot frees (at once when one is free: the
        running batch ends, or the first of `concurrency` remote ones), each further one when the
        one before it ends (remote: `concurrency` at a time)."""
        wait = 0.0
        if len(self._running) >= self.concurrency:
            now = time.monotonic()
            wait = min(max(0.0, self._times.predict(n) - (now - t0)) for t0, n in self._running.values())
        wait += sum(self._times.predict(size) for size in self._batches_to_take(items)[:-1]) / self.concurrency
        low, high = RETRY_AFTER_BOUNDS_S
        return min(max(wait, low), high)

    def _batches_to_take(self, items: int) -> list[int]:
        """The sizes of the batches `_take` forms from the queue until `items` items have left it,
        the last one counting only the items still needed."""
        sizes: list[int] = []
        for batch in form_batches([w.cost for w in self._queue], self.max_items, self.max_tokens):
            if items <= 0:
                break
            sizes.append(min(len(batch), items))
            items -= len(batch)
        return sizes

    def _drop_cancelled(self) -> None:
        if any(w.future.done() for w in self._queue):
            self._queue = [w for w in self._queue if not w.future.done()]

    def _choose(self) -> list[int]:
        """Positions in the queue of the batch `form_batches` takes first from it."""
        return next(form_batches([w.cost for w in self._queue], self.max_items, self.max_tokens), [])

    def _full(self, chosen: list[int]) -> bool:
        """No item that arrives could join this batch: it holds `max_items`, or one more item of
        its longest item's cost would break the budget (a longer one would too)."""
        width = max((self._queue[k].cost for k in chosen), default=0)
        return len(chosen) >= self.max_items or (len(chosen) + 1) * width > self.max_tokens

    def _take(self, chosen: list[int]) -> list[_Waiting[P]]:
        picked = set(chosen)
        batch = [self._queue[k] for k in chosen]
        self._queue = [w for k, w in enumerate(self._queue) if k not in picked]
        return batch
