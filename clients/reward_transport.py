"""Transports of the reward clients: one round trip over HTTP or gRPC, sync or async, failures raised typed.

A transport is what `RewardTransport` (or `AsyncRewardTransport`) says: `score(req, timeout)`,
`compare(req, timeout)`, `rewards(timeout)` (protocol models in and out), `probe("health" |
"ready", timeout) -> bool` and `close()`. Transports do no retries and no id checks:
`clients/reward.py` does, once for all of them, so another transport (an in-process one, say)
gets both by implementing these five methods. Every failure is mapped to a `clients.errors`
exception by the functions there, shared with the policy client.

Event loops. An httpx.AsyncClient's pooled connections and a grpc.aio channel belong to the event
loop they were made on; used from another loop they fail (`Event loop is closed`, or a future
attached to a different loop). An async client is made on one loop and used on another as a
matter of course: `asyncio.run(client.as_reward_fn(...))` at set-up, then TRL's GRPOTrainer awaits
the function on an event loop of its own, on a thread of its own. So the async transports make
their httpx client or channel lazily, one per running loop (`PerLoop`), and forget those of loops
that have closed.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, Literal, Protocol, TypeVar

import grpc
import httpx
from pydantic import BaseModel, ValidationError

from assay.clients.errors import REWARD_HTTP, ServerError, grpc_error, http_failure
from assay.clients.http import (
    CaCert,
    auth_headers,
    base_url,
    client_headers,
    extensions,
    json_body,
    read_ca,
    reply,
    verify,
)
from assay.clients.replicas import Address
from assay.rm_server.protocol import (
    CompareRequest,
    CompareResponse,
    RewardsResponse,
    ScoreRequest,
    ScoreResponse,
)

MAX_GRPC_MESSAGE = 64 * 1024 * 1024  # per-token replies of big batches outgrow gRPC's 4 MiB default
# A channel whose server went away reconnects with its own backoff, up to 120 s by default; until
# then every call fails at once with UNAVAILABLE. Capped at 1 s, a restarted server is found again
# within a second or so of coming back, and the retries (clients/retry.py) do the rest.
RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]

M = TypeVar("M", bound=BaseModel)
C = TypeVar("C")
Probe = Literal["health", "ready"]  # health: the server answers at all; ready: its rewards are loaded


class RewardTransport(Protocol):
    """One round trip to a reward service, blocking; failures raised as `clients.errors` exceptions."""

    def score(self, req: ScoreRequest, timeout: float) -> ScoreResponse: ...
    def compare(self, req: CompareRequest, timeout: float) -> CompareResponse: ...
    def rewards(self, timeout: float) -> RewardsResponse: ...
    def probe(self, what: Probe, timeout: float) -> bool: ...
    def close(self) -> None: ...


class AsyncRewardTransport(Protocol):
    """`RewardTransport`, awaited."""

    async def score(self, req: ScoreRequest, timeout: float) -> ScoreResponse: ...
    async def compare(self, req: CompareRequest, timeout: float) -> CompareResponse: ...
    async def rewards(self, timeout: float) -> RewardsResponse: ...
    async def probe(self, what: Probe, timeout: float) -> bool: ...
    async def close(self) -> None: ...


class PerLoop(Generic[C]):
    """One `C` (an httpx.AsyncClient, a grpc.aio channel) per event loop, made on first use there."""

    def __init__(self, make: Callable[[], C], close: Callable[[C], Awaitable[None]]) -> None:
        self._make, self._close = make, close
        self._by_loop: dict[asyncio.AbstractEventLoop, C] = {}
        self._lock = threading.Lock()  # loops on several threads may share one client

    def get(self) -> C:
        """The running loop's `C`. Those of closed loops are dropped: their connections went with the loop."""
        loop = asyncio.get_running_loop()
        with self._lock:
            for gone in [other for other in self._by_loop if other.is_closed()]:
                del self._by_loop[gone]
            if loop not in self._by_loop:
                self._by_loop[loop] = self._make()
            return self._by_loop[loop]

    async def close(self) -> None:
        """Close every `C` whose loop still runs: this one's here, another thread's on its own loop.
        One of a loop that is stopped or closed cannot be closed from here, and is dropped."""
        here = asyncio.get_running_loop()
        with self._lock:
            owned, self._by_loop = self._by_loop, {}
        for loop, c in owned.items():
            if loop is here:
                await self._close(c)
            elif loop.is_running():
                await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(_closing(self._close, c), loop))


