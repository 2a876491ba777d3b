"""What "remote" means for a reward another server computes: the judge and the `remote.*` rewards.

One `Endpoint` per reward holds its HTTP connection to that server and every rule they share:

- **Key**: from the environment variable the spec names (`api_key_env`), sent as a bearer token;
  the variable unset is a start-up error naming it.
- **Start-up check**: one request with the key. A refused key (401, 403) is a configuration error
  no retry mends, so the service does not start (`KeyRefused`, naming the reward and the fix). A
  server that does not answer yet is fine (it may start later): its items fail typed until it does.
- **Concurrency**: at most `max_concurrency` requests in flight, on as many pooled connections.
- **Deadlines**: each attempt waits at most `timeout_s`, and never past the request's deadline.
- **Retries**: a connection refused or dropped, 429, 502, 503 and 504 are tried again, up to
  `retries` times, with the clients' backoff (`assay.clients.retry.RetryPolicy`: full jitter,
  never sooner than the server's Retry-After, never when that reaches past the deadline). A timed
  out attempt is not retried (the deadline would take the next one too), nor any other 4xx.
- **Typed failures**: what a retry could mend is `unavailable` (judge_unavailable,
  remote_unavailable), what it cannot is `error` (judge_error, remote_error), an attempt that
  timed out is `timeout`; the message names the URL and shows the start of the answer. Never a 0.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

import httpx

from assay.clients.errors import Overloaded, ServiceError, Unavailable, retry_after_s
from assay.clients.retry import RetryPolicy
from assay.rm_server.protocol import ErrorType
from assay.rm_server.rewards.base import DEADLINE, ItemFailure

SNIPPET = 200  # characters of a remote's answer quoted in a failure's message
_CHECK_S = 10.0  # the start-up check waits at most this long for the server
_RETRY_STATUSES = (429, 502, 503, 504)  # overloaded, or a proxy in front of a server that is not there

log = logging.getLogger(__name__)


class KeyRefused(ValueError):
    """A remote server refuses the reward's key: fix the key, then start the service."""


class _Retry(Exception):
    """One attempt failed in a way another attempt may mend; `error` is what the retry policy reads."""

    def __init__(self, error: ServiceError, failure: ItemFailure) -> None:
        super().__init__(failure.message)
        self.error, self.failure = error, failure


class _Left:
    """The request's deadline as `RetryPolicy.wait` reads it: seconds left (no deadline: forever)."""

    def __init__(self, deadline: float | None) -> None:
        self.deadline = deadline

    def remaining(self) -> float:
        return math.inf if self.deadline is None else self.deadline - asyncio.get_running_loop().time()


