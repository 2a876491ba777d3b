"""Whether the reward service that `/v1/search` scores with answers: checked at start, then in the background.

The policy server needs rm_server only for search; generation works without it. So a reward
service that does not answer at start is not a refusal: the server logs one WARNING naming the
URL and what went wrong, starts anyway, and reports the dependency on `/ready` as `degraded`
(`{"status": "ok", "dependencies": {"rm": "degraded"}}`), still with status 200. A 503 would take
the pod out of rotation (Kubernetes' readiness semantics), and with it the generation that works.
The check repeats every `interval_s` in the background, so `/ready` turns `ok` once the reward
service comes up (logged at INFO), and `degraded` again if it goes away (a WARNING again).

One check lists the rewards with this server's key (`GET /v1/rewards`: the service answers and
takes the key), then asks `/ready` (its rewards are loaded). One try each, no retries: the next
check is the retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Literal

from assay.clients.errors import ServiceError
from assay.clients.reward import AsyncRewardClient

log = logging.getLogger(__name__)

State = Literal["ok", "degraded"]


class RewardServiceCheck:
    """The reward service's state as `/ready` reports it: `start` checks once and keeps checking."""

    def __init__(self, url: str, api_key: str | None, interval_s: float = 5.0, timeout_s: float = 5.0) -> None:
        self.url, self.interval_s = url, interval_s
        self.state: State = "degraded"
        self._client = AsyncRewardClient.http(url, api_key=api_key, timeout_s=timeout_s, max_retries=0)
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        """Check once (a WARNING when the reward service does not answer), then every `interval_s`."""
        problem = await self._problem()
        self.state = "ok" if problem is None else "degraded"
        if problem is not None:
            log.warning(
                "the reward service at %s does not answer (%s); starting anyway: /v1/search fails until it does, "
                "and /ready reports it degraded",
                self.url,
                problem,
            )
        self._task = asyncio.create_task(self._follow())

    async def check(self) -> State:
        """Check now; log a change of state."""
        problem = await self._problem()
        if problem is None and self.state == "degraded":
            log.info("the reward service at %s answers now", self.url)
        elif problem is not None and self.state == "ok":
            log.warning("the reward service at %s stopped answering (%s)", self.url, problem)
        self.state = "ok" if problem is None else "degraded"
        return self.state

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.check()

    async def _problem(self) -> str | None:
        """What is wrong with the reward service, in a few words; None when it answers and is ready."""
        try:
            await self._client.rewards()
        except ServiceError as exc:
            return str(exc)
        if not await self._client.ready():
            return "it answers, but /ready says it is not ready (loading its rewards, or stopping)"
        return None

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._client.close()
