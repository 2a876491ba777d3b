"""Retries until the call's deadline, not a count (issue 10, defect 6).

Pure tests of `RetryPolicy` on a simulated clock (no sleeps, no timings), the policy driven
through whole outages the way `RetryPolicy.call` drives it; then the servers' own "still
loading" answer, which must carry a Retry-After so that clients poll rather than give up.
"""

from __future__ import annotations

import asyncio

import pytest
from fastapi.testclient import TestClient

from assay.clients import DeadlineExceeded, InvalidRequest, Overloaded, RetryPolicy, ServiceError, Unavailable
from assay.clients.retry import Deadline
from assay.policy_server import grpc_api as policy_grpc
from assay.policy_server import http_api as policy_http
from assay.policy_server.serving import PolicyService
from assay.rm_server import grpc_api as rm_grpc
from assay.rm_server import http_api as rm_http
from assay.rm_server.serving import RewardService

pytestmark = pytest.mark.unit


class SimDeadline:
    """`Deadline`'s interface on a simulated clock."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.now = seconds, 0.0

    def remaining(self) -> float:
        return self.seconds - self.now


def outage(
    policy: RetryPolicy,
    *,
    down_s: float,
    deadline_s: float,
    retry_after_s: float | None = None,
    attempt_s: float = 0.01,
) -> tuple[bool, int, float]:
    """Drive `policy` against a server that refuses for `down_s` seconds, then answers; each
    attempt takes `attempt_s`. Returns (answered, attempts, simulated seconds when it ended)."""
    deadline = SimDeadline(deadline_s)
    for attempt in range(100_000):
        deadline.now += attempt_s
        if deadline.now >= down_s:
            return True, attempt + 1, deadline.now
        wait = policy.wait(attempt, Unavailable("restarting", retry_after_s=retry_after_s), deadline)
        if wait is None:
            return False, attempt + 1, deadline.now
        assert 0 <= wait <= deadline.remaining() - policy.min_attempt_s  # never sleeps past the deadline
        deadline.now += wait
    raise AssertionError("the policy never gave up")


def test_the_default_retries_until_the_deadline_however_many_times():
    policy = RetryPolicy()
    assert policy.max_retries is None
    far = Deadline(3600.0)
    assert policy.wait(10_000, Unavailable("x"), far) is not None  # no count, and no overflow of 2**attempt
    answered, attempts, _ = outage(policy, down_s=60.0, deadline_s=120.0)  # a one-minute restart
    assert answered and attempts > 10


def test_a_restart_within_the_deadline_is_waited_out_with_retry_after():
    answered, attempts, ended = outage(RetryPolicy(), down_s=9.0, deadline_s=30.0, retry_after_s=1.0)
    assert answered and 9.0 <= ended < 9.0 + 2.0  # found again within the backoff cap of its return
    assert attempts <= 10  # Retry-After: about once a second, not hammering


def test_an_outage_longer_than_the_deadline_gives_up_before_it():
    for deadline_s in (0.05, 0.3, 2.0, 30.0):
        for retry_after_s in (None, 1.0):
            answered, _, ended = outage(RetryPolicy(), down_s=1e9, deadline_s=deadline_s, retry_after_s=retry_after_s)
            assert not answered and ended <= deadline_s


def test_backoff_is_jittered_and_capped():
    policy = RetryPolicy(backoff_s=0.1, max_backoff_s=0.5)
    far = Deadline(3600.0)
    for attempt in (0, 3, 50, 5000):
        waits = [policy.wait(attempt, Unavailable("x"), far) for _ in range(200)]
        cap = min(0.5, 0.1 * 2 ** min(attempt, 10))
        assert min(waits) >= 0 and max(waits) <= cap
        assert max(waits) > 0.5 * cap  # spread over the range, not a constant


def test_retry_after_is_a_floor_and_one_past_the_deadline_ends_the_call_at_once():
    policy = RetryPolicy(backoff_s=0.01, max_backoff_s=0.02)
    assert policy.wait(0, Overloaded("x", retry_after_s=2.0), Deadline(60.0)) >= 2.0
    assert policy.wait(0, Unavailable("x", retry_after_s=1.0), Deadline(60.0)) >= 1.0
    assert policy.wait(0, Unavailable("x", retry_after_s=5.0), Deadline(3.0)) is None
    # the deadline nearly spent: no sleep into it, and no retry without time for one
    assert policy.wait(0, Unavailable("x"), Deadline(0.05)) is None


def test_an_optional_count_still_caps_and_only_transient_failures_are_retried():
    policy = RetryPolicy(max_retries=2)
    far = Deadline(3600.0)
    assert policy.wait(1, Unavailable("x"), far) is not None
    err = Unavailable("x")
    assert policy.wait(2, err, far) is None and err.attempts == 3 and "after 3 attempts" in str(err)
    assert RetryPolicy().wait(0, InvalidRequest("x"), far) is None
    for bad in (
        {"max_retries": -1},
        {"backoff_s": -1.0},
        {"backoff_s": 3.0, "max_backoff_s": 2.0},
        {"min_attempt_s": -0.1},
    ):
        with pytest.raises(ValueError):
            RetryPolicy(**bad)


class Script:
    """An attempt that fails with `failures` in turn, then answers "ok"; records the seconds it was given."""

    def __init__(self, *failures: ServiceError) -> None:
        self.failures, self.given = list(failures), []

    def __call__(self, left: float) -> str:
        self.given.append(left)
        if self.failures:
            raise self.failures.pop(0)
        return "ok"

    async def awaited(self, left: float) -> str:
        return self(left)


def test_one_loop_blocking_and_awaited():
    fast = RetryPolicy(backoff_s=0.001, max_backoff_s=0.002)
    for run in (fast.call, lambda attempt, s: asyncio.run(fast.acall(attempt.awaited, s))):
        script = Script(Unavailable("restarting"), Overloaded("busy", retry_after_s=0.01))
        assert run(script, 60.0) == "ok" and len(script.given) == 3
        assert 0 < script.given[-1] <= script.given[0] <= 60.0  # each attempt gets what is left of one deadline
        script = Script(InvalidRequest("bad"), Unavailable("never reached"))
        with pytest.raises(InvalidRequest) as info:
            run(script, 60.0)
        assert info.value.attempts == 1 and len(script.given) == 1  # not transient: not retried
    script = Script()
    with pytest.raises(DeadlineExceeded):
        fast.call(script, -1.0)
    assert script.given == []  # a spent deadline sends nothing


# --- the servers' "still loading" answer -----------------------------------------------------


def test_reward_service_still_loading_says_when_to_ask_again():
    service = RewardService({})  # not started: still loading
    with TestClient(rm_http.create_app(service), base_url="http://127.0.0.1:8000") as http:
        r = http.post("/v1/score", json={"reward": "orm", "items": [{"id": "0", "prompt": "p", "response": "r"}]})
    assert r.status_code == 503 and r.json()["error"]["type"] == "not_ready"
    assert int(r.headers["retry-after"]) >= 1
    failure = rm_grpc.describe(_raised(lambda: service.reward("orm")))
    assert failure.status.name == "UNAVAILABLE" and float(dict(failure.trailers())["retry-after"]) > 0


def test_policy_service_still_loading_says_when_to_ask_again():
    service = PolicyService({})  # not started: still loading
    with TestClient(policy_http.create_app(service), base_url="http://127.0.0.1:8001") as http:
        r = http.post("/v1/completions", json={"model": "policy", "prompt": "Q: 1+1 A: "})
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
    failure = policy_grpc.describe(_raised(lambda: service.backend("policy")))
    assert failure.status.name == "UNAVAILABLE" and float(dict(failure.trailers())["retry-after"]) > 0


def _raised(fn) -> Exception:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the exception is what the test inspects
        return exc
    raise AssertionError("expected a refusal")
