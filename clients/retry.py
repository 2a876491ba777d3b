"""The one retry loop of the clients: deadlines, and when a failed attempt is tried again.

Every call has a deadline that covers the whole call, retries and waits included. Only
transient failures are retried (`ServiceError.retryable`: connection refused or reset, HTTP
502/503/504 and 429, gRPC UNAVAILABLE and RESOURCE_EXHAUSTED), and they are retried until the
deadline, not a number of times, so a service that restarts (seconds to load its models, a
minute on a busy machine) costs the caller only the wait; `max_retries` can cap the count as
well. Between tries the client sleeps uniform(0, min(max_backoff_s, backoff_s * 2**retry))
(exponential backoff, full jitter, capped), never less than the server's Retry-After, and
never so long that no time is left for one more try: when the server's Retry-After reaches past
the deadline, the call fails at once with the server's answer. A client of several replicas
marks a failure `failover` when another replica can take the next attempt: that attempt goes at
once, with no sleep (`clients/replicas.py`).

`RetryPolicy.call` and `RetryPolicy.acall` are that loop, blocking and awaited; the reward and
policy clients run every call through them.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from assay.clients.errors import DeadlineExceeded, ServiceError

T = TypeVar("T")

# One attempt: called with the seconds left of the call's deadline, it sends the request once.
Attempt = Callable[[float], T]


class Deadline:
    """The end of one call, on the monotonic clock."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def remaining(self) -> float:
        """Seconds left, <= 0 once the deadline has passed."""
        return self.end - time.monotonic()

    def left(self) -> float:
        """Seconds left; DeadlineExceeded when none are."""
        left = self.remaining()
        if left <= 0:
            raise DeadlineExceeded(f"the call's deadline of {self.seconds:g}s passed")
        return left


class Remaining(Protocol):
    """What `RetryPolicy.wait` reads of a deadline (tests drive it on a simulated clock)."""

    def remaining(self) -> float: ...


@dataclass(frozen=True)
class RetryPolicy:
    """When a failed attempt is tried again, and after how long: see the module docstring.

    `max_retries`: None (the default) retries until the deadline; a number caps the retries too.
    `min_attempt_s`: a retry is only started with at least this much of the deadline left.
    """

    max_retries: int | None = None
    backoff_s: float = 0.2
    max_backoff_s: float = 2.0
    min_attempt_s: float = 0.1

    def __post_init__(self) -> None:
        count_ok = self.max_retries is None or self.max_retries >= 0
        if not (count_ok and 0 <= self.backoff_s <= self.max_backoff_s and self.min_attempt_s >= 0):
            raise ValueError(
                f"need max_retries None or >= 0, 0 <= backoff_s <= max_backoff_s and min_attempt_s >= 0; got "
                f"{self.max_retries}, {self.backoff_s}, {self.max_backoff_s}, {self.min_attempt_s}"
            )

    def wait(self, attempt: int, err: ServiceError, deadline: Remaining) -> float | None:
        """Seconds to sleep after failed attempt number `attempt` (0-based), or None: give up, raise `err`."""
        err.attempts = attempt + 1
        if not err.retryable or (self.max_retries is not None and attempt >= self.max_retries):
            return None
        budget = deadline.remaining() - self.min_attempt_s  # the longest sleep that leaves time for a try
        if err.failover:  # another replica takes it now; the Retry-After was this replica's word
            return 0.0 if budget >= 0 else None
        floor = err.retry_after_s or 0.0  # the server's word: not sooner
        if floor > budget:
            return None  # the server will not take it again before the deadline: say so now, not at the end
        backoff = random.uniform(0.0, min(self.max_backoff_s, self.backoff_s * 2.0 ** min(attempt, 64)))  # full jitter
        return min(max(backoff, floor), budget)

    def call(self, attempt: Attempt[T], seconds: float) -> T:
        """`attempt(seconds_left)` until it answers, within `seconds`; the last failure when it gives up."""
        deadline = Deadline(seconds)
        for n in itertools.count():
            try:
                return attempt(deadline.left())
            except ServiceError as err:
                wait = self.wait(n, err, deadline)
                if wait is None:
                    raise
            time.sleep(wait)
        raise AssertionError("unreachable")

    async def acall(self, attempt: Attempt[Awaitable[T]], seconds: float) -> T:
        """`call`, awaited: the same loop for the asyncio clients."""
        deadline = Deadline(seconds)
        for n in itertools.count():
            try:
                return await attempt(deadline.left())
            except ServiceError as err:
                wait = self.wait(n, err, deadline)
                if wait is None:
                    raise
            await asyncio.sleep(wait)
        raise AssertionError("unreachable")
