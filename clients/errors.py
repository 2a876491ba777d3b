"""Typed failures of the Assay services, as a client sees them: what happened, and whether a retry can help.

One exception per kind of failure, the same for HTTP and gRPC, and for the reward and policy
services (`UnknownReward` is the reward service's 404, `UnknownModel` the policy service's;
`Conflict` is the policy service's refusal of a weight update made against a stale version):

    exception          HTTP              gRPC                 retryable
    InvalidRequest     400, 413          INVALID_ARGUMENT     no
    Unauthenticated    401               UNAUTHENTICATED      no
    PermissionDenied   403               PERMISSION_DENIED    no
    UnknownReward      404               NOT_FOUND            no
    Overloaded         429               RESOURCE_EXHAUSTED   yes, after `retry_after_s`
    Unavailable        502, 503, 504,    UNAVAILABLE          yes
                       refused / reset
    UnknownModel       404               NOT_FOUND            no
    Conflict           409                                    no
    DeadlineExceeded   client timeout    DEADLINE_EXCEEDED    no (the call's deadline is spent)
    ServerError        500, anything     INTERNAL, anything   no
                       else; a reply     else
                       that breaks the
                       protocol

These are failures of a whole call. A failed *item* is not an exception: it comes back as
`ItemResult.error` (and as None from a reward function, see `RewardClient.as_reward_fn`).
"""

from __future__ import annotations

from collections.abc import Mapping

from assay.rm_server.protocol import ErrorType


class RewardServiceError(Exception):
    """A call to an Assay service (reward or policy) failed as a whole; `ServiceError` is its other name.

    `status` is the HTTP status (int) or the gRPC code name (str, e.g. "UNAVAILABLE"), None when
    the failure happened before an answer (connection refused, client-side checks). `type` is the
    server's `ErrorType` when it said one. `attempts` is how many times the call was sent.
    `unanswered` is True when the request went out (whole or in part) and no answer came back
    (connection reset or dropped): the server may have acted on it.
    """

    retryable: bool = False
    unanswered: bool = False

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


class InvalidRequest(RewardServiceError):
    """The request is malformed or over a limit; change it before sending again."""


class Unauthenticated(RewardServiceError):
    """No API key, or one the server does not know."""


class PermissionDenied(RewardServiceError):
    """The API key lacks the scope this call needs."""


class UnknownReward(RewardServiceError):
    """The server has no reward of that name (see `rewards()`)."""


class Overloaded(RewardServiceError):
    """The server's queue is full; retry after `retry_after_s` seconds (when it said)."""

    retryable = True


class Unavailable(RewardServiceError):
    """The server could not be reached, dropped the connection, or is not ready yet."""

    retryable = True


class UnknownModel(RewardServiceError):
    """The policy server serves no model of that name (see `PolicyClient.models()`)."""


class Conflict(RewardServiceError):
    """The policy server's weights are not at the version the update expected: another update landed."""


class DeadlineExceeded(RewardServiceError):
    """The call's deadline passed before an answer came."""


class ServerError(RewardServiceError):
    """The server failed, or answered something that breaks the protocol (e.g. ids that do not match)."""


ServiceError = RewardServiceError  # the base of every failure above, for either service

# The error type a reward server names (HTTP body, gRPC trailer, or rm_server.local in process)
# decides the exception before any status does.
BY_ERROR_TYPE: Mapping[ErrorType, type[RewardServiceError]] = {
    ErrorType.invalid_request: InvalidRequest,
    ErrorType.payload_too_large: InvalidRequest,
    ErrorType.unknown_reward: UnknownReward,
    ErrorType.overloaded: Overloaded,
    ErrorType.unauthenticated: Unauthenticated,
    ErrorType.permission_denied: PermissionDenied,
    ErrorType.not_ready: Unavailable,
}
