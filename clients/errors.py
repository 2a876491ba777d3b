"""Typed failures of the Assay services, as a client sees them, and the one place answers become them.

One exception per kind of failure, the same for HTTP and gRPC, and for the reward and policy
services (`UnknownReward` is the reward service's 404, `UnknownModel` the policy service's;
`Conflict` is the policy service's refusal of a weight update made against a stale version):

    exception          HTTP              gRPC                 retryable
    InvalidRequest     400, 413          INVALID_ARGUMENT     no
    Unauthenticated    401               UNAUTHENTICATED      no
    PermissionDenied   403               PERMISSION_DENIED    no
    UnknownReward      404               NOT_FOUND            no
    Overloaded         429               RESOURCE_EXHAUSTED   yes, after `retry_after_s`
    Unavailable        502, 503, 504,    UNAVAILABLE,         yes
                       refused / reset;  CANCELLED
                       the reward service:
                       a 500 without its
                       error body (a proxy's,
                       e.g. Ray Serve's when
                       a replica dies)
    UnknownModel       404               NOT_FOUND            no
    Conflict           409                                    no
    DeadlineExceeded   client timeout    DEADLINE_EXCEEDED    no (the call's deadline is spent)
    CertificateRefused the server's TLS  UNAVAILABLE saying   no (trust its CA: `ca_cert=`)
                       certificate did   CERTIFICATE_VERIFY_
                       not verify        FAILED
    ServerError        500, anything     INTERNAL, anything   no
                       else; a reply     else
                       that breaks the
                       protocol

The tables below are that table in code; `http_error`, `http_failure` and `grpc_error` apply
them, for every client and transport. The reward service also names its error in the body
(`ErrorType`, or the `error-type` gRPC trailer), which decides before the status does.

These are failures of a whole call. A failed *item* is not an exception: it comes back as
`ItemResult.error` (and as None from a reward function, see `RewardClient.as_reward_fn`).
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Protocol, cast

import grpc
import httpx
from pydantic import ValidationError

from assay.policy_server.protocol import ErrorResponse as PolicyErrorResponse
from assay.rm_server.protocol import ErrorResponse as RewardErrorResponse
from assay.rm_server.protocol import ErrorType


class ServiceError(Exception):
    """A call to an Assay service (reward or policy) failed as a whole.

    `status` is the HTTP status (int) or the gRPC code name (str, e.g. "UNAVAILABLE"), None when
    the failure happened before an answer (connection refused, client-side checks). `type` is the
    server's `ErrorType` when it said one. `attempts` is how many times the call was sent.
    `unanswered` is True when the request went out (whole or in part) and no answer came back
    (connection reset or dropped): the server may have acted on it. `failover` is True when the
    call has several replicas and another one can take the next attempt at once
    (`clients/replicas.py`).
    """

    retryable: bool = False
    unanswered: bool = False
    failover: bool = False

    def __init__(
        self,
        message: str,
        *,
        status: int | str | None = None,
        type: ErrorType | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.retry_after_s = retry_after_s
        self.attempts = 1

    def __str__(self) -> str:
        where = f" [{self.status}]" if self.status is not None else ""
        tries = f" (after {self.attempts} attempts)" if self.attempts > 1 else ""
        return f"{self.message}{where}{tries}"


# Its name from when only the reward client raised it; `assay.clients` exports both names.
RewardServiceError = ServiceError


class InvalidRequest(ServiceError):
    """The request is malformed or over a limit; change it before sending again."""


class Unauthenticated(ServiceError):
    """No API key, or one the server does not know."""


class PermissionDenied(ServiceError):
    """The API key lacks the scope this call needs."""


class UnknownReward(ServiceError):
    """The server has no reward of that name (see `rewards()`)."""


class Overloaded(ServiceError):
    """The server's queue is full; retry after `retry_after_s` seconds (when it said)."""

    retryable = True


class Unavailable(ServiceError):
    """The server could not be reached, dropped the connection, or is not ready yet."""

    retryable = True


class UnknownModel(ServiceError):
    """The policy server serves no model of that name (see `PolicyClient.models()`)."""


class Conflict(ServiceError):
    """The policy server's weights are not at the version the update expected: another update landed."""


class DeadlineExceeded(ServiceError):
    """The call's deadline passed before an answer came."""


class CertificateRefused(ServiceError):
    """The server's TLS certificate did not verify (signed by a CA not trusted here, for another name,
    expired): a retry cannot help; trust its CA (`ca_cert=`, or SSL_CERT_FILE)."""


class ServerError(ServiceError):
    """The server failed, or answered something that breaks the protocol (e.g. ids that do not match)."""


# --- the tables ------------------------------------------------------------------------------

BY_ERROR_TYPE: Mapping[ErrorType, type[ServiceError]] = {
    ErrorType.invalid_request: InvalidRequest,
    ErrorType.payload_too_large: InvalidRequest,
    ErrorType.unknown_reward: UnknownReward,
    ErrorType.overloaded: Overloaded,
    ErrorType.unauthenticated: Unauthenticated,
    ErrorType.permission_denied: PermissionDenied,
    ErrorType.not_ready: Unavailable,
}
# 404 is missing here: what is not found is the service's own (see `HttpDialect.not_found`).
BY_HTTP_STATUS: Mapping[int, type[ServiceError]] = {
    400: InvalidRequest,
    413: InvalidRequest,
    401: Unauthenticated,
    403: PermissionDenied,
    409: Conflict,
    429: Overloaded,
    502: Unavailable,
    503: Unavailable,
    504: Unavailable,
}
BY_GRPC_CODE: Mapping[str, type[ServiceError]] = {
    "INVALID_ARGUMENT": InvalidRequest,
    "OUT_OF_RANGE": InvalidRequest,
    "NOT_FOUND": UnknownReward,
    "UNAUTHENTICATED": Unauthenticated,
    "PERMISSION_DENIED": PermissionDenied,
    "RESOURCE_EXHAUSTED": Overloaded,
    "UNAVAILABLE": Unavailable,
    # The clients never cancel an RPC they still wait on (a sync call ends at its deadline; an awaited
    # one cancelled by its caller raises CancelledError, not this): CANCELLED is the server's side giving
    # up on the call (a server going away, grpc.aio's end of grace), so another try may be answered.
    "CANCELLED": Unavailable,
    "DEADLINE_EXCEEDED": DeadlineExceeded,
}


