"""The reward service over real gRPC on loopback: the contract, parity with HTTP, streams, errors,
auth, health and reflection. Plus the conversion functions and the generated code's freshness."""

from __future__ import annotations

import asyncio
import math
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pydantic import ValidationError

from assay.base.auth import ApiKeys
from assay.checkpoints import ARITH_DIR
from assay.proto.generate import CONTRACTS
from assay.proto.reward.v1 import reward_pb2 as pb
from assay.proto.reward.v1 import reward_pb2_grpc
from assay.rm_server import grpc_convert as convert
from assay.rm_server.config import Limits, ServerConfig
from assay.rm_server.grpc_api import SERVICE, _within_deadline, start_grpc_server
from assay.rm_server.protocol import (
    CompareItem,
    CompareRequest,
    CompareResponse,
    CompareResult,
    ErrorInfo,
    ErrorType,
    Granularity,
    ItemResult,
    RewardInfo,
    RewardsResponse,
    ScoreItem,
    ScoreRequest,
    ScoreResponse,
    TokenScore,
)
from assay.rm_server.rewards import Reward
from assay.rm_server.server import BackgroundServer
from assay.rm_server.serving import RewardService
from tests.helpers import LoopThread, grpc_served

pytestmark = pytest.mark.service

REPO = Path(__file__).resolve().parents[2]
PROMPT = "Q: 23+45-17 A: "
RIGHT = "23+45=68 68-17=51 #### 51"
WRONG = "23+45=68 68-17=52 #### 52"  # last step wrong
BROKEN = "23+45=68 68-1"  # no final answer

SPEC = f"""
rewards:
  orm:    {{type: model.outcome, path: {ARITH_DIR / "orm"}, activation: sigmoid, max_tokens: 512}}
  prm:    {{type: model.process, path: {ARITH_DIR / "prm"}, steps: arith, max_tokens: 512}}
  format: {{type: rule.regex, pattern: "#### -?\\\\d+$"}}
  # a queue of 8 items drained one item per forward pass: easy to overload
  tight:  {{type: model.outcome, path: {ARITH_DIR / "orm"}, max_queue: 8, max_batch_items: 1, max_wait_ms: 0}}
"""


def items(*responses: str) -> list[ScoreItem]:
    return [ScoreItem(id=f"i{k}", prompt=PROMPT, response=r) for k, r in enumerate(responses)]


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The real reward service with gRPC on (conftest's `server` has none), on the embedded checkpoints."""
    spec = tmp_path_factory.mktemp("grpc") / "rewards.yaml"
    spec.write_text(SPEC)
    with BackgroundServer(ServerConfig(spec=spec, port=0, grpc_port=0)) as s:
        yield s


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.grpc_target) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return reward_pb2_grpc.RewardServiceStub(channel)


def grpc_score(stub, req: ScoreRequest) -> ScoreResponse:
    return convert.score_response_from_proto(stub.Score(convert.score_request_to_proto(req), timeout=60))


def http_score(server, req: ScoreRequest) -> ScoreResponse:
    r = httpx.post(f"{server.http_url}/v1/score", json=req.model_dump(mode="json", exclude_none=True), timeout=60)
    assert r.status_code == 200, r.text
    return ScoreResponse.model_validate_json(r.content)


# --- the generated code and the conversion ---------------------------------------------------


