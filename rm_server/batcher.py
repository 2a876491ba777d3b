"""Dynamic batching: items from concurrent requests share model forward passes.

Requests put their items on one bounded queue per model. A collector task takes the oldest
items and closes a batch when it holds `max_items` items, when the next item would overrun the
token budget, or when the oldest item has waited `max_wait_s`. The batch runs on the model's
own worker thread, so the event loop never waits on a forward pass.

Back-pressure: a request whose items do not all fit in the queue is refused whole
(`errors.Overloaded`, which becomes 429 / RESOURCE_EXHAUSTED). A request that gives up (its
deadline passed, its client went away) cancels its futures, and cancelled items are dropped
when the batch is formed, so abandoned work is not computed.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from rm_server.errors import InvalidRequest, Overloaded

P = TypeVar("P")
R = TypeVar("R")


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
        self._seconds_per_item = 1e-3  # running estimate, for Retry-After

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
            wait = max(0.05, (len(self._queue) + len(payloads)) * self._seconds_per_item)
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
            started = time.monotonic()
            try:
                results = await loop.run_in_executor(self._executor, self._run_batch, [w.payload for w in batch])
            except Exception as exc:  # the whole batch failed: every waiter learns why
                for w in batch:
                    if not w.future.done():
                        w.future.set_exception(exc)
                continue
            elapsed = time.monotonic() - started
            self._seconds_per_item = 0.8 * self._seconds_per_item + 0.2 * elapsed / len(batch)
            if self._on_batch is not None:
                self._on_batch(len(batch), sum(w.cost for w in batch))
            for w, r in zip(batch, results, strict=True):
                if not w.future.done():
                    w.future.set_result(r)

    def _drop_cancelled(self) -> None:
        if any(w.future.done() for w in self._queue):
            self._queue = deque(w for w in self._queue if not w.future.done())

    def _full(self) -> bool:
        items = tokens = 0
        for w in self._queue:
            items += 1
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