@dataclass(frozen=True)
class HttpDialect:
    """What differs between the two services' HTTP failures: the shape of the error body, and the 404."""

    error_body: type[RewardErrorResponse] | type[PolicyErrorResponse]
    not_found: type[ServiceError]


# A 500 without the service's error body is a proxy's (Ray Serve's, for a replica that died mid-request; the
# services' own 500s always carry their body): the replica's answer was lost, as with a reset connection, so it is
# Unavailable and `unanswered`: retried where resending is safe (scoring, generation), looked into where it is not
# (a weight push: the caller reads the version, `PolicyClient._request`).
REWARD_HTTP = HttpDialect(RewardErrorResponse, UnknownReward)
POLICY_HTTP = HttpDialect(PolicyErrorResponse, UnknownModel)  # OpenAI's error shape; its `type` is not ours


class FailedRpc(Protocol):
    """What a failed RPC tells: a sync `grpc.RpcError` is also a `grpc.Call`; aio's `AioRpcError` has the same three."""

    def code(self) -> grpc.StatusCode: ...
    def details(self) -> str | None: ...
    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...] | None: ...


# --- answers and failures -> exceptions (pure) -----------------------------------------------


def problems(exc: ValidationError) -> str:
    """A pydantic validation error as one line: `field.path: what is wrong; ...`."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'item'}: {e['msg']}" for e in exc.errors(include_url=False))


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


def http_error(r: httpx.Response, dialect: HttpDialect) -> ServiceError:
    """The typed error for a non-200 answer; the reward service's ErrorType decides when it said one."""
    type_: ErrorType | None = None
    try:
        info = dialect.error_body.model_validate_json(r.content).error
        message = info.message
        if isinstance(info.type, ErrorType):
            type_ = info.type
    except ValidationError:
        message = r.text[:300] or r.reason_phrase
        if r.status_code == 500:
            lost = Unavailable(
                f"{r.request.method} {r.request.url}: {message} (a proxy's, not the service's own)", status=500
            )
            lost.unanswered = True
            return lost
    by_status = {**BY_HTTP_STATUS, 404: dialect.not_found}
    cls = (BY_ERROR_TYPE.get(type_) if type_ is not None else None) or by_status.get(r.status_code, ServerError)
    return cls(
        f"{r.request.method} {r.request.url}: {message}",
        status=r.status_code,
        type=type_,
        retry_after_s=retry_after_s(r.headers.get("retry-after")),
    )


def http_failure(exc: httpx.HTTPError, where: str) -> ServiceError:
    """The typed error for a request that got no answer; `unanswered` unless nothing was sent."""
    err: ServiceError
    if isinstance(exc, httpx.TimeoutException):
        err = DeadlineExceeded(f"{where}: no answer before the deadline ({type(exc).__name__})")
    elif (refusal := _certificate_refusal(exc)) is not None:
        err = CertificateRefused(f"{where}: the server's TLS certificate did not verify ({refusal.verify_message})")
    elif isinstance(exc, (httpx.NetworkError, httpx.RemoteProtocolError)):  # refused, reset, dropped
        err = Unavailable(f"{where}: {exc!r}")
    else:
        err = ServerError(f"{where}: {exc!r}")
    err.unanswered = not isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout))  # those never connected
    return err


def _certificate_refusal(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate check that failed under an httpx error (httpx and httpcore chain their causes)."""
    seen: BaseException | None = exc
    while seen is not None and not isinstance(seen, ssl.SSLCertVerificationError):
        seen = seen.__cause__ or seen.__context__
    return seen


def grpc_error(exc: grpc.RpcError, where: str) -> ServiceError:
    """The typed error for a failed RPC (sync `grpc.RpcError` and `grpc.aio.AioRpcError` alike)."""
    call = cast(FailedRpc, exc)
    code = call.code()
    metadata = {k: v for k, v in call.trailing_metadata() or () if isinstance(v, str)}  # "-bin" keys are bytes
    details = call.details() or code.name
    try:
        type_: ErrorType | None = ErrorType(metadata.get("error-type"))
    except ValueError:
        type_ = None
    cls = (BY_ERROR_TYPE.get(type_) if type_ is not None else None) or BY_GRPC_CODE.get(code.name, ServerError)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details:
        # gRPC's own message-size limit (either side) says RESOURCE_EXHAUSTED too, but no wait
        # makes that message fit: it is a request to split, not an overload to retry.
        cls = InvalidRequest
    if code == grpc.StatusCode.UNAVAILABLE and "CERTIFICATE_VERIFY_FAILED" in details:
        # grpc says a failed certificate check only in its text (the TLS library's reason code):
        # UNAVAILABLE, as for a server that is down, but no retry makes the certificate verify
        cls = CertificateRefused
    return cls(
        f"{where}: {details}", status=code.name, type=type_, retry_after_s=retry_after_s(metadata.get("retry-after"))
    )