@pytest.mark.unit
def test_generated_code_is_what_the_script_produces(tmp_path):
    """For every contract (the reward's and the policy's)."""
    subprocess.run([sys.executable, str(REPO / "proto" / "generate.py"), "--out", str(tmp_path)], check=True)
    assert {"reward/v1/reward.proto", "policy/v1/policy.proto"} <= set(CONTRACTS)
    for contract in map(Path, CONTRACTS):
        folder, stem = contract.parent, contract.stem
        names = [f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py"]
        assert sorted(p.name for p in (tmp_path / folder).iterdir()) == names
        for name in names:
            committed = (REPO / "proto" / folder / name).read_bytes()
            assert (tmp_path / folder / name).read_bytes() == committed, f"{name} differs: run python proto/generate.py"
        package = str(folder).replace("/", ".")
        assert f"from assay.proto.{package} import {stem}_pb2".encode() in (tmp_path / folder / names[2]).read_bytes()


@pytest.mark.unit
def test_score_messages_round_trip_exactly():
    req = ScoreRequest(
        reward="orm",
        items=[ScoreItem(id="a", prompt="p", response="r"), ScoreItem(id="b", prompt="", response="", reference="")],
        granularity=Granularity.tokens,
        timeout_s=2.5,
    )
    assert convert.score_request_from_proto(convert.score_request_to_proto(req)) == req
    # absent and empty stay apart; every error type has a proto counterpart
    results = [
        ItemResult(id="ok", score=0.1 + 0.2, steps=[], tokens=[TokenScore(text="é", score=-1e-300)]),
        ItemResult(id="none", score=0.0),
        *(ItemResult(id=t.value, score=None, error=ErrorInfo(type=t, message=t.value)) for t in ErrorType),
    ]
    resp = ScoreResponse(reward="orm", reward_id="sha256:x", results=results)
    back = convert.score_response_from_proto(convert.score_response_to_proto(resp))
    assert back == resp
    assert back.results[0].steps == [] and back.results[1].steps is None and back.results[1].tokens is None


@pytest.mark.unit
def test_compare_and_rewards_messages_round_trip_exactly():
    req = CompareRequest(reward="j", items=[CompareItem(id="a", prompt="p", response_a="x", response_b="y")])
    assert convert.compare_request_from_proto(convert.compare_request_to_proto(req)) == req
    resp = CompareResponse(
        reward="j",
        reward_id="id",
        results=[
            *(
                CompareResult(id=w, prob_a=p, winner=w, scores=[1.0, -2.0])
                for w, p in [("a", 0.7), ("b", 0.2), ("tie", 0.5)]
            ),
            CompareResult(id="e", prob_a=None, error=ErrorInfo(type=ErrorType.timeout, message="late")),
        ],
    )
    assert convert.compare_response_from_proto(convert.compare_response_to_proto(resp)) == resp
    rewards = RewardsResponse(
        rewards=[
            RewardInfo(
                name="n",
                type="t",
                reward_id="i",
                needs_reference=True,
                granularities=list(Granularity),
                pairwise=True,
                pinned=False,
            )
        ]
    )
    assert convert.rewards_response_from_proto(convert.rewards_response_to_proto(rewards)) == rewards


@pytest.mark.unit
def test_proto_requests_are_validated_like_json_bodies():
    assert convert.score_request_from_proto(pb.ScoreRequest(reward="orm")).granularity == Granularity.outcome
    bad = pb.ScoreRequest(reward="", items=[pb.ScoreItem(id="", prompt="p", response="r")], granularity=9, timeout_s=0)
    with pytest.raises(ValidationError) as info:
        convert.score_request_from_proto(bad)
    locs = {e["loc"] for e in info.value.errors()}
    assert locs == {("reward",), ("items", 0, "id"), ("granularity",), ("timeout_s",)}


@pytest.mark.unit
def test_grpc_deadline_lowers_the_request_timeout():
    class Context:
        def __init__(self, left):
            self.left = left

        def time_remaining(self):
            return self.left

    req = ScoreRequest(reward="orm", items=items(RIGHT))
    assert _within_deadline(req, Context(None)).timeout_s is None
    assert _within_deadline(req, Context(0.5)).timeout_s == 0.5
    assert _within_deadline(req.model_copy(update={"timeout_s": 0.2}), Context(0.5)).timeout_s == 0.2
    assert _within_deadline(req.model_copy(update={"timeout_s": 9.0}), Context(0.5)).timeout_s == 0.5


# --- parity with HTTP ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reward", "granularity"),
    [
        ("orm", "outcome"),
        ("orm", "tokens"),
        ("prm", "outcome"),
        ("prm", "steps"),
        ("prm", "tokens"),
        ("format", "outcome"),
    ],
)
def test_score_is_identical_to_http(server, stub, reward, granularity):
    req = ScoreRequest(reward=reward, items=items(RIGHT, WRONG, BROKEN), granularity=granularity)
    got = grpc_score(stub, req)
    assert got == http_score(server, req)  # every float bit for bit, reward_id included
    assert got.reward_id.startswith("sha256:") and len(got.results) == 3
    assert all(r.error is None and r.score is not None for r in got.results)
    assert got.results[0].steps is not None or granularity != "steps"  # (a PRM gives steps with tokens too)
    assert (got.results[0].tokens is not None) == (granularity == "tokens")