async def _closing(close: Callable[[C], Awaitable[None]], c: C) -> None:
    await close(c)  # a coroutine for run_coroutine_threadsafe, which takes no other awaitable


# --- HTTP ------------------------------------------------------------------------------------


class _HttpRoutes:
    """Which route answers what; `_send` does the I/O, blocking or awaited (so these return either)."""

    def score(self, req: ScoreRequest, timeout: float) -> Any:
        return self._send("POST", "/v1/score", req, ScoreResponse, timeout)

    def compare(self, req: CompareRequest, timeout: float) -> Any:
        return self._send("POST", "/v1/compare", req, CompareResponse, timeout)

    def rewards(self, timeout: float) -> Any:
        return self._send("GET", "/v1/rewards", None, RewardsResponse, timeout)

    def _send(self, method: str, path: str, req: BaseModel | None, model: type[M], timeout: float) -> Any:
        raise NotImplementedError


class Http(_HttpRoutes):
    def __init__(self, address: Address, api_key: str | None, ca_cert: CaCert = None) -> None:
        self.url = base_url(address.url, "the reward service")
        headers, self._ext = client_headers(address, api_key), extensions(address)
        self._client = httpx.Client(base_url=self.url, headers=headers, verify=verify(ca_cert))

    def _send(self, method: str, path: str, req: BaseModel | None, model: type[M], timeout: float) -> M:
        try:
            r = self._client.request(method, path, json=json_body(req), timeout=timeout, extensions=self._ext)
        except httpx.HTTPError as exc:
            raise http_failure(exc, f"{method} {self.url}{path}") from None
        return reply(r, model, REWARD_HTTP)

    def probe(self, what: Probe, timeout: float) -> bool:
        try:
            return self._client.get(f"/{what}", timeout=timeout, extensions=self._ext).status_code == 200
        except httpx.HTTPError:
            return False

    def close(self) -> None:
        self._client.close()


class AsyncHttp(_HttpRoutes):
    def __init__(self, address: Address, api_key: str | None, ca_cert: CaCert = None) -> None:
        self.url = base_url(address.url, "the reward service")
        headers, checked, self._ext = client_headers(address, api_key), verify(ca_cert), extensions(address)
        self._clients = PerLoop(
            lambda: httpx.AsyncClient(base_url=self.url, headers=headers, verify=checked), lambda c: c.aclose()
        )

    async def _send(self, method: str, path: str, req: BaseModel | None, model: type[M], timeout: float) -> M:
        try:
            r = await self._clients.get().request(
                method, path, json=json_body(req), timeout=timeout, extensions=self._ext
            )
        except httpx.HTTPError as exc:
            raise http_failure(exc, f"{method} {self.url}{path}") from None
        return reply(r, model, REWARD_HTTP)

    async def probe(self, what: Probe, timeout: float) -> bool:
        try:
            answer = await self._clients.get().get(f"/{what}", timeout=timeout, extensions=self._ext)
            return answer.status_code == 200
        except httpx.HTTPError:
            return False

    async def close(self) -> None:
        await self._clients.close()


# --- gRPC ------------------------------------------------------------------------------------


