"""Transports of the reward clients: one round trip over HTTP or gRPC, sync or async, failures raised typed.

Each transport has `score(req, timeout)`, `compare(req, timeout)`, `rewards(timeout)` (protocol
models in and out), `probe("health" | "ready", timeout) -> bool` and `close()`; the async ones
are the same, awaited. They do no retries and no id checks: `clients/reward.py` does, once for all four.
Every failure is mapped here to a `clients.errors` exception, by pure functions shared by all.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar
from urllib.parse import urlsplit

import grpc
import httpx
from pydantic import BaseModel, ValidationError

from assay.clients.errors import (
    BY_ERROR_TYPE,
    DeadlineExceeded,
    InvalidRequest,
    Overloaded,
    PermissionDenied,
    RewardServiceError,
    ServerError,
    Unauthenticated,
    Unavailable,
    UnknownReward,
)
from assay.rm_server.protocol import (
    CompareRequest,
    CompareResponse,
    ErrorResponse,
    ErrorType,
    RewardsResponse,
    ScoreRequest,
    ScoreResponse,
)

MAX_GRPC_MESSAGE = 64 * 1024 * 1024  # per-token replies of big batches outgrow gRPC's 4 MiB default
# A channel whose server went away reconnects with its own backoff, up to 120 s by default; until
# then every call fails at once with UNAVAILABLE. Capped at 1 s, a restarted server is found again
# within a second or so of coming back, and the retries (clients/reward.py) do the rest.
RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]

M = TypeVar("M", bound=BaseModel)


def problems(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'item'}: {e['msg']}" for e in exc.errors(include_url=False))


# --- error mapping (pure) --------------------------------------------------------------------

_BY_HTTP: dict[int, type[RewardServiceError]] = {
    400: InvalidRequest, 413: InvalidRequest, 401: Unauthenticated, 403: PermissionDenied, 404: UnknownReward,
    429: Overloaded, 502: Unavailable, 503: Unavailable, 504: Unavailable,
}  # fmt: skip
_BY_GRPC: dict[str, type[RewardServiceError]] = {
    "INVALID_ARGUMENT": InvalidRequest, "OUT_OF_RANGE": InvalidRequest, "NOT_FOUND": UnknownReward,
    "UNAUTHENTICATED": Unauthenticated, "PERMISSION_DENIED": PermissionDenied, "RESOURCE_EXHAUSTED": Overloaded,
    "UNAVAILABLE": Unavailable, "DEADLINE_EXCEEDED": DeadlineExceeded,
}  # fmt: skip


def retry_after_s(value: str | None) -> float | None:
    """Retry-After as seconds: delta-seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def http_error(r: httpx.Response) -> RewardServiceError:
    """The typed error for a non-200 answer; the body's ErrorType decides when it has one."""
    try:
        info = ErrorResponse.model_validate_json(r.content).error
        type_, message = info.type, info.message
    except ValidationError:
        type_, message = None, r.text[:300] or r.reason_phrase
    cls = BY_ERROR_TYPE.get(type_) or _BY_HTTP.get(r.status_code, ServerError)
    where = f"{r.request.method} {r.request.url}"
    return cls(
        f"{where}: {message}",
        status=r.status_code,
        type=type_,
        retry_after_s=retry_after_s(r.headers.get("retry-after")),
    )


def http_reply(r: httpx.Response, model: type[M]) -> M:
    if r.status_code != 200:
        raise http_error(r)
    try:
        return model.model_validate_json(r.content)
    except ValidationError as exc:
        raise ServerError(
            f"{r.request.url}: the reply is not a {model.__name__}: {problems(exc)}", status=200
        ) from None


