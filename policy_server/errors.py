"""The policy service's request-level failures, in OpenAI's error terms, and where others' become them.

An `ApiError` is the base's `ServiceError` (its HTTP `status`, message and `retry_after_s`, see
`assay.base.errors`) with OpenAI's error `type`, and the request field at fault (`param`) and a
stable `code` where there are such. The HTTP adapter answers it as `{"error": {"message", "type",
"param", "code"}}`, the gRPC adapter as the code of its status with `error-type`/`error-code`
trailers. What others raise becomes an `ApiError` in one place each: a backend's refusal or failure
in `backend_error`, a refused key in `check_key`; nothing a client sends produces a bare 500.
"""

from __future__ import annotations

from assay.base import errors as base
from assay.base.auth import ApiKeys
from assay.base.errors import ServiceError
from assay.policy_server.backends import GenerationFailed, InvalidParameters, Overloaded


class ApiError(ServiceError):
    """A request the service refuses or cannot serve, in OpenAI's terms: its `type`, and the
    request field at fault (`param`) and a stable `code` where there are such."""

    status, type = 400, "invalid_request_error"

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message, retry_after_s=retry_after_s)
        self.param, self.code = param, code


class InvalidRequest(ApiError):
    pass


class ModelNotFound(ApiError):
    status, type = 404, "not_found_error"


class Unauthenticated(ApiError):
    status, type = 401, "authentication_error"


class PermissionDenied(ApiError):
    status, type = 403, "permission_error"


class QueueFull(ApiError):
    status, type = 429, "rate_limit_error"


class Conflict(ApiError):
    status, type = 409, "conflict_error"


class NotReady(ApiError):
    status, type = 503, "server_error"


class BadGateway(ApiError):
    """A service this one calls (rm_server) failed or refused this server's credentials."""

    status, type = 502, "server_error"


class Unavailable(ApiError):
    """A service this one calls could not be reached; a retry later may work."""

    status, type = 503, "server_error"


class DeadlineExceeded(ApiError):
    status, type = 504, "timeout_error"


class GenerationError(ApiError):
    """The backend failed to generate this request's sequences (`GenerationFailed`): a typed 500 for
    this request alone; the requests that shared its batch got their completions."""

    status, type = 500, "server_error"


def backend_error(exc: Overloaded | GenerationFailed | InvalidParameters) -> ApiError:
    """A backend's refusal or failure as the API error it is; the one place these are mapped,
    for completions, chat and /v1/search alike."""
    if isinstance(exc, Overloaded):
        return QueueFull(
            f"{exc}; retry after {exc.retry_after_s:.2f}s", code="queue_full", retry_after_s=exc.retry_after_s
        )
    if isinstance(exc, GenerationFailed):
        return GenerationError(f"{exc}; the server logged the cause", code="generation_failed")
    return InvalidRequest(str(exc), code="invalid_sampling_parameters")


def check_key(keys: ApiKeys, authorization: str | None, scope: str) -> None:
    """`keys.check` refusing with this service's errors (ApiKeys raises the base's, which have no
    OpenAI type or code), for the HTTP and gRPC adapters alike."""
    try:
        keys.check(authorization, scope)
    except base.PermissionDenied as exc:
        raise PermissionDenied(exc.message, code="insufficient_scope") from None
    except base.Unauthenticated as exc:
        raise Unauthenticated(exc.message, code="invalid_api_key") from None