class _GrpcRoutes:
    """Which RPC answers what, and the conversions (grpc_convert's, used as they are).

    With `tls` (or a `ca_cert`, which implies it) the channel is a secure one, checking the server's
    certificate against `ca_cert`, or by default gRPC's roots (GRPC_DEFAULT_SSL_ROOTS_FILE_PATH).
    A replica of a service address is asked for the service's name (authority, certificate name)."""

    def __init__(self, address: Address, api_key: str | None, tls: bool = False, ca_cert: CaCert = None) -> None:
        # Imported here so that HTTP-only users never load the generated protobuf code.
        from assay.proto.reward.v1 import reward_pb2
        from assay.rm_server import grpc_convert

        target = address.url
        if not target or "://" in target:
            raise ValueError(
                f"the reward service's gRPC address is a host:port target like 127.0.0.1:50051, got {target!r}"
            )
        self.target = target
        self._pb, self._convert = reward_pb2, grpc_convert
        self._metadata = tuple(auth_headers(api_key).items())
        self._options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE),
            *RECONNECT_OPTIONS,
        ]
        if address.name:
            self._options.append(("grpc.default_authority", address.name))
        if address.server_name:
            self._options.append(("grpc.ssl_target_name_override", address.server_name))
        roots = read_ca(ca_cert)
        self._credentials = grpc.ssl_channel_credentials(roots) if tls or roots is not None else None

    def _stubs(self, channel: grpc.Channel | grpc.aio.Channel) -> Stubs:
        from grpc_health.v1 import health_pb2_grpc

        from assay.proto.reward.v1 import reward_pb2_grpc

        # Stubs get their methods at run time (the generated code and grpc's health stub declare none).
        stub: Any = reward_pb2_grpc.RewardServiceStub(channel)
        health: Any = health_pb2_grpc.HealthStub(channel)
        rpcs = {"Score": stub.Score, "Compare": stub.Compare, "ListRewards": stub.ListRewards}
        return Stubs(channel, rpcs, health.Check)

    def score(self, req: ScoreRequest, timeout: float) -> Any:
        c = self._convert
        return self._send("Score", c.score_request_to_proto(req), c.score_response_from_proto, timeout)

    def compare(self, req: CompareRequest, timeout: float) -> Any:
        c = self._convert
        return self._send("Compare", c.compare_request_to_proto(req), c.compare_response_from_proto, timeout)

    def rewards(self, timeout: float) -> Any:
        c = self._convert
        return self._send("ListRewards", self._pb.ListRewardsRequest(), c.rewards_response_from_proto, timeout)

    def _reply(self, reply: Any, convert: Callable[[Any], M], method: str) -> M:
        try:
            return convert(reply)
        except (ValidationError, ValueError) as exc:
            raise ServerError(f"{self.target} {method}: the reply breaks the protocol: {exc}", status="OK") from None

    def _send(self, method: str, msg: Any, convert: Callable[[Any], M], timeout: float) -> Any:
        raise NotImplementedError


@dataclass(frozen=True)
class Stubs:
    """A channel and its callables: the service's RPCs by name, and the health check."""

    channel: Any  # grpc.Channel or grpc.aio.Channel
    rpcs: dict[str, Any]
    health: Any


def _probe_answer(what: Probe, reply: Any) -> bool:
    """health: the server answers at all; ready: it says SERVING (its rewards are loaded)."""
    from grpc_health.v1 import health_pb2

    return what == "health" or bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def _health_request() -> Any:
    from grpc_health.v1 import health_pb2

    return health_pb2.HealthCheckRequest()


class Grpc(_GrpcRoutes):
    def __init__(self, address: Address, api_key: str | None, tls: bool = False, ca_cert: CaCert = None) -> None:
        super().__init__(address, api_key, tls, ca_cert)
        if self._credentials is None:
            channel = grpc.insecure_channel(self.target, options=self._options)
        else:
            channel = grpc.secure_channel(self.target, self._credentials, options=self._options)
        self._s = self._stubs(channel)

    def _send(self, method: str, msg: Any, convert: Callable[[Any], M], timeout: float) -> M:
        try:
            reply = self._s.rpcs[method](msg, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise grpc_error(exc, f"{self.target} {method}") from None
        return self._reply(reply, convert, method)

    def probe(self, what: Probe, timeout: float) -> bool:
        try:
            return _probe_answer(what, self._s.health(_health_request(), timeout=timeout))
        except grpc.RpcError:
            return False

    def close(self) -> None:
        self._s.channel.close()


class AsyncGrpc(_GrpcRoutes):
    def __init__(self, address: Address, api_key: str | None, tls: bool = False, ca_cert: CaCert = None) -> None:
        super().__init__(address, api_key, tls, ca_cert)
        self._channels = PerLoop(lambda: self._stubs(self._channel()), lambda s: s.channel.close())

    def _channel(self) -> grpc.aio.Channel:
        if self._credentials is None:
            return grpc.aio.insecure_channel(self.target, options=self._options)
        return grpc.aio.secure_channel(self.target, self._credentials, options=self._options)

    async def _send(self, method: str, msg: Any, convert: Callable[[Any], M], timeout: float) -> M:
        try:
            reply = await self._channels.get().rpcs[method](msg, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise grpc_error(exc, f"{self.target} {method}") from None
        return self._reply(reply, convert, method)

    async def probe(self, what: Probe, timeout: float) -> bool:
        try:
            return _probe_answer(what, await self._channels.get().health(_health_request(), timeout=timeout))
        except grpc.RpcError:
            return False

    async def close(self) -> None:
        await self._channels.close()