def http_failure(exc: httpx.HTTPError, where: str) -> RewardServiceError:
    """The typed error for a request that got no answer; `unanswered` unless nothing was sent."""
    if isinstance(exc, httpx.TimeoutException):
        err: RewardServiceError = DeadlineExceeded(f"{where}: no answer before the deadline ({type(exc).__name__})")
    elif isinstance(exc, (httpx.NetworkError, httpx.RemoteProtocolError)):  # refused, reset, dropped
        err = Unavailable(f"{where}: {exc!r}")
    else:
        err = ServerError(f"{where}: {exc!r}")
    err.unanswered = not isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout))  # those never connected
    return err


def grpc_error(exc: grpc.RpcError, where: str) -> RewardServiceError:
    """The typed error for a failed RPC (sync `grpc.RpcError` and `grpc.aio.AioRpcError` alike)."""
    code: grpc.StatusCode = exc.code()  # type: ignore[attr-defined]
    metadata = dict(exc.trailing_metadata() or ())  # type: ignore[attr-defined]
    details = exc.details() or code.name  # type: ignore[attr-defined]
    try:
        type_ = ErrorType(metadata.get("error-type"))
    except ValueError:
        type_ = None
    cls = BY_ERROR_TYPE.get(type_) or _BY_GRPC.get(code.name, ServerError)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details:
        # gRPC's own message-size limit (either side) says RESOURCE_EXHAUSTED too, but no wait
        # makes that message fit: it is a request to split, not an overload to retry.
        cls = InvalidRequest
    return cls(
        f"{where}: {details}", status=code.name, type=type_, retry_after_s=retry_after_s(metadata.get("retry-after"))
    )


# --- transports: one round trip each, failures raised typed ----------------------------------


def _http_base(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"the reward service's HTTP address is a base URL like http://127.0.0.1:8000, got {url!r}")
    return url.rstrip("/")


