"""Clients for the reward service (rm_server): sync and async, over HTTP or gRPC, with one API.

    with RewardClient.http("http://127.0.0.1:8000", api_key="k1") as client:
        reply = client.score("orm", [{"prompt": "3+4=", "response": "3+4=7 #### 7"}])
        reply.results[0].score          # None exactly when reply.results[0].error says why
        orm = client.as_reward_fn("orm")  # TRL's signature: orm(prompts, completions, **kw); clients/reward_fn.py

    async with AsyncRewardClient.grpc("127.0.0.1:50051") as client:
        reply = await client.score("orm", items)

Deadlines. Every call has one: its `timeout_s`, else the client's. It covers the whole call,
retries and waits included. Each attempt sends what is left of it as the request's `timeout_s`
(the server then fails unfinished items with `timeout`) and waits `GRACE_S` longer than that
for the answer, so that the server's per-item answer arrives rather than a client-side
`DeadlineExceeded`.

Retries. Only transient failures are retried (connection refused or reset, HTTP 502/503/504,
429, gRPC UNAVAILABLE and RESOURCE_EXHAUSTED except gRPC's own "message larger than max", which
no wait can fix: that is InvalidRequest), until the call's deadline, with capped, jittered
backoff and never sooner than the server's Retry-After: `clients/retry.py`, the loop the policy
client runs too. Scoring is a pure function of the request, so resending a batch is safe.

Transports. `RewardClient.http(url)` and `.grpc(target)` build one; `RewardClient(transport)`
takes any object with the `RewardTransport` methods (`clients/reward_transport.py`), and gets
the same deadlines, retries and id checks.

Several replicas. `url` (`target`) may name several: a list, a comma-separated string, or a
service address (`dns+http://NAME:PORT`, `dns:///NAME:PORT`), see `clients/replicas.py`. Calls
spread over them (least outstanding), a transient failure fails over to another replica at once,
and `.urls` lists the replicas in use. A score or compare batch of at least 2 x SHARD_MIN_ITEMS
items is split into contiguous shards, one per replica not failing (at most one per
SHARD_MIN_ITEMS items), sent at once and merged back in item order, as OpenRLHF shards a batch
over its reward URLs: a trainer's one large call per step then keeps every replica busy, not one.
Each shard is a call of its own under the one deadline (retries, failover, id checks), and the
shards' reward ids must agree (else `ServerError`: replicas serving different rewards).

Item ids. Items without an id get their position ("0", "1", ...); a retried batch resends the
same ids, and a reply must hold exactly the ids sent, each once (else `ServerError`). Results
come back in request order, matched by id, so a batch can never be counted twice or shifted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, Self, TypedDict, TypeVar, Unpack

from pydantic import ValidationError

from assay.clients.errors import InvalidRequest, ServerError, UnknownReward, problems
from assay.clients.http import CaCert
from assay.clients.replicas import Address, Replicas
from assay.clients.retry import Attempt, RetryPolicy
from assay.clients.reward_fn import RewardFn, RewardFnForm
from assay.clients.reward_replicas import SHARD_MIN_ITEMS, AsyncReplicated, Replicated, merged, shards
from assay.clients.reward_transport import AsyncGrpc, AsyncHttp, AsyncRewardTransport, Grpc, Http, RewardTransport
from assay.rm_server.protocol import (
    CompareItem,
    CompareRequest,
    CompareResponse,
    ErrorType,
    Granularity,
    RewardInfo,
    RewardsResponse,
    ScoreItem,
    ScoreRequest,
    ScoreResponse,
)

GRACE_S = 1.0  # how much longer than the server's deadline a client waits for its answer

T = TypeVar("T")
Item = TypeVar("Item", ScoreItem, CompareItem)

# --- request building and reply checking (pure, shared by every client) -----------------------


def _with_ids(model: type[Item], items: Iterable[Item | Mapping[str, Any]]) -> list[Item]:
    """Validate items; those without an id get their position as id. Ids must be unique."""
    out: list[Item] = []
    for i, item in enumerate(items):
        if isinstance(item, model):
            out.append(item)
            continue
        raw = dict(item)
        if not raw.get("id"):
            raw["id"] = str(i)
        try:
            out.append(model.model_validate(raw))
        except ValidationError as exc:
            raise InvalidRequest(f"item {i} is not a {model.__name__}: {problems(exc)}") from None
    seen: set[str] = set()
    for item in out:
        if item.id in seen:
            raise InvalidRequest(f"item id {item.id!r} appears twice; ids must be unique within a request")
        seen.add(item.id)
    return out


def score_request(reward: str, items: Iterable[ScoreItem | Mapping[str, Any]], granularity: str) -> ScoreRequest:
    try:
        return ScoreRequest(reward=reward, items=_with_ids(ScoreItem, items), granularity=Granularity(granularity))
    except (ValidationError, ValueError) as exc:
        raise InvalidRequest(f"cannot build a score request: {exc}") from None


def compare_request(reward: str, items: Iterable[CompareItem | Mapping[str, Any]]) -> CompareRequest:
    try:
        return CompareRequest(reward=reward, items=_with_ids(CompareItem, items))
    except ValidationError as exc:
        raise InvalidRequest(f"cannot build a compare request: {problems(exc)}") from None


R = TypeVar("R", ScoreResponse, CompareResponse)
Request = TypeVar("Request", ScoreRequest, CompareRequest)


def checked_reply(req: ScoreRequest | CompareRequest, reply: R) -> R:
    """The reply with its results in request order; ServerError unless it has exactly the ids sent."""
    if reply.reward != req.reward:
        raise ServerError(f"asked reward {req.reward!r}, the reply is for {reply.reward!r}")
    by_id = {}
    for result in reply.results:
        if result.id in by_id:
            raise ServerError(f"the reply has item id {result.id!r} twice")
        by_id[result.id] = result
    sent = [item.id for item in req.items]
    missing = [i for i in sent if i not in by_id]
    extra = sorted(set(by_id) - set(sent))
    if missing or extra:
        raise ServerError(
            f"the reply's item ids do not match the request's: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    return reply.model_copy(update={"results": [by_id[i] for i in sent]})


# --- the clients -----------------------------------------------------------------------------

Transport = TypeVar("Transport", RewardTransport, AsyncRewardTransport)


class ClientOptions(TypedDict, total=False):
    """What `RewardClient.http` and `.grpc` pass on to the client (defaults: `_ClientBase.__init__`)."""

    timeout_s: float
    max_retries: int | None
    backoff_s: float
    max_backoff_s: float


class _ClientBase(Generic[Transport]):
    _http_transport: Callable[[Address, str | None, CaCert], Transport]
    _grpc_transport: Callable[[Address, str | None, bool, CaCert], Transport]
    _replicated: Callable[[Replicas[Transport]], Transport]

    def __init__(
        self,
        transport: Transport,
        *,
        timeout_s: float = 30.0,
        max_retries: int | None = None,
        backoff_s: float = 0.2,
        max_backoff_s: float = 2.0,
    ) -> None:
        """A client over `transport`; `RewardClient.http(url)` and `.grpc(target)` build the network ones."""
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self._t: Transport = transport
        self.timeout_s = timeout_s
        self.retry = RetryPolicy(max_retries, backoff_s, max_backoff_s)

    @classmethod
    def http(
        cls,
        url: str | Sequence[str],
        *,
        api_key: str | None = None,
        ca_cert: CaCert = None,
        **options: Unpack[ClientOptions],
    ) -> Self:
        """A client of the HTTP API at base URL `url`, e.g. "http://127.0.0.1:8000" or "https://rm.example:8000",
        or of several replicas (a list, "http://a:8000,http://b:8000", or "dns+http://NAME:8000");
        `ca_cert`: a CA bundle (PEM file) to check an https:// server against, in place of httpx's default
        (SSL_CERT_FILE when set, else certifi's bundle)."""

        def make(address: Address) -> Transport:
            return cls._http_transport(address, api_key, ca_cert)

        return cls(cls._replicated(Replicas.of(url, "http", make, "the reward service")), **options)

    @classmethod
    def grpc(
        cls,
        target: str | Sequence[str],
        *,
        api_key: str | None = None,
        tls: bool = False,
        ca_cert: CaCert = None,
        **options: Unpack[ClientOptions],
    ) -> Self:
        """A client of the gRPC API at `target`, e.g. "127.0.0.1:50051", or of several replicas (a list,
        "10.0.0.5:50051,10.0.0.6:50051", or "dns:///NAME:50051"); over TLS with `tls=True` (gRPC's default
        roots) or with `ca_cert`, a CA bundle (PEM file) to check the server's certificate against."""

        def make(address: Address) -> Transport:
            return cls._grpc_transport(address, api_key, tls, ca_cert)

        return cls(cls._replicated(Replicas.of(target, "grpc", make, "the reward service")), **options)

    @property
    def urls(self) -> list[str]:
        """The base URLs (gRPC: the targets) of the replicas in use; empty over a transport of your own."""
        return self._t.replicas.urls() if isinstance(self._t, (Replicated, AsyncReplicated)) else []

    def _shards(self, req: Request) -> list[Request]:
        """`req` whole, or in shards over the replicas not failing now (see the module docstring)."""
        spread = self._t.replicas.live() if isinstance(self._t, (Replicated, AsyncReplicated)) else 1
        return shards(req, max(1, min(spread, len(req.items) // SHARD_MIN_ITEMS)))

    def _attempt(self, req: Request, send: Callable[[Request, float], T]) -> Attempt[T]:
        """One attempt: the request with what is left of the deadline, waited on GRACE_S longer."""
        return lambda left: send(req.model_copy(update={"timeout_s": left}), left + GRACE_S)


class RewardClient(_ClientBase[RewardTransport]):
    """A blocking client; see the module docstring for deadlines, retries and ids."""

    _http_transport, _grpc_transport, _replicated = Http, Grpc, Replicated

    def _call(self, attempt: Attempt[T], timeout_s: float | None) -> T:
        return self.retry.call(attempt, timeout_s or self.timeout_s)

    def _checked(self, req: Request, send: Callable[[Request, float], R], timeout_s: float | None) -> R:
        """The checked reply to `req`, sent whole or in shards to several replicas at once."""
        parts = self._shards(req)
        if len(parts) == 1:
            return checked_reply(req, self._call(self._attempt(req, send), timeout_s))
        end = time.monotonic() + (timeout_s or self.timeout_s)  # one deadline for every shard

        def one(part: Request) -> R:
            return checked_reply(part, self._call(self._attempt(part, send), max(1e-3, end - time.monotonic())))

        with ThreadPoolExecutor(len(parts), thread_name_prefix="assay-shard") as pool:
            return checked_reply(req, merged(req, list(pool.map(one, parts))))

    def score(
        self,
        reward: str,
        items: Iterable[ScoreItem | Mapping[str, Any]],
        *,
        granularity: str = "outcome",
        timeout_s: float | None = None,
    ) -> ScoreResponse:
        """Score items (ScoreItems or dicts) with one reward; results in request order."""
        return self._checked(score_request(reward, items, granularity), self._t.score, timeout_s)

    def compare(
        self, reward: str, items: Iterable[CompareItem | Mapping[str, Any]], *, timeout_s: float | None = None
    ) -> CompareResponse:
        """P(response_a is better) per item; results in request order."""
        return self._checked(compare_request(reward, items), self._t.compare, timeout_s)

    def rewards(self, *, timeout_s: float | None = None) -> RewardsResponse:
        return self._call(self._t.rewards, timeout_s)

    def reward_id(self, name: str, *, timeout_s: float | None = None) -> str:
        return _find(self.rewards(timeout_s=timeout_s), name)

    def health(self, *, timeout_s: float | None = None) -> bool:
        """Whether the server answers (one try; False when it cannot be reached)."""
        return self._t.probe("health", timeout_s or self.timeout_s)

    def ready(self, *, timeout_s: float | None = None) -> bool:
        """Whether the server has loaded its rewards and takes requests (one try)."""
        return self._t.probe("ready", timeout_s or self.timeout_s)

    def as_reward_fn(
        self, reward: str, *, reference_key: str | None = None, timeout_s: float | None = None
    ) -> RewardFn:
        """This reward as a TRL reward function, `f(prompts, completions, **kw) -> list[float | None]`.

        Conversations are sent whole (`messages`); the reference is the column `reference_key`, or
        the first of `reference`, `answer`, `solution`, `ground_truth`; a row without one, for a
        reward that needs one, gets None, as does a failed item; the other dataset columns travel as
        `metadata`. The details: `clients/reward_fn.py`. The function carries `.reward_id`.
        """
        form = _form(self.rewards(timeout_s=timeout_s), reward, reference_key)

        def fn(prompts: Sequence[Any], completions: Sequence[Any], **kw: Any) -> list[float | None]:
            items = form.items(prompts, completions, kw)
            sent = [item for item in items if item is not None]
            return form.scores(items, self.score(reward, sent, timeout_s=timeout_s) if sent else None)

        return form.named(fn)

    def close(self) -> None:
        self._t.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncRewardClient(_ClientBase[AsyncRewardTransport]):
    """The asyncio twin of `RewardClient`: the same methods, awaited."""

    _http_transport, _grpc_transport, _replicated = AsyncHttp, AsyncGrpc, AsyncReplicated

    async def _call(self, attempt: Attempt[Awaitable[T]], timeout_s: float | None) -> T:
        return await self.retry.acall(attempt, timeout_s or self.timeout_s)

    async def _checked(
        self, req: Request, send: Callable[[Request, float], Awaitable[R]], timeout_s: float | None
    ) -> R:
        """`RewardClient._checked`, awaited: the shards are sent concurrently on this loop."""
        parts = self._shards(req)
        if len(parts) == 1:
            return checked_reply(req, await self._call(self._attempt(req, send), timeout_s))
        end = time.monotonic() + (timeout_s or self.timeout_s)

        async def one(part: Request) -> R:
            reply = await self._call(self._attempt(part, send), max(1e-3, end - time.monotonic()))
            return checked_reply(part, reply)

        tasks = [asyncio.ensure_future(one(part)) for part in parts]
        try:
            return checked_reply(req, merged(req, list(await asyncio.gather(*tasks))))
        finally:
            for task in tasks:  # one shard failed: the call has failed, the others' work is not wanted
                task.cancel()

    async def score(
        self,
        reward: str,
        items: Iterable[ScoreItem | Mapping[str, Any]],
        *,
        granularity: str = "outcome",
        timeout_s: float | None = None,
    ) -> ScoreResponse:
        return await self._checked(score_request(reward, items, granularity), self._t.score, timeout_s)

    async def compare(
        self, reward: str, items: Iterable[CompareItem | Mapping[str, Any]], *, timeout_s: float | None = None
    ) -> CompareResponse:
        return await self._checked(compare_request(reward, items), self._t.compare, timeout_s)

    async def rewards(self, *, timeout_s: float | None = None) -> RewardsResponse:
        return await self._call(self._t.rewards, timeout_s)

    async def reward_id(self, name: str, *, timeout_s: float | None = None) -> str:
        return _find(await self.rewards(timeout_s=timeout_s), name)

    async def health(self, *, timeout_s: float | None = None) -> bool:
        return await self._t.probe("health", timeout_s or self.timeout_s)

    async def ready(self, *, timeout_s: float | None = None) -> bool:
        return await self._t.probe("ready", timeout_s or self.timeout_s)

    async def as_reward_fn(
        self, reward: str, *, reference_key: str | None = None, timeout_s: float | None = None
    ) -> Callable[..., Awaitable[list[float | None]]]:
        """`RewardClient.as_reward_fn`, returning an async function (awaited to fetch `.reward_id`).

        The function may be awaited on any event loop, such as the one TRL's GRPOTrainer runs async
        reward functions on, on a thread of its own (`PerLoop` in `clients/reward_transport.py`).
        """
        form = _form(await self.rewards(timeout_s=timeout_s), reward, reference_key)

        async def fn(prompts: Sequence[Any], completions: Sequence[Any], **kw: Any) -> list[float | None]:
            items = form.items(prompts, completions, kw)
            sent = [item for item in items if item is not None]
            return form.scores(items, await self.score(reward, sent, timeout_s=timeout_s) if sent else None)

        return form.named(fn)

    async def close(self) -> None:
        await self._t.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _info(rewards: RewardsResponse, name: str) -> RewardInfo:
    for info in rewards.rewards:
        if info.name == name:
            return info
    known = ", ".join(r.name for r in rewards.rewards)
    raise UnknownReward(f"unknown reward {name!r}; this server has {known}", type=ErrorType.unknown_reward)


def _find(rewards: RewardsResponse, name: str) -> str:
    return _info(rewards, name).reward_id


def _form(rewards: RewardsResponse, name: str, reference_key: str | None) -> RewardFnForm:
    info = _info(rewards, name)
    return RewardFnForm(name, info.reward_id, info.needs_reference, reference_key)