class Endpoint:
    """One reward's connection to the server that computes it (see the module docstring).

    `who` names the reward in messages ("judge 'grader'"); `what` names the server in item
    failures ("judge endpoint"); `unavailable` and `error` are the two failure types."""

    def __init__(
        self,
        who: str,
        what: str,
        *,
        api_key_env: str | None,
        timeout_s: float,
        max_concurrency: int,
        retries: int,
        unavailable: ErrorType = ErrorType.remote_unavailable,
        error: ErrorType = ErrorType.remote_error,
        refused: type[KeyRefused] = KeyRefused,
    ) -> None:
        self.who, self.what = who, what
        self.api_key_env, self.timeout_s, self.max_concurrency = api_key_env, timeout_s, max_concurrency
        self.policy = RetryPolicy(max_retries=retries, backoff_s=0.1, max_backoff_s=2.0, min_attempt_s=0.05)
        self.unavailable, self.error, self.refused = unavailable, error, refused
        self._client: httpx.AsyncClient | None = None
        self._slots: asyncio.Semaphore | None = None
        self.pending = 0  # requests waiting for a slot or in flight
        self.on_call: Callable[[str, float], None] | None = None  # (outcome, seconds) per attempt: the metrics

    async def start(self, check: str, body: Any = None) -> None:
        """Open the connection pool and check the key: GET `check` (with `body`: POST it as JSON)."""
        headers = {}
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise RuntimeError(f"{self.who}: environment variable {self.api_key_env} is unset")
            headers["Authorization"] = f"Bearer {key}"
        n = self.max_concurrency
        self._client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(self.timeout_s),  # per phase: connect, write, read
            limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
        )
        self._slots = asyncio.Semaphore(n)
        await self._check_key(check, body)

    async def _check_key(self, url: str, body: Any) -> None:
        assert self._client is not None
        try:
            timeout = min(self.timeout_s, _CHECK_S)
            if body is None:
                r = await self._client.get(url, timeout=timeout)
            else:
                r = await self._client.post(url, json=body, timeout=timeout)
        except httpx.TransportError as exc:
            why = f"its items fail as {self.unavailable.value} until it does"
            log.warning("%s: %s does not answer yet (%r); %s", self.who, url, exc, why)
            return
        if r.status_code in (401, 403):
            if self.api_key_env:
                fix = f"set the key it accepts in ${self.api_key_env}"
            else:
                fix = "it needs a key: name the variable that holds it in the spec's api_key_env"
            await self.close()
            refused = f"{r.status_code} {r.text[:SNIPPET]!r}"
            raise self.refused(f"{self.who}: {url} refused its key ({refused}); {fix}")
        if r.status_code >= 400:  # a server without that route, or not ready: the scoring calls decide
            log.warning("%s: %s answered %d at start-up", self.who, url, r.status_code)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def post(self, url: str, body: Any, deadline: float | None = None) -> Any:
        """POST `body` as JSON and return the answer's JSON, retrying what a retry may mend until
        `retries` or the deadline (event-loop time; None: the request's `DEADLINE`, if any) runs out.
        Any failure is raised as an `ItemFailure` (see the module docstring)."""
        left = _Left(deadline if deadline is not None else DEADLINE.get())
        for attempt in itertools.count():
            try:
                return await self._once(url, body, left)
            except _Retry as retry:
                wait = self.policy.wait(attempt, retry.error, left)
                if wait is None:
                    raise retry.failure from None
                await asyncio.sleep(wait)
        raise AssertionError("unreachable")

    async def _once(self, url: str, body: Any, left: _Left) -> Any:
        """One attempt, timed for the metrics from the moment it has a slot."""
        started: list[float] = []  # set when the attempt has a slot: the wait for one is not the server's
        try:
            answer = await self._attempt(url, body, left, started)
        except (_Retry, ItemFailure) as exc:
            failure = exc.failure if isinstance(exc, _Retry) else exc
            self._record(failure.type.value, started)
            raise
        self._record("ok", started)
        return answer

    def _record(self, outcome: str, started: list[float]) -> None:
        if self.on_call is not None and started:
            self.on_call(outcome, time.monotonic() - started[0])

    async def _attempt(self, url: str, body: Any, left: _Left, started: list[float]) -> Any:
        if self._client is None or self._slots is None:
            raise RuntimeError(f"{self.who} used before start()")
        self.pending += 1
        try:
            async with self._slots:
                started.append(time.monotonic())
                timeout = min(self.timeout_s, left.remaining())
                if timeout <= 0:
                    raise ItemFailure(ErrorType.timeout, "the request deadline passed before this item was scored")
                r = await self._client.post(url, json=body, timeout=timeout)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError) as exc:
            # refused, or dropped mid-request: another attempt may reach a server that is back
            failure = ItemFailure(self.unavailable, f"{self.what} {url} unreachable: {exc!r}")
            raise _Retry(Unavailable(failure.message), failure) from None
        except (httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout):
            why = f"{self.what} {url} did not answer within {timeout:g}s"
            raise ItemFailure(ErrorType.timeout, why) from None
        except httpx.TransportError as exc:  # a protocol error of another kind
            raise ItemFailure(self.unavailable, f"{self.what} {url} failed: {exc!r}") from None
        finally:
            self.pending -= 1
        answered = f"{self.what} {url} answered {r.status_code}: {r.text[:SNIPPET]!r}"
        if r.status_code in _RETRY_STATUSES:
            failure = ItemFailure(self.unavailable, answered)
            wait = retry_after_s(r.headers.get("retry-after"))
            error = (Overloaded if r.status_code == 429 else Unavailable)(answered, retry_after_s=wait)
            raise _Retry(error, failure)
        if r.status_code >= 500:  # the server failed on this request: down in a way a retry will not mend
            raise ItemFailure(self.unavailable, answered)
        if r.status_code >= 400:
            raise ItemFailure(self.error, answered)
        try:
            return r.json()
        except ValueError:
            raise ItemFailure(self.error, f"{answered} (not JSON)") from None
