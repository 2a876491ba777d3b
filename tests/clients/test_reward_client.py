"""The reward clients against the real server on loopback (HTTP and gRPC, sync and async), and
against scripted test doubles for the failures the real server will not produce on demand.

Most tests run four times through the `connect` fixture: {http, grpc} x {sync, async}. The async
client is driven from the same test body by `Blocking`, one event loop per test.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml

from assay.checkpoints import ARITH_DIR
from assay.clients import (
    AsyncRewardClient,
    DeadlineExceeded,
    InvalidRequest,
    Overloaded,
    RetryPolicy,
    RewardClient,
    ServerError,
    Unauthenticated,
    Unavailable,
    UnknownReward,
)
from assay.clients import reward as reward_module
from assay.clients.errors import retry_after_s
from assay.clients.retry import Deadline
from assay.clients.reward_fn import RewardFnForm
from assay.clients.reward_transport import PerLoop
from assay.rm_server.config import Limits, ServerConfig
from assay.rm_server.protocol import ErrorInfo, ErrorType, ItemResult, ScoreItem, ScoreResponse
from assay.rm_server.server import BackgroundServer
from assay.services import free_port
from tests.clients.reward_doubles import (
    INTERNAL,
    INVALID,
    OVERLOADED,
    UNAVAILABLE,
    Fail,
    Slow,
    duplicate_id,
    echo,
    missing_id,
    reversed_echo,
    scripted_grpc,
    scripted_http,
    wrong_id,
)
from tests.helpers import LoopThread

pytestmark = pytest.mark.service

PROMPT = "Q: 23+45-17 A: "
RIGHT = "23+45=68 68-17=51 #### 51"
WRONG = "23+45=68 68-17=52 #### 52"
ITEMS = [{"prompt": PROMPT, "response": r} for r in (RIGHT, WRONG, "")]  # "" has no steps: prm fails it
FAST = {"backoff_s": 0.01, "max_backoff_s": 0.05}  # retries without long sleeps

SPEC = {
    "rewards": {
        "orm": {"type": "model.outcome", "path": str(ARITH_DIR / "orm"), "activation": "sigmoid", "max_tokens": 512},
        "prm": {"type": "model.process", "path": str(ARITH_DIR / "prm"), "steps": "arith", "max_tokens": 512},
        "format": {"type": "rule.regex", "pattern": r"#### -?\d+$"},
        "correct": {"type": "rule.math_equal", "answer_pattern": r"####\s*(-?\d+)\s*$"},
        "judge": {"type": "judge", "endpoint": "http://127.0.0.1:9/v1", "model": "verifier"},  # nothing listens
    }
}


def _spec(tmp_path_factory, name: str, spec: dict) -> Path:
    path = tmp_path_factory.mktemp(name) / "rewards.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with BackgroundServer(ServerConfig(spec=_spec(tmp_path_factory, "spec", SPEC), port=0, grpc_port=0)) as s:
        yield s


@pytest.fixture(scope="module")
def strict_server(tmp_path_factory):
    """Rules only (starts fast), an API key, and a 4 KiB request limit."""
    spec = _spec(tmp_path_factory, "strict", {"rewards": {"format": SPEC["rewards"]["format"]}})
    keys = ("k1-key-for-tests:score",)
    config = ServerConfig(spec=spec, port=0, grpc_port=0, api_keys=keys, limits=Limits(max_body_bytes=4096))
    with BackgroundServer(config) as s:
        yield s


class Blocking:
    """An AsyncRewardClient driven from synchronous test code, every call on one event loop."""

    def __init__(self, make: Callable[[], AsyncRewardClient]) -> None:
        self._runner = asyncio.Runner()
        self.client = make()  # outside any loop: the transport makes its connections on the loop that uses them

    def score(self, *args, **kw):
        return self._runner.run(self.client.score(*args, **kw))

    def compare(self, *args, **kw):
        return self._runner.run(self.client.compare(*args, **kw))

    def rewards(self, **kw):
        return self._runner.run(self.client.rewards(**kw))

    def reward_id(self, name, **kw):
        return self._runner.run(self.client.reward_id(name, **kw))

    def health(self, **kw):
        return self._runner.run(self.client.health(**kw))

    def ready(self, **kw):
        return self._runner.run(self.client.ready(**kw))

    def as_reward_fn(self, *args, **kw):
        fn = self._runner.run(self.client.as_reward_fn(*args, **kw))
        assert inspect.iscoroutinefunction(fn)

        def blocking(*a, **k):
            return self._runner.run(fn(*a, **k))

        blocking.__name__, blocking.reward_id = fn.__name__, fn.reward_id
        return blocking

    def close(self) -> None:
        self._runner.run(self.client.close())
        self._runner.close()


@dataclass
class Connector:
    transport: str  # http | grpc
    mode: str  # sync | async
    opened: list = field(default_factory=list)

    def address(self, server) -> str:
        return server.http_url if self.transport == "http" else server.grpc_target

    def client(self, address: str, **options):
        cls = RewardClient if self.mode == "sync" else AsyncRewardClient
        factory = cls.http if self.transport == "http" else cls.grpc
        c = factory(address, **options) if self.mode == "sync" else Blocking(lambda: factory(address, **options))
        self.opened.append(c)
        return c

    def to(self, server, **options):
        return self.client(self.address(server), **options)

    def double(self, steps):
        return scripted_http(steps) if self.transport == "http" else scripted_grpc(steps)

    def closed(self) -> str:
        port = free_port()  # bound and closed again: connecting is refused
        return f"http://127.0.0.1:{port}" if self.transport == "http" else f"127.0.0.1:{port}"


@pytest.fixture(params=["http-sync", "http-async", "grpc-sync", "grpc-async"])
def connect(request):
    connector = Connector(*request.param.split("-"))
    yield connector
    for c in connector.opened:
        c.close()


# --- against the real server -----------------------------------------------------------------


@pytest.fixture(scope="module")
def raw_scores(server) -> dict[str, ScoreResponse]:
    """What the server answers to a plain HTTP post, without any client: the reference."""
    out = {}
    for reward in ("orm", "prm", "format"):
        items = [{"id": str(i), **item} for i, item in enumerate(ITEMS)]
        r = httpx.post(f"{server.http_url}/v1/score", json={"reward": reward, "items": items}, timeout=60)
        out[reward] = ScoreResponse.model_validate_json(r.content)
    return out


def test_scores_are_the_servers_on_every_transport(connect, server, raw_scores):
    client = connect.to(server)
    for reward, expected in raw_scores.items():
        got = client.score(reward, ITEMS)
        assert got.reward_id == expected.reward_id == client.reward_id(reward)
        assert [r.id for r in got.results] == ["0", "1", "2"]  # positions, as the raw post used
        for g, e in zip(got.results, expected.results, strict=True):
            assert (g.score is None) == (e.score is None)
            if e.score is not None:
                assert g.score == pytest.approx(e.score, rel=1e-5, abs=1e-6)
            assert g.error == e.error
    failed = client.score("prm", ITEMS).results[2]
    assert failed.score is None and failed.error.type == ErrorType.invalid_input


def test_results_keep_request_order_and_given_ids(connect, server):
    items = [ScoreItem(id="b", prompt=PROMPT, response=WRONG), {"id": "a", "prompt": PROMPT, "response": RIGHT}]
    reply = connect.to(server).score("format", items)
    assert [(r.id, r.score) for r in reply.results] == [("b", 1.0), ("a", 1.0)]
    reply = connect.to(server).score("correct", [{**ITEMS[0], "reference": "51"}, {**ITEMS[1], "reference": "51"}])
    assert [r.score for r in reply.results] == [1.0, 0.0]


def test_compare(connect, server):
    reply = connect.to(server).compare("orm", [{"prompt": PROMPT, "response_a": RIGHT, "response_b": WRONG}])
    [result] = reply.results
    a, b = result.scores
    assert result.id == "0" and result.error is None
    assert result.prob_a == pytest.approx(1 / (1 + math.exp(b - a)))
    assert result.winner == ("a" if result.prob_a > 0.5 else "b")


def test_request_errors_are_typed_and_not_retried(connect, server):
    client = connect.to(server, **FAST)
    with pytest.raises(UnknownReward) as info:
        client.score("nope", ITEMS)
    assert info.value.status == (404 if connect.transport == "http" else "NOT_FOUND")
    assert info.value.attempts == 1 and not info.value.retryable and "nope" in info.value.message
    with pytest.raises(InvalidRequest) as info:
        client.score("orm", [])
    assert info.value.attempts == 1 and "empty" in info.value.message
    with pytest.raises(InvalidRequest, match="steps"):
        client.score("orm", ITEMS, granularity="steps")  # orm gives outcome and tokens only
    with pytest.raises(UnknownReward):
        client.reward_id("nope")
    # refused before sending: ids that clash, a granularity that does not exist
    with pytest.raises(InvalidRequest, match="twice"):
        client.score("orm", [{"id": "1", **ITEMS[0]}, ITEMS[1]])  # the second gets id "1" too
    with pytest.raises(InvalidRequest):
        client.score("orm", ITEMS, granularity="words")


def test_api_keys_and_size_limit(connect, strict_server):
    item = [{"prompt": "p", "response": "#### 1"}]
    for key in (None, "wrong"):
        with pytest.raises(Unauthenticated) as info:
            connect.to(strict_server, api_key=key, **FAST).score("format", item)
        assert info.value.attempts == 1
    client = connect.to(strict_server, api_key="k1-key-for-tests", **FAST)
    assert client.score("format", item).results[0].score == 1.0
    # over the server's limit: a request to split, never retried as if the server were busy
    with pytest.raises(InvalidRequest) as info:
        client.score("format", [{"prompt": "p", "response": "x" * 10_000}])
    assert info.value.attempts == 1


def test_health_and_ready(connect, server):
    client = connect.to(server)
    assert client.health() and client.ready()
    down = connect.client(connect.closed(), timeout_s=2)
    assert not down.health() and not down.ready()


def test_connection_refused_is_retried_then_unavailable(connect):
    client = connect.client(connect.closed(), max_retries=2, **FAST)
    with pytest.raises(Unavailable) as info:
        client.score("orm", ITEMS)
    assert info.value.retryable and info.value.attempts == 3


def test_reward_fn(connect, server):
    client = connect.to(server)
    orm = client.as_reward_fn("orm")
    assert orm.__name__ == "orm" and orm.reward_id == client.reward_id("orm")
    scores = orm([PROMPT, PROMPT], [RIGHT, WRONG])
    expected = [r.score for r in client.score("orm", ITEMS[:2]).results]
    assert all(isinstance(s, float) for s in scores) and scores == pytest.approx(expected, rel=1e-5)
    # a failed item is None, never 0; the others still score
    prm = client.as_reward_fn("prm")(prompts=[PROMPT, PROMPT], completions=[RIGHT, ""])
    assert isinstance(prm[0], float) and prm[1] is None
    assert client.as_reward_fn("judge")([PROMPT], [RIGHT]) == [None]  # judge unreachable: judge_unavailable
    # chat messages, and references from a dataset column of another name (ints here)
    correct = client.as_reward_fn("correct", reference_key="answer")
    chats = [[{"role": "assistant", "content": RIGHT}], [{"role": "assistant", "content": WRONG}]]
    prompts = [[{"role": "system", "content": "be right"}, {"role": "user", "content": PROMPT}]] * 2
    assert correct(prompts, chats, answer=[51, 51], trainer_state=None) == [1.0, 0.0]
    assert correct([], [], answer=[]) == []
    with pytest.raises(InvalidRequest, match="need one each"):
        correct([PROMPT], [RIGHT, WRONG], answer=[51, 51])
    with pytest.raises(InvalidRequest, match="reference"):  # the server: `correct` needs one
        correct([PROMPT], [RIGHT])


# --- against the test doubles ----------------------------------------------------------------


def test_transient_failures_are_retried_with_the_same_ids(connect):
    with connect.double([UNAVAILABLE, UNAVAILABLE, echo]) as double:
        reply = connect.client(double.address, **FAST).score("r", ITEMS)
    assert [r.score for r in reply.results] == [float(len(i["response"])) for i in ITEMS]
    assert len(double.requests) == 3
    assert all(req.items == double.requests[0].items for req in double.requests)
    assert [i.id for i in double.requests[0].items] == ["0", "1", "2"]


def test_a_service_still_loading_is_retried_until_the_deadline_not_a_count(connect):
    """Issue 10, defect 6: ten 503 not_ready in a row (a restart) and then the answer; the old
    default gave up after four retries."""
    with connect.double([UNAVAILABLE] * 10 + [echo]) as double:
        reply = connect.client(double.address, timeout_s=60, **FAST).score("r", ITEMS)
    assert [r.score for r in reply.results] == [float(len(i["response"])) for i in ITEMS]
    assert len(double.requests) == 11 and all(req.items == double.requests[0].items for req in double.requests)


def test_overloaded_waits_at_least_retry_after(connect):
    with connect.double([OVERLOADED, echo]) as double:
        reply = connect.client(double.address, **FAST).score("r", ITEMS)
    assert len(reply.results) == 3 and len(double.requests) == 2
    assert double.times[1] - double.times[0] >= 0.95  # Retry-After: 1, though the backoff is 10 ms


def test_retry_after_past_the_deadline_is_not_waited_for(connect):
    five = Fail(OVERLOADED.http_status, OVERLOADED.grpc_code, OVERLOADED.type, retry_after=5)
    start = time.monotonic()
    with connect.double([five, echo]) as double, pytest.raises(Overloaded) as info:
        connect.client(double.address, timeout_s=2, **FAST).score("r", ITEMS)
    assert time.monotonic() - start < 2 and len(double.requests) == 1
    assert info.value.retry_after_s == 5 and info.value.retryable


@pytest.mark.parametrize(("fail", "error"), [(INVALID, InvalidRequest), (INTERNAL, ServerError)])
def test_other_failures_are_sent_once(connect, fail, error):
    with connect.double([fail, echo]) as double, pytest.raises(error) as info:
        connect.client(double.address, **FAST).score("r", ITEMS)
    assert len(double.requests) == 1 and info.value.attempts == 1 and not info.value.retryable


@pytest.mark.parametrize("reply", [wrong_id, duplicate_id, missing_id])
def test_a_reply_must_hold_exactly_the_ids_sent(connect, reply):
    with connect.double([reply, echo]) as double, pytest.raises(ServerError, match="id"):
        connect.client(double.address, **FAST).score("r", ITEMS)
    assert len(double.requests) == 1


def test_results_are_matched_back_by_id(connect):
    with connect.double([reversed_echo]) as double:
        reply = connect.client(double.address).score("r", [{"id": i, **it} for i, it in zip("xyz", ITEMS)])
    assert [(r.id, r.score) for r in reply.results] == [("x", 25.0), ("y", 25.0), ("z", 0.0)]


def test_deadline_is_sent_and_enforced(connect, monkeypatch):
    monkeypatch.setattr(reward_module, "GRACE_S", 0.2)
    with connect.double([Slow(3.0), echo]) as double:
        start = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            connect.client(double.address, **FAST).score("r", ITEMS, timeout_s=0.5)
        elapsed = time.monotonic() - start
    assert elapsed < 2.0 and len(double.requests) == 1  # a spent deadline is not retried
    assert 0 < double.requests[0].timeout_s <= 0.5


# --- pure parts ------------------------------------------------------------------------------


@pytest.mark.unit
def test_retry_after_parsing():
    assert retry_after_s("2") == 2.0 and retry_after_s("0.5") == 0.5 and retry_after_s("-3") == 0.0
    assert retry_after_s(None) is None and retry_after_s("soon") is None
    in_a_minute = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 60))
    assert 55 <= retry_after_s(in_a_minute) <= 61


@pytest.mark.unit
def test_backoff_is_full_jitter_capped_floored_and_bounded():
    policy = RetryPolicy(max_retries=3, backoff_s=0.1, max_backoff_s=0.3)
    far = Deadline(100.0)
    waits = [[policy.wait(n, Unavailable("x"), far) for _ in range(200)] for n in range(3)]
    for n, ws in enumerate(waits):
        assert min(ws) >= 0 and max(ws) <= min(0.3, 0.1 * 2**n)
        assert max(ws) > 0.5 * min(0.3, 0.1 * 2**n)  # spread over the range, not a constant
    assert policy.wait(3, Unavailable("x"), far) is None  # max_retries spent
    assert policy.wait(0, InvalidRequest("x"), far) is None  # not transient
    assert policy.wait(0, Overloaded("x", retry_after_s=2.0), far) >= 2.0
    assert policy.wait(0, Overloaded("x", retry_after_s=2.0), Deadline(1.0)) is None
    err = Unavailable("x")
    policy.wait(2, err, far)
    assert err.attempts == 3 and "after 3 attempts" in str(err)
    with pytest.raises(ValueError):
        RetryPolicy(max_retries=-1)


@pytest.mark.unit
def test_addresses_are_checked():
    with pytest.raises(ValueError, match="base URL"):
        RewardClient.http("127.0.0.1:8000")
    with pytest.raises(ValueError, match="host:port"):
        RewardClient.grpc("http://127.0.0.1:50051")


NEEDS_REF = RewardFnForm("correct", "sha256:c", needs_reference=True)
TRL = {"trainer_state": object(), "completion_ids": [[1], [2]], "log_extra": print, "log_metric": print}  # TRL's own


@pytest.mark.unit
def test_reward_fn_finds_the_reference_under_common_names_or_the_key_given():
    assert [i.reference for i in NEEDS_REF.items(["a", "b"], ["x", "y"], {"answer": [51, 7], **TRL})] == ["51", "7"]
    for key in ("reference", "solution", "ground_truth"):
        [item] = NEEDS_REF.items(["a"], ["x"], {key: ["3"]})
        assert item.reference == "3" and item.metadata is None
    # `reference` comes first; the column not taken travels as metadata, like any other
    [item] = NEEDS_REF.items(["a"], ["x"], {"answer": ["9"], "reference": ["1"]})
    assert item.reference == "1" and item.metadata == {"answer": "9"}
    keyed = RewardFnForm("correct", "sha256:c", needs_reference=True, reference_key="gold")
    [item] = keyed.items(["a"], ["x"], {"gold": [5], "answer": ["9"]})
    assert item.reference == "5" and item.metadata == {"answer": "9"}


@pytest.mark.unit
def test_reward_fn_without_a_reference_column_says_which_columns_there_were():
    with pytest.raises(InvalidRequest) as info:
        NEEDS_REF.items(["a"], ["x"], {"gold": ["5"], "level": [2], **TRL})
    message = str(info.value)
    assert "'gold', 'level'" in message and "reference_key" in message and "trainer_state" not in message
    keyed = RewardFnForm("correct", "sha256:c", needs_reference=True, reference_key="gold")
    with pytest.raises(InvalidRequest, match=r"'answer'.*no 'gold'.*reference_key"):
        keyed.items(["a"], ["x"], {"answer": ["5"]})
    # a reward that needs none takes rows without one, and references where there are some
    optional = RewardFnForm("orm", "sha256:o", needs_reference=False)
    assert [i.reference for i in optional.items(["a", "b"], ["x", "y"], {"answer": ["1", None]})] == ["1", None]
    assert optional.items(["a"], ["x"], {})[0].reference is None


@pytest.mark.unit
def test_reward_fn_rows_without_a_reference_are_not_sent_and_get_none():
    items = NEEDS_REF.items(["a", "b", "c"], ["x", "y", "z"], {"answer": ["1", None, "3"]})
    assert items[1] is None and [items[0].id, items[2].id] == ["0", "2"]
    reply = ScoreResponse(
        reward="correct",
        reward_id="sha256:c",
        results=[
            ItemResult(id="0", score=1.0),
            ItemResult(id="2", score=None, error=ErrorInfo(type=ErrorType.timeout, message="late")),
        ],
    )
    assert NEEDS_REF.scores(items, reply) == [1.0, None, None]  # no reference; a failed item: None, never 0
    assert NEEDS_REF.scores([None, None], None) == [None, None]  # nothing to send, nothing sent
    with pytest.raises(ServerError, match="changed its reward"):
        RewardFnForm("correct", "sha256:other", needs_reference=True).scores(items, reply)


@pytest.mark.unit
def test_reward_fn_sends_conversations_whole_and_the_assistant_content():
    prompt = [{"role": "system", "content": "be right"}, {"role": "user", "content": PROMPT}]
    completion = [{"role": "assistant", "content": RIGHT}]
    [item] = RewardFnForm("orm", "sha256:o", needs_reference=False).items([prompt], [completion], TRL)
    assert item.prompt is None and [m.model_dump() for m in item.messages] == prompt and item.response == RIGHT
    with_tool = [{"role": "assistant", "content": "", "tool_calls": []}, {"role": "tool", "content": "3"}]
    [item] = RewardFnForm("orm", "sha256:o", needs_reference=False).items(
        [[*prompt, {"role": "user", "content": "go on", "name": "u"}]], [[*with_tool, *completion]], {}
    )
    assert item.messages[-1].content == "go on" and item.response == RIGHT  # role and text only; the last answer
    for bad_prompt, bad_completion, what in (
        ([{"role": "user", "content": [{"type": "image"}]}], RIGHT, r"prompt 0, message 0.*no text"),
        ([], RIGHT, r"prompt 0"),
        (PROMPT, [{"role": "user", "content": "hi"}], r"completion 0.*assistant"),
        ([{"role": "narrator", "content": "hi"}], RIGHT, r"row 0 does not make a score item.*role"),
    ):
        with pytest.raises(InvalidRequest, match=what):
            RewardFnForm("orm", "sha256:o", needs_reference=False).items([bad_prompt], [bad_completion], {})


@pytest.mark.unit
def test_reward_fn_other_columns_travel_as_json_safe_metadata():
    kw = {
        **TRL,
        "answer": ["1", "2"],
        "level": [2, 3],
        "tags": [["a"], {"k": [1.5, None]}],
        "score": [float("nan"), 0.5],  # NaN is no JSON
        "image": [object(), object()],  # nor is an object
        "batch_note": "not one per row",
    }
    items = NEEDS_REF.items(["a", "b"], ["x", "y"], kw)
    assert items[0].metadata == {"level": 2, "tags": ["a"]}
    assert items[1].metadata == {"level": 3, "tags": {"k": [1.5, None]}, "score": 0.5}
    with pytest.raises(InvalidRequest, match=r"2 prompts, 1 completions"):
        NEEDS_REF.items(["a", "b"], ["x"], kw)


@pytest.mark.unit
def test_per_loop_makes_one_client_per_event_loop_and_closes_those_it_can():
    made, closed = [], []

    def make():
        made.append(object())
        return made[-1]

    async def close(c):
        closed.append(c)

    clients = PerLoop(make, close)

    async def get():
        return clients.get()

    with LoopThread() as other:
        there = other.run(get())
        assert other.run(get()) is there  # the same loop: the same client
        with asyncio.Runner() as runner:
            here = runner.run(get())
            assert here is not there and runner.run(get()) is here
        # the runner's loop is closed: its client is forgotten, and a new loop gets a new one
        assert asyncio.run(get()) not in (here, there) and len(made) == 3
        asyncio.run(clients.close())  # closes the client of the loop still running, on that loop
    assert closed == [there]


def test_async_reward_fn_works_on_another_event_loop_than_the_one_it_was_made_on(server):
    """TRL awaits async reward functions on a loop of its own, on a thread of its own; the function
    is made before, as a rule with asyncio.run, whose loop is closed by then (issue 12)."""
    for client in (AsyncRewardClient.http(server.http_url), AsyncRewardClient.grpc(server.grpc_target)):
        fn = asyncio.run(client.as_reward_fn("format"))
        with LoopThread() as trl:
            assert trl.run(fn([PROMPT, PROMPT], [RIGHT, "no answer"]), timeout_s=60) == [1.0, 0.0]
            trl.run(client.close())
