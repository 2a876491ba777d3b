"""The reward transports over several replicas: each round trip goes to one, picked and recorded by
`Replicas` (`clients/replicas.py`: least outstanding, failing replicas avoided, `failover` set).

`RewardClient.http(...)` and `.grpc(...)` always build one of these, over one replica or several,
so one address behaves as it always did (one replica: nothing to fail over to, so the retry loop
backs off as before). Probes ask every replica: healthy or ready when any is, since a call then
has somewhere to go.

Shards. `shards` and `merged` split one score or compare batch over replicas and join the answers
(`RewardClient.score` decides when: see clients/reward.py).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from typing import TypeVar

from assay.clients.errors import ServerError
from assay.clients.replicas import Replicas
from assay.clients.reward_transport import AsyncRewardTransport, Probe, RewardTransport
from assay.rm_server.protocol import CompareRequest, CompareResponse, RewardsResponse, ScoreRequest, ScoreResponse

T = TypeVar("T")
Request = TypeVar("Request", ScoreRequest, CompareRequest)
Reply = TypeVar("Reply", ScoreResponse, CompareResponse)
SHARD_MIN_ITEMS = 16  # a batch is split over replicas into shards of at least this many items


def shards(req: Request, n: int) -> list[Request]:
    """`req`'s items in `n` contiguous shards of near-equal size, each a request of its own."""
    size, extra = divmod(len(req.items), n)
    bounds = [i * size + min(i, extra) for i in range(n + 1)]
    return [req.model_copy(update={"items": req.items[a:b]}) for a, b in itertools.pairwise(bounds)]


def merged(req: Request, replies: list[Reply]) -> Reply:
    """The shards' (checked) replies joined in shard order, as one reply to `req`; ServerError when the
    replicas that answered serve different rewards under its name (their reward ids differ)."""
    ids = sorted({r.reward_id for r in replies})
    if len(ids) > 1:
        raise ServerError(f"the replicas serve different rewards as {req.reward!r}: reward ids {', '.join(ids)}")
    return replies[0].model_copy(update={"results": [result for r in replies for result in r.results]})


class Replicated:
    """A `RewardTransport` over the replicas of one reward service."""

    def __init__(self, replicas: Replicas[RewardTransport]) -> None:
        self.replicas = replicas

    def score(self, req: ScoreRequest, timeout: float) -> ScoreResponse:
        return self._one(lambda t: t.score(req, timeout))

    def compare(self, req: CompareRequest, timeout: float) -> CompareResponse:
        return self._one(lambda t: t.compare(req, timeout))

    def rewards(self, timeout: float) -> RewardsResponse:
        return self._one(lambda t: t.rewards(timeout))

    def probe(self, what: Probe, timeout: float) -> bool:
        return any(r.conn.probe(what, timeout) for r in self.replicas.all())

    def close(self) -> None:
        for conn in [r.conn for r in self.replicas.all()] + self.replicas.take_dropped():
            conn.close()

    def _one(self, send: Callable[[RewardTransport], T]) -> T:
        if self.replicas.due():
            self.replicas.refresh()
            for conn in self.replicas.take_dropped():
                conn.close()
        with self.replicas.use() as replica:
            return send(replica.conn)


class AsyncReplicated:
    """`Replicated`, awaited; a service address is resolved again on a worker thread, off the loop."""

    def __init__(self, replicas: Replicas[AsyncRewardTransport]) -> None:
        self.replicas = replicas

    async def score(self, req: ScoreRequest, timeout: float) -> ScoreResponse:
        return await self._one(lambda t: t.score(req, timeout))

    async def compare(self, req: CompareRequest, timeout: float) -> CompareResponse:
        return await self._one(lambda t: t.compare(req, timeout))

    async def rewards(self, timeout: float) -> RewardsResponse:
        return await self._one(lambda t: t.rewards(timeout))

    async def probe(self, what: Probe, timeout: float) -> bool:
        answers = await asyncio.gather(*(r.conn.probe(what, timeout) for r in self.replicas.all()))
        return any(answers)

    async def close(self) -> None:
        for conn in [r.conn for r in self.replicas.all()] + self.replicas.take_dropped():
            await conn.close()

    async def _one(self, send: Callable[[AsyncRewardTransport], Awaitable[T]]) -> T:
        if self.replicas.due():
            await asyncio.to_thread(self.replicas.refresh)
            for conn in self.replicas.take_dropped():
                await conn.close()
        with self.replicas.use() as replica:
            return await send(replica.conn)
