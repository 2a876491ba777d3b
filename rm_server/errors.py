"""The reward service's own request-level failures, and its one mapping of a failure to its `ErrorType`.

The failures both services share (invalid request, keys, a full queue, still loading) are the
base's (`assay.base.errors`); this module adds the one only this service raises. Every
`ServiceError` reaches the client as its HTTP status and `ErrorType` (`error_type`), mapped once
for HTTP (`http_api`'s exception handler) and once for gRPC (`grpc_api.describe`).

Per-item failures are not exceptions that reach the client: they become `ItemResult.error`
(see `rewards.base.ItemFailure`). These are the failures of a whole request.
"""

from __future__ import annotations

from assay.base.errors import ServiceError
from assay.rm_server.protocol import ErrorType


class UnknownReward(ServiceError):
    status = 404


# In this protocol each status has one error type.
_ERROR_TYPES = {
    400: ErrorType.invalid_request,
    401: ErrorType.unauthenticated,
    403: ErrorType.permission_denied,
    404: ErrorType.unknown_reward,
    429: ErrorType.overloaded,
    503: ErrorType.not_ready,
}


def error_type(exc: ServiceError) -> ErrorType:
    """The protocol's `ErrorType` of a refused request."""
    return _ERROR_TYPES.get(exc.status, ErrorType.internal)