def test_list_rewards_matches_http(server, stub):
    got = convert.rewards_response_from_proto(stub.ListRewards(pb.ListRewardsRequest(), timeout=10))
    r = httpx.get(f"{server.http_url}/v1/rewards", timeout=10)
    assert got == RewardsResponse.model_validate_json(r.content)
    assert [x.name for x in got.rewards] == ["orm", "prm", "format", "tight"]


def test_compare_gives_the_sigmoid_of_the_score_difference(stub):
    req = CompareRequest(reward="orm", items=[CompareItem(id="c", prompt=PROMPT, response_a=RIGHT, response_b=WRONG)])
    got = convert.compare_response_from_proto(stub.Compare(convert.compare_request_to_proto(req), timeout=60))
    a, b = (r.score for r in grpc_score(stub, ScoreRequest(reward="orm", items=items(RIGHT, WRONG))).results)
    (result,) = got.results
    assert result.scores == [a, b]
    assert result.prob_a == pytest.approx(1 / (1 + math.exp(-(a - b))), rel=1e-12)
    assert result.winner == ("a" if a > b else "b")


# --- ScoreStream -----------------------------------------------------------------------------


def test_stream_answers_every_pipelined_request_as_unary_does(stub):
    cases = {
        f"r{k}": ScoreRequest(
            reward=["orm", "prm", "format"][k % 3],
            items=items(RIGHT, WRONG)[: 1 + k % 2],
            granularity="steps" if k % 3 == 1 else "outcome",
        )
        for k in range(20)
    }
    cases["bad"] = ScoreRequest(reward="nope", items=items(RIGHT))
    unary = {rid: grpc_score(stub, req) for rid, req in cases.items() if rid != "bad"}
    sent = [convert.score_stream_request_to_proto(rid, req) for rid, req in cases.items()]
    answers = [convert.score_stream_response_from_proto(m) for m in stub.ScoreStream(iter(sent), timeout=60)]
    by_id = {a.request_id: a for a in answers}
    assert len(answers) == len(by_id) == 21 and set(by_id) == set(cases)
    bad = by_id.pop("bad")
    assert bad.response is None and bad.error.type == ErrorType.unknown_reward and "'nope'" in bad.error.message
    for rid, answer in by_id.items():
        assert answer.error is None
        # the same items, maybe batched with other requests' items: equal up to float rounding
        for got, want in zip(answer.response.results, unary[rid].results, strict=True):
            assert got.id == want.id and got.score == pytest.approx(want.score, abs=1e-6)
            assert got.steps == (pytest.approx(want.steps, abs=1e-6) if want.steps is not None else None)
        assert answer.response.reward_id == unary[rid].reward_id


def test_stream_answers_while_the_client_is_still_sending(stub):
    """Each answer comes before the next request is sent: nothing waits for the stream to end."""
    outbox: queue.Queue = queue.Queue()
    req = ScoreRequest(reward="format", items=items(RIGHT))
    outbox.put(convert.score_stream_request_to_proto("0", req))
    call = stub.ScoreStream(iter(outbox.get, None), timeout=30)
    seen = []
    for msg in call:
        seen.append(msg.request_id)
        outbox.put(convert.score_stream_request_to_proto(str(len(seen)), req) if len(seen) < 5 else None)
    assert seen == ["0", "1", "2", "3", "4"]


def test_stream_requests_run_concurrently(stub):
    slow = ScoreRequest(reward="prm", items=[ScoreItem(id=f"s{k}", prompt=PROMPT, response=RIGHT) for k in range(300)])
    fast = ScoreRequest(reward="format", items=items(RIGHT))
    sent = [convert.score_stream_request_to_proto("slow", slow), convert.score_stream_request_to_proto("fast", fast)]
    order = [m.request_id for m in stub.ScoreStream(iter(sent), timeout=60)]
    assert order == ["fast", "slow"]


def test_stream_reports_overload_per_request_and_goes_on(stub):
    req = ScoreRequest(reward="tight", items=[ScoreItem(id=f"i{k}", prompt=PROMPT, response=RIGHT) for k in range(8)])
    sent = [convert.score_stream_request_to_proto(str(k), req) for k in range(20)]
    answers = [convert.score_stream_response_from_proto(m) for m in stub.ScoreStream(iter(sent), timeout=60)]
    assert sorted(int(a.request_id) for a in answers) == list(range(20))
    overloaded = [a for a in answers if a.error is not None]
    assert overloaded and all(a.error.type == ErrorType.overloaded for a in overloaded)
    assert all("queue is full" in a.error.message and a.retry_after_s > 0 for a in overloaded)
    assert any(a.response is not None and len(a.response.results) == 8 for a in answers)


