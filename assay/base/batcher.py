"""Dynamic batching: items from concurrent requests share model forward passes.

Requests put their items on one bounded queue per model. A collector task takes the oldest
items and closes a batch when it holds `max_items` items, when the next item would overrun the
token budget, or when the oldest item has waited `max_wait_s`. The batch runs on the model's
own worker thread, so the event loop never waits on a forward pass.

Back-pressure: a request whose items do not all fit in the queue is refused whole
(`errors.Overloaded`, which becomes 429 / RESOURCE_EXHAUSTED). A request that gives up (its
deadline passed, its client went away) cancels its futures, and cancelled items are dropped
when the batch is formed, so abandoned work is not computed.

Retry-After: a refusal's `retry_after_s` estimates when the same request would fit. Items leave
the queue a batch at a time, each time the running batch ends; so the wait is what is left of
the running batch plus the time of each further batch needed before enough items have left,
those batches counted by the packing rule over the queue as it stands. A batch's time is a line
in its items (fixed cost + cost per item) fitted to the recent batches (`BatchTimes`): on a GPU
the per-item part is near zero, on a CPU it is not. The old estimate, an average time per item
times the items queued, overstated the wait 13-50x: batches run their items together.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Callable, Sequence
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


@dataclass
class _Waiting(Generic[P]):
    payload: P
    cost: int
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)


class Batcher(Generic[P, R]):
    """Packs payloads into calls of `run_batch(list[P]) -> list[R]` on a worker thread."""

    def __init__(
        self,
        run_batch: Callable[[list[P]], list[R]],
        *,
        name: str,
        max_items: int,
        max_tokens: int,
        max_wait_s: float,
        max_queue: int,
        on_batch: Callable[[int, int], None] | None = None,
    ) -> None:
        self.name = name
        self._run_batch = run_batch
        self.max_items, self.max_tokens, self.max_wait_s, self.max_queue = max_items, max_tokens, max_wait_s, max_queue
        self._on_batch = on_batch
        self._queue: deque[_Waiting[P]] = deque()
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"batch-{name}")
        self._task: asyncio.Task | None = None
        self._times = BatchTimes()  # for Retry-After
        self._running: tuple[float, int] | None = None  # the running batch's start and items; None: none runs

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
        loop = asyncio.get_running_loop()
        while True:
            self._drop_cancelled()
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            # Wait for company until the batch is full or the oldest item's deadline passes.
            deadline = self._queue[0].enqueued + self.max_wait_s
            while not self._full() and (left := deadline - time.monotonic()) > 0:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except TimeoutError:
                    break
                self._drop_cancelled()
            batch = self._take()
            if not batch:
                continue
            self._running = (started := time.monotonic(), len(batch))
            try:
                results = await loop.run_in_executor(self._executor, self._run_batch, [w.payload for w in batch])
            except Exception as exc:  # noqa: BLE001 - the batch failed, for any reason: every waiter learns why
                for w in batch:
                    if not w.future.done():
                        w.future.set_exception(exc)
                continue
            finally:
                self._running = None
            self._times.add(len(batch), time.monotonic() - started)
            if self._on_batch is not None:
                self._on_batch(len(batch), sum(w.cost for w in batch))
            for w, r in zip(batch, results, strict=True):
                if not w.future.done():
                    w.future.set_result(r)

    def retry_after(self, items: int) -> float:
        """Seconds until `items` more items would fit: until that many queued ones have been taken
        into batches. The first batch is taken when the running one ends (at once when none runs),
        each further one when the one before it ends."""
        wait = 0.0
        if self._running is not None:
            started, running = self._running
            wait = max(0.0, self._times.predict(running) - (time.monotonic() - started))
        wait += sum(self._times.predict(size) for size in self._batches_to_take(items)[:-1])
        low, high = RETRY_AFTER_BOUNDS_S
        return min(max(wait, low), high)

    def _batches_to_take(self, items: int) -> list[int]:
        """The sizes of the batches `_take` forms from the queue until `items` items have left it."""
        sizes, tokens = [0], 0
        for w in itertools.islice(self._queue, items):
            if sizes[-1] and (sizes[-1] >= self.max_items or tokens + w.cost > self.max_tokens):
                sizes.append(0)
                tokens = 0
            sizes[-1] += 1
            tokens += w.cost
        return sizes

    def _drop_cancelled(self) -> None:
        if any(w.future.done() for w in self._queue):
            self._queue = deque(w for w in self._queue if not w.future.done())

    def _full(self) -> bool:
        tokens = 0
        for items, w in enumerate(self._queue, 1):
            tokens += w.cost
            if items >= self.max_items or tokens >= self.max_tokens:
                return True
        return False

    def _take(self) -> list[_Waiting[P]]:
        batch: list[_Waiting[P]] = []
        tokens = 0
        while self._queue and len(batch) < self.max_items:
            w = self._queue[0]
            if w.future.done():
                self._queue.popleft()
                continue
            # An item larger than the budget still runs, alone.
            if batch and tokens + w.cost > self.max_tokens:
                break
            batch.append(self._queue.popleft())
            tokens += w.cost
        return batch