def _auth(api_key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {api_key}"} if api_key else {}


class _HttpRoutes:
    """Which route answers what; `_send` does the I/O (sync or async)."""

    def score(self, req: ScoreRequest, timeout: float):
        return self._send("POST", "/v1/score", req, ScoreResponse, timeout)

    def compare(self, req: CompareRequest, timeout: float):
        return self._send("POST", "/v1/compare", req, CompareResponse, timeout)

    def rewards(self, timeout: float):
        return self._send("GET", "/v1/rewards", None, RewardsResponse, timeout)

    def _send(self, method: str, path: str, req: BaseModel | None, model: type[M], timeout: float) -> Any:
        raise NotImplementedError


class Http(_HttpRoutes):
    def __init__(self, url: str, api_key: str | None) -> None:
        self.url = _http_base(url)
        self._client = httpx.Client(base_url=self.url, headers=_auth(api_key))

    def _send(self, method, path, req, model, timeout):
        body = req.model_dump(mode="json", exclude_none=True) if req is not None else None
        try:
            r = self._client.request(method, path, json=body, timeout=timeout)
        except httpx.HTTPError as exc:
            raise http_failure(exc, f"{method} {self.url}{path}") from None
        return http_reply(r, model)

    def probe(self, path: str, timeout: float) -> bool:
        try:
            return self._client.get(path, timeout=timeout).status_code == 200
        except httpx.HTTPError:
            return False

    def close(self) -> None:
        self._client.close()


class AsyncHttp(_HttpRoutes):
    def __init__(self, url: str, api_key: str | None) -> None:
        self.url = _http_base(url)
        self._client = httpx.AsyncClient(base_url=self.url, headers=_auth(api_key))

    async def _send(self, method, path, req, model, timeout):
        body = req.model_dump(mode="json", exclude_none=True) if req is not None else None
        try:
            r = await self._client.request(method, path, json=body, timeout=timeout)
        except httpx.HTTPError as exc:
            raise http_failure(exc, f"{method} {self.url}{path}") from None
        return http_reply(r, model)

    async def probe(self, path: str, timeout: float) -> bool:
        try:
            return (await self._client.get(path, timeout=timeout)).status_code == 200
        except httpx.HTTPError:
            return False

    async def close(self) -> None:
        await self._client.aclose()


class _GrpcRoutes:
    """Which RPC answers what, and the conversions (grpc_convert's, used as they are)."""

    def __init__(self, target: str, api_key: str | None) -> None:
        # Imported here so that HTTP-only users never load the generated protobuf code.
        from assay.proto.reward.v1 import reward_pb2
        from assay.rm_server import grpc_convert

        if not target or "://" in target:
            raise ValueError(
                f"the reward service's gRPC address is a host:port target like 127.0.0.1:50051, got {target!r}"
            )
        self.target = target
        self._pb, self._convert = reward_pb2, grpc_convert
        self._metadata = tuple(_auth(api_key).items())
        self._options = [("grpc.max_receive_message_length", MAX_GRPC_MESSAGE), *RECONNECT_OPTIONS]

    def _stubs(self, channel: Any) -> None:
        from grpc_health.v1 import health_pb2_grpc

        from assay.proto.reward.v1 import reward_pb2_grpc

        stub = reward_pb2_grpc.RewardServiceStub(channel)
        self._rpcs = {"Score": stub.Score, "Compare": stub.Compare, "ListRewards": stub.ListRewards}
        self._health = health_pb2_grpc.HealthStub(channel).Check

    def score(self, req: ScoreRequest, timeout: float):
        c = self._convert
        return self._send("Score", c.score_request_to_proto(req), c.score_response_from_proto, timeout)

    def compare(self, req: CompareRequest, timeout: float):
        c = self._convert
        return self._send("Compare", c.compare_request_to_proto(req), c.compare_response_from_proto, timeout)

    def rewards(self, timeout: float):
        c = self._convert
        return self._send("ListRewards", self._pb.ListRewardsRequest(), c.rewards_response_from_proto, timeout)

    def _reply(self, reply: Any, convert: Callable[[Any], M], method: str) -> M:
        try:
            return convert(reply)
        except (ValidationError, ValueError) as exc:
            raise ServerError(f"{self.target} {method}: the reply breaks the protocol: {exc}", status="OK") from None

    def _send(self, method: str, msg: Any, convert: Callable[[Any], M], timeout: float) -> Any:
        raise NotImplementedError


def _probe_answer(what: str, reply: Any) -> bool:
    """health: the server answers at all; ready: it says SERVING (its rewards are loaded)."""
    from grpc_health.v1 import health_pb2

    return what == "health" or reply.status == health_pb2.HealthCheckResponse.SERVING


def _health_request() -> Any:
    from grpc_health.v1 import health_pb2

    return health_pb2.HealthCheckRequest()


class Grpc(_GrpcRoutes):
    def __init__(self, target: str, api_key: str | None) -> None:
        super().__init__(target, api_key)
        self._channel = grpc.insecure_channel(target, options=self._options)
        self._stubs(self._channel)

    def _send(self, method, msg, convert, timeout):
        try:
            reply = self._rpcs[method](msg, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise grpc_error(exc, f"{self.target} {method}") from None
        return self._reply(reply, convert, method)

    def probe(self, what: str, timeout: float) -> bool:
        try:
            return _probe_answer(what, self._health(_health_request(), timeout=timeout))
        except grpc.RpcError:
            return False

    def close(self) -> None:
        self._channel.close()


class AsyncGrpc(_GrpcRoutes):
    def __init__(self, target: str, api_key: str | None) -> None:
        super().__init__(target, api_key)
        self._channel = grpc.aio.insecure_channel(target, options=self._options)
        self._stubs(self._channel)

    async def _send(self, method, msg, convert, timeout):
        try:
            reply = await self._rpcs[method](msg, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise grpc_error(exc, f"{self.target} {method}") from None
        return self._reply(reply, convert, method)

    async def probe(self, what: str, timeout: float) -> bool:
        try:
            return _probe_answer(what, await self._health(_health_request(), timeout=timeout))
        except grpc.RpcError:
            return False

    async def close(self) -> None:
        await self._channel.close()
