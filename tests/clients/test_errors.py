"""The one error table (clients/errors.py), as both clients read it: pure, on answers built here.

The reward and policy services share every HTTP status's meaning but their 404 (UnknownReward,
UnknownModel); the reward service's body type decides before the status; an answer that is not
the service's error shape still maps by its status. The end-to-end paths (real servers, test
doubles) are in test_reward_client.py and tests/policy_server, tests/reliability.
"""

from __future__ import annotations

import httpx
import pytest

from assay.clients import (
    Conflict,
    InvalidRequest,
    Overloaded,
    PermissionDenied,
    ServerError,
    ServiceError,
    Unauthenticated,
    Unavailable,
    UnknownModel,
    UnknownReward,
)
from assay.clients.errors import POLICY_HTTP, REWARD_HTTP, http_error, http_failure
from assay.policy_server.protocol import ErrorInfo as PolicyErrorInfo
from assay.policy_server.protocol import ErrorResponse as PolicyErrorResponse
from assay.rm_server.protocol import ErrorInfo, ErrorResponse, ErrorType

pytestmark = pytest.mark.unit

SHARED = {
    400: InvalidRequest,
    413: InvalidRequest,
    401: Unauthenticated,
    403: PermissionDenied,
    409: Conflict,
    429: Overloaded,
    502: Unavailable,
    503: Unavailable,
    504: Unavailable,
    500: ServerError,
    418: ServerError,
}


def answer(status: int, body: bytes, **headers: str) -> httpx.Response:
    return httpx.Response(status, content=body, headers=headers, request=httpx.Request("POST", "http://h/v1/x"))


def reward_body(type_: ErrorType, message: str = "no") -> bytes:
    return ErrorResponse(error=ErrorInfo(type=type_, message=message)).model_dump_json().encode()


def policy_body(message: str = "no", type_: str = "invalid_request_error") -> bytes:
    return PolicyErrorResponse(error=PolicyErrorInfo(message=message, type=type_)).model_dump_json().encode()


@pytest.mark.parametrize("status", sorted(SHARED))
def test_both_services_statuses_mean_the_same(status):
    for dialect in (REWARD_HTTP, POLICY_HTTP):
        if status == 500:
            continue  # a 500 without the service's body is a proxy's: the test below
        err = http_error(answer(status, b"not json"), dialect)
        assert type(err) is SHARED[status] and err.status == status and err.type is None
        assert err.retryable == (status in (429, 502, 503, 504))


@pytest.mark.parametrize("dialect", [REWARD_HTTP, POLICY_HTTP], ids=["reward", "policy"])
def test_a_500_that_is_not_the_services_own_is_a_lost_answer(dialect):
    """Ray Serve's proxy answers a bare 500 for a request on a replica that died: the replica's answer was lost,
    as with a reset connection (retried where resending is safe; `PolicyClient` makes a weight push look at the
    version instead). The service's own 500 carries its error body and stays a ServerError."""
    proxy = http_error(answer(500, b"Internal Server Error", **{"content-type": "text/plain"}), dialect)
    assert type(proxy) is Unavailable and proxy.retryable and proxy.unanswered and proxy.status == 500
    own_body = reward_body(ErrorType.internal, "bug") if dialect is REWARD_HTTP else policy_body("bug", "internal")
    own = http_error(answer(500, own_body), dialect)
    assert type(own) is ServerError and not own.retryable


def test_a_404_is_the_services_own():
    assert type(http_error(answer(404, b""), REWARD_HTTP)) is UnknownReward
    assert type(http_error(answer(404, policy_body("no model 'x'", "not_found_error")), POLICY_HTTP)) is UnknownModel


def test_the_reward_services_error_type_decides_and_the_message_is_the_servers():
    err = http_error(answer(400, reward_body(ErrorType.not_ready, "loading")), REWARD_HTTP)
    assert type(err) is Unavailable and err.type is ErrorType.not_ready and "loading" in str(err)
    err = http_error(answer(413, reward_body(ErrorType.payload_too_large)), REWARD_HTTP)
    assert type(err) is InvalidRequest and err.type is ErrorType.payload_too_large


def test_the_policy_services_openai_type_is_not_an_error_type():
    err = http_error(answer(429, policy_body("queue full", "rate_limit_error"), **{"retry-after": "3"}), POLICY_HTTP)
    assert type(err) is Overloaded and err.type is None and err.retry_after_s == 3.0 and "queue full" in str(err)


def test_a_request_that_got_no_answer():
    request = httpx.Request("POST", "http://h/v1/x")
    refused = http_failure(httpx.ConnectError("refused", request=request), "POST /v1/x")
    assert type(refused) is Unavailable and refused.retryable and not refused.unanswered
    dropped = http_failure(httpx.RemoteProtocolError("closed", request=request), "POST /v1/x")
    assert type(dropped) is Unavailable and dropped.unanswered  # it went out: the server may have acted
    assert isinstance(dropped, ServiceError)


def test_a_call_the_server_side_cancelled_is_retried_and_one_past_its_deadline_is_not():
    """The clients never cancel a call they wait on, so CANCELLED is the server going away mid-call
    (seen when one of several rm_server replicas is SIGKILLed under load): another try may be answered."""
    import grpc
    from grpc.aio import AioRpcError, Metadata

    from assay.clients.errors import grpc_error

    def failed(code: grpc.StatusCode) -> AioRpcError:
        return AioRpcError(code, Metadata(), Metadata(), details=code.name)

    cancelled = grpc_error(failed(grpc.StatusCode.CANCELLED), "127.0.0.1:50051 Score")
    assert type(cancelled) is Unavailable and cancelled.retryable and cancelled.status == "CANCELLED"
    assert not grpc_error(failed(grpc.StatusCode.DEADLINE_EXCEEDED), "127.0.0.1:50051 Score").retryable
