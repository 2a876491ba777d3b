"""The error base: a whole request refused or failed, as both services raise it.

A `ServiceError` carries what every edge needs, whatever the service: the HTTP `status`, the
message saying what to change, and, when a retry can work, `retry_after_s`. The gRPC code follows
from the HTTP status (`grpc_status`), so the two edges of a service agree. Each service gives
these their wire shape in one place (its HTTP exception handler and its gRPC `describe`): the
reward service derives its `ErrorType` from the status, the policy service its OpenAI error type
and code. The base raises only what its own parts refuse: a key (`auth`) and a full queue
(`batcher`).

Per-item failures are not exceptions that reach the client (see `rm_server.rewards.base.ItemFailure`).
"""

from __future__ import annotations

import grpc

LOADING_RETRY_AFTER_S = 1.0  # models load in seconds; a client asks again about this often


class ServiceError(Exception):
    """A request the service refuses or cannot serve; `message` says what to change."""

    status: int = 400  # the HTTP status; the gRPC code is `grpc_status(status)`

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class InvalidRequest(ServiceError):
    pass


class Unauthenticated(ServiceError):
    status = 401


class PermissionDenied(ServiceError):
    status = 403


class Overloaded(ServiceError):
    """The bounded queue is full; the client should retry after `retry_after_s`."""

    status = 429
    retry_after_s: float  # always known: the queue predicts when it has room

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message, retry_after_s=retry_after_s)


class NotReady(ServiceError):
    """Still loading; with Retry-After (HTTP) / `retry-after` (gRPC) so clients poll, not give up."""

    status = 503


_GRPC_STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    500: grpc.StatusCode.INTERNAL,
    502: grpc.StatusCode.UNAVAILABLE,  # a service this one calls failed: another try may reach a good one
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def grpc_status(status: int) -> grpc.StatusCode:
    """The gRPC code that means what HTTP `status` means (INTERNAL for one no service raises)."""
    return _GRPC_STATUS.get(status, grpc.StatusCode.INTERNAL)
