"""Request-level failures of the reward service, mapped to HTTP and gRPC status in one place each.

Per-item failures are not exceptions that reach the client: they become `ItemResult.error`
(see `rewards.base.ItemFailure`). These are the failures of a whole request.
"""

from __future__ import annotations

import grpc

from assay.rm_server.protocol import ErrorType


class ServiceError(Exception):
    """A request the service refuses or cannot serve; `message` says what to change."""

    type: ErrorType = ErrorType.invalid_request
    http_status: int = 400
    grpc_code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class InvalidRequest(ServiceError):
    pass


class UnknownReward(ServiceError):
    type, http_status, grpc_code = ErrorType.unknown_reward, 404, grpc.StatusCode.NOT_FOUND


class PayloadTooLarge(ServiceError):
    type, http_status, grpc_code = ErrorType.payload_too_large, 413, grpc.StatusCode.INVALID_ARGUMENT


class Overloaded(ServiceError):
    """The bounded queue is full; the client should retry after `retry_after_s`."""

    type, http_status, grpc_code = ErrorType.overloaded, 429, grpc.StatusCode.RESOURCE_EXHAUSTED


class Unauthenticated(ServiceError):
    type, http_status, grpc_code = ErrorType.unauthenticated, 401, grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ServiceError):
    type, http_status, grpc_code = ErrorType.permission_denied, 403, grpc.StatusCode.PERMISSION_DENIED


class NotReady(ServiceError):
    """Still loading; with Retry-After (HTTP) / `retry-after` (gRPC) so clients poll, not give up."""

    type, http_status, grpc_code = ErrorType.not_ready, 503, grpc.StatusCode.UNAVAILABLE


LOADING_RETRY_AFTER_S = 1.0  # models load in seconds; a client asks again about this often