# --- errors ----------------------------------------------------------------------------------


def test_unknown_reward_is_not_found(stub):
    err = rpc_error(stub.Score, pb.ScoreRequest(reward="nope", items=[pb.ScoreItem(id="a", prompt="p", response="r")]))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "'nope'" in err.details() and "orm" in err.details()


def test_requests_breaking_the_protocol_are_invalid_argument(stub):
    err = rpc_error(stub.Score, pb.ScoreRequest(reward="orm"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "`items` is empty" in err.details()
    bad = pb.ScoreRequest(reward="orm", items=[pb.ScoreItem(id="", prompt="p", response="r")], granularity=9)
    err = rpc_error(stub.Score, bad)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        err.details().startswith("invalid request: ")
        and "items.0.id" in err.details()
        and "granularity" in err.details()
    )
    err = rpc_error(
        stub.Score,
        convert.score_request_to_proto(ScoreRequest(reward="format", items=items(RIGHT), granularity="tokens")),
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "does not give tokens scores" in err.details()


def test_unary_overload_is_resource_exhausted_with_retry_after(stub):
    req = convert.score_request_to_proto(
        ScoreRequest(reward="tight", items=[ScoreItem(id=f"i{k}", prompt=PROMPT, response=RIGHT) for k in range(8)])
    )
    futures = [stub.Score.future(req, timeout=60) for _ in range(12)]
    failed = [f.exception() for f in futures if f.exception() is not None]
    assert failed and len(failed) < 12
    for err in failed:
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in err.details()
        trailers = dict(err.trailing_metadata())
        assert float(trailers["retry-after"]) > 0 and trailers["error-type"] == "overloaded"


class Boom(Reward):
    type = "test.boom"

    async def score(self, items, granularity):
        raise RuntimeError("secret internal state")


class Hang(Reward):
    """Scores nothing until its call is cancelled, and says when it started and when it was cancelled."""

    type = "test.hang"

    def __init__(self, name: str, reward_id: str) -> None:
        super().__init__(name, reward_id)
        self.started, self.cancelled = threading.Event(), threading.Event()

    async def score(self, items, granularity):
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


@contextmanager
def bare_server(rewards: dict[str, Reward] | None = None) -> Iterator[tuple[LoopThread, RewardService, grpc.Channel]]:
    """Only the gRPC server, over a RewardService that the test starts when it wants."""
    service = RewardService(rewards or {"boom": Boom("boom", "sha256:boom")})
    with LoopThread() as loop, grpc_served(loop, start_grpc_server(service, ApiKeys(), "127.0.0.1", 0, Limits())) as ch:
        yield loop, service, ch


def test_health_follows_readiness():
    with bare_server() as (loop, service, channel):
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10)
        for name in ("", SERVICE):
            status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        req = convert.score_request_to_proto(ScoreRequest(reward="boom", items=items(RIGHT)))
        err = rpc_error(reward_pb2_grpc.RewardServiceStub(channel).Score, req, timeout=5)
        assert err.code() == grpc.StatusCode.UNAVAILABLE and "loading" in err.details()
        loop.run(service.start())
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()


def test_unexpected_errors_are_internal_without_details():
    """A bug in a reward becomes INTERNAL (unary) or an `internal` answer (stream), nothing leaked."""
    with bare_server() as (loop, service, channel):
        loop.run(service.start())
        boom = reward_pb2_grpc.RewardServiceStub(channel)
        req = convert.score_request_to_proto(ScoreRequest(reward="boom", items=items(RIGHT)))
        err = rpc_error(boom.Score, req, timeout=10)
        assert err.code() == grpc.StatusCode.INTERNAL and "internal error" in err.details()
        assert "secret" not in err.details() and "Traceback" not in err.details()
        (answer,) = boom.ScoreStream(iter([pb.ScoreStreamRequest(request_id="x", request=req)]), timeout=10)
        assert answer.request_id == "x" and answer.error.type == pb.ERROR_TYPE_INTERNAL
        assert "secret" not in answer.error.message


def test_a_call_the_client_cancels_is_counted_499():
    """The base's one Timer: a request cancelled under it is recorded 499 (nobody reads the answer),
    as on the policy service, not 500 (a bug); the reward's work is cancelled with it."""
    hang = Hang("hang", "sha256:hang")
    with bare_server({"hang": hang}) as (loop, service, channel):
        loop.run(service.start())
        req = convert.score_request_to_proto(ScoreRequest(reward="hang", items=items(RIGHT)))
        call = reward_pb2_grpc.RewardServiceStub(channel).Score.future(req, timeout=60)
        assert hang.started.wait(30), "the call never reached the reward"
        assert call.cancel()
        assert hang.cancelled.wait(30), "the cancelled call's work went on"
        count = lambda code: service.metrics.registry.get_sample_value(
            "assay_rm_requests_total", {"route": "grpc/Score", "reward": "hang", "code": code}
        )
        deadline = time.monotonic() + 30
        while count("499") is None and time.monotonic() < deadline:
            time.sleep(0.05)  # the handler records it as it unwinds, just after the reward's cancellation
        assert count("499") == 1 and count("500") is None


# --- health and reflection -------------------------------------------------------------------


def test_health_reports_serving(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE):
        assert (
            health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
            == health_pb2.HealthCheckResponse.SERVING
        )
    err = rpc_error(health.Check, health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
    assert err.code() == grpc.StatusCode.NOT_FOUND


def list_services(channel) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    (answer,) = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    return {s.name for s in answer.list_services_response.service}


def test_reflection_lists_the_service(channel):
    assert SERVICE == "assay.reward.v1.RewardService"
    assert {SERVICE, "grpc.health.v1.Health"} <= list_services(channel)


# --- auth and limits -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """A second server with API keys and small limits, serving one rule (no models to load)."""
    spec = tmp_path_factory.mktemp("guarded") / "rewards.yaml"
    spec.write_text('rewards:\n  format: {type: rule.regex, pattern: "#### -?\\\\d+$"}\n')
    limits = Limits(max_body_bytes=64 * 1024, max_items=4)
    keys = ("sekret-key-for-tests:score", "boss-key-for-tests:admin")
    config = ServerConfig(spec=spec, port=0, grpc_port=0, api_keys=keys, limits=limits)
    with BackgroundServer(config) as s, grpc.insecure_channel(s.grpc_target) as ch:
        yield ch


def test_api_keys_are_checked_on_every_reward_method(guarded):
    stub = reward_pb2_grpc.RewardServiceStub(guarded)
    req = convert.score_request_to_proto(ScoreRequest(reward="format", items=items(RIGHT, BROKEN)))
    for metadata in [None, (("authorization", "Bearer wrong"),), (("authorization", "sekret-key-for-tests"),)]:
        for call, arg in [(stub.Score, req), (stub.ListRewards, pb.ListRewardsRequest())]:
            err = rpc_error(call, arg, metadata=metadata, timeout=5)
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "key" in err.details()
    err = rpc_error(
        lambda: list(stub.ScoreStream(iter([pb.ScoreStreamRequest(request_id="x", request=req)]), timeout=5))
    )
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    for key in ("sekret-key-for-tests", "boss-key-for-tests"):
        resp = stub.Score(req, metadata=(("authorization", f"Bearer {key}"),), timeout=5)
        assert [r.score for r in resp.results] == [1.0, 0.0]


def test_health_and_reflection_need_no_key(guarded):
    health = health_pb2_grpc.HealthStub(guarded)
    assert (
        health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5).status
        == health_pb2.HealthCheckResponse.SERVING
    )
    assert SERVICE in list_services(guarded)


def test_limits_are_enforced(guarded):
    stub = reward_pb2_grpc.RewardServiceStub(guarded)
    auth = (("authorization", "Bearer sekret-key-for-tests"),)
    five = convert.score_request_to_proto(ScoreRequest(reward="format", items=items(*[RIGHT] * 5)))
    err = rpc_error(stub.Score, five, metadata=auth, timeout=5)
    assert (
        err.code() == grpc.StatusCode.INVALID_ARGUMENT
        and "5 items in one request, more than the limit of 4" in err.details()
    )
    huge = convert.score_request_to_proto(ScoreRequest(reward="format", items=items("x" * 100_000)))
    err = rpc_error(stub.Score, huge, metadata=auth, timeout=5)
    # gRPC's own size check refuses the message before it is parsed
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in err.details()
