"""Items whose prompt is a conversation (`messages`) and items with `metadata`, over HTTP and gRPC.

A model reward with `chat_template: true` renders the conversation with its own tokenizer's
template, so its score equals the score of the text that template renders; a model reward without
one fails those items `invalid_input` and scores the rest. `metadata` and the messages reach a
reward exactly as sent, over both protocols.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc
import httpx
import pytest

from assay.base.auth import ApiKeys
from assay.checkpoints import ARITH_DIR
from assay.proto.reward.v1 import reward_pb2 as pb
from assay.proto.reward.v1 import reward_pb2_grpc
from assay.rm_server import grpc_convert as convert
from assay.rm_server.config import Limits, ServerConfig
from assay.rm_server.grpc_api import start_grpc_server
from assay.rm_server.http_api import create_app
from assay.rm_server.protocol import (
    CompareResponse,
    ErrorResponse,
    ErrorType,
    Granularity,
    ScoreItem,
    ScoreRequest,
    ScoreResponse,
)
from assay.rm_server.rewards import Item, Outcome, Reward, Scored
from assay.rm_server.server import BackgroundServer
from assay.rm_server.serving import RewardService
from tests.helpers import LoopThread, grpc_served
from tests.rm_server.judge_double import serve

pytestmark = pytest.mark.service

QUESTION = "23+45-17"
RIGHT = "23+45=68 68-17=51 #### 51"
WRONG = "23+45=68 68-17=52 #### 52"
CONVERSATION = [{"role": "system", "content": "Show your work."}, {"role": "user", "content": QUESTION}]

# The embedded checkpoints' tokenizer has a chat template: `<s>Q: {user} A: {assistant}</s>`
# (system turns are left out). `plain` spells the same text as a template; `orm` reads text only.
SPEC = f"""
rewards:
  chat:     {{type: model.outcome, path: {ARITH_DIR / "orm"}, chat_template: true}}
  plain:    {{type: model.outcome, path: {ARITH_DIR / "orm"}, template: "Q: {{prompt}} A: {{response}}</s>"}}
  orm:      {{type: model.outcome, path: {ARITH_DIR / "orm"}, max_tokens: 64}}
  prm_chat: {{type: model.process, path: {ARITH_DIR / "prm"}, steps: arith, chat_template: true}}
  prm:      {{type: model.process, path: {ARITH_DIR / "prm"}, steps: arith}}
  steps:    {{type: rule.arith_steps}}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    spec = tmp_path_factory.mktemp("messages") / "rewards.yaml"
    spec.write_text(SPEC)
    with BackgroundServer(ServerConfig(spec=spec, port=0, grpc_port=0)) as s:
        yield s


def post(url: str, route: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}{route}", json=body, timeout=60)


def scored(url: str, reward: str, items: list[dict], granularity: str = "outcome") -> ScoreResponse:
    r = post(url, "/v1/score", {"reward": reward, "items": items, "granularity": granularity})
    assert r.status_code == 200, r.text
    return ScoreResponse.model_validate_json(r.content)


# --- model rewards: the conversation through the reward model's own template ------------------


def test_a_chat_template_reward_scores_a_conversation_as_its_own_template_renders_it(server):
    url = server.http_url
    as_chat = scored(url, "chat", [{"id": "m", "messages": CONVERSATION, "response": RIGHT}]).results[0]
    as_text = scored(url, "chat", [{"id": "t", "prompt": QUESTION, "response": RIGHT}]).results[0]
    rendered = scored(url, "plain", [{"id": "p", "prompt": QUESTION, "response": RIGHT}]).results[0]
    assert as_chat.error is None and as_chat.score is not None
    assert as_chat.score == as_text.score == rendered.score
    # the response's tokens only, as for a text prompt
    tokens = scored(url, "chat", [{"id": "m", "messages": CONVERSATION, "response": RIGHT}], "tokens")
    assert "".join(t.text for t in tokens.results[0].tokens or []) == RIGHT


def test_a_reward_without_a_chat_template_fails_conversation_items_and_scores_the_rest(server):
    items = [
        {"id": "text", "prompt": f"Q: {QUESTION} A: ", "response": RIGHT},
        {"id": "conv", "messages": CONVERSATION, "response": RIGHT},
    ]
    for reward in ("orm", "prm"):
        text, conv = scored(server.http_url, reward, items).results
        assert text.error is None and text.score is not None
        assert conv.score is None and conv.error is not None
        assert conv.error.type == ErrorType.invalid_input
        assert "chat template" in conv.error.message and "`prompt`" in conv.error.message


def test_a_process_reward_with_a_chat_template_scores_the_steps_of_a_conversation(server):
    url = server.http_url
    as_chat = scored(url, "prm_chat", [{"id": "m", "messages": CONVERSATION, "response": WRONG}], "steps")
    as_text = scored(url, "prm", [{"id": "t", "prompt": f"Q: {QUESTION} A: ", "response": WRONG}], "steps")
    assert as_chat.results[0].steps == as_text.results[0].steps
    assert len(as_chat.results[0].steps or []) == 3


def test_the_arithmetic_steps_rule_reads_the_question_from_the_last_user_turn(server):
    result = scored(server.http_url, "steps", [{"id": "m", "messages": CONVERSATION, "response": WRONG}], "steps")
    assert (result.results[0].score, result.results[0].steps) == (0.0, [1.0, 0.0, 0.0])


def test_compare_takes_a_conversation(server):
    item = {"id": "c", "messages": CONVERSATION, "response_a": RIGHT, "response_b": WRONG}
    r = post(server.http_url, "/v1/compare", {"reward": "chat", "items": [item]})
    assert r.status_code == 200, r.text
    text = {"id": "c", "prompt": QUESTION, "response_a": RIGHT, "response_b": WRONG}
    by_text = post(server.http_url, "/v1/compare", {"reward": "chat", "items": [text]})
    conv, plain = (CompareResponse.model_validate_json(x.content).results[0] for x in (r, by_text))
    assert conv.prob_a == plain.prob_a and conv.scores == plain.scores


def test_grpc_scores_a_conversation_as_http_does(server):
    req = ScoreRequest(
        reward="chat",
        items=[
            ScoreItem(id="m", messages=CONVERSATION, response=RIGHT, metadata={"level": 2}),
            ScoreItem(id="t", prompt=QUESTION, response=WRONG),
        ],
    )
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        reply = convert.score_response_from_proto(stub.Score(convert.score_request_to_proto(req), timeout=60))
    over_http = scored(server.http_url, "chat", [i.model_dump(exclude_none=True) for i in req.items])
    assert reply == over_http
    assert all(r.score is not None for r in reply.results)


# --- exactly one of prompt and messages ------------------------------------------------------


@pytest.mark.parametrize(
    "item",
    [
        {"id": "x", "response": RIGHT},
        {"id": "x", "prompt": QUESTION, "messages": CONVERSATION, "response": RIGHT},
    ],
    ids=["neither", "both"],
)
def test_an_item_needs_exactly_one_of_prompt_and_messages(server, item):
    for route, body in (
        ("/v1/score", {"reward": "chat", "items": [item]}),
        ("/v1/compare", {"reward": "chat", "items": [{**item, "response_a": "a", "response_b": "b"}]}),
    ):
        if route == "/v1/compare":
            body["items"][0].pop("response")
        r = post(server.http_url, route, body)
        assert r.status_code == 400, r.text
        error = ErrorResponse.model_validate_json(r.content).error
        assert error.type == ErrorType.invalid_request
        assert "items.0" in error.message and "`prompt`" in error.message and "`messages`" in error.message


def test_malformed_conversations_and_metadata_are_refused_with_400(server):
    bad = [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "narrator", "content": "x"}]}, "role"),
        ({"messages": [{"role": "user"}]}, "content"),
        ({"prompt": QUESTION, "metadata": [1, 2]}, "metadata"),
    ]
    for fields, where in bad:
        r = post(server.http_url, "/v1/score", {"reward": "chat", "items": [{"id": "x", "response": RIGHT, **fields}]})
        assert r.status_code == 400, r.text
        assert where in ErrorResponse.model_validate_json(r.content).error.message


def test_grpc_refuses_items_without_a_prompt_and_metadata_that_is_no_json_object(server):
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        for item, says in (
            (pb.ScoreItem(id="x", response=RIGHT), "`messages`"),
            (pb.ScoreItem(id="x", prompt=QUESTION, response=RIGHT, metadata_json="{'a': 1}"), "not JSON"),
            (pb.ScoreItem(id="x", prompt=QUESTION, response=RIGHT, metadata_json="[1]"), "not an object"),
        ):
            with pytest.raises(grpc.RpcError) as info:
                stub.Score(pb.ScoreRequest(reward="chat", items=[item]), timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert says in (info.value.details() or "")


def test_messages_and_metadata_count_toward_the_item_size_limit():
    service = RewardService({"seen": Seen("seen", "sha256:seen")}, Limits(max_item_chars=100))
    asyncio.run(service.start())
    long_turns = [{"role": "user", "content": "x" * 61}, {"role": "assistant", "content": "y" * 30}]
    with serve(create_app(service)) as url:
        for fields in ({"messages": long_turns}, {"prompt": "p", "metadata": {"notes": "z" * 90}}):
            r = post(url, "/v1/score", {"reward": "seen", "items": [{"id": "x", "response": "r" * 10, **fields}]})
            assert r.status_code == 400 and "more than the limit of 100" in r.text, r.text


# --- what reaches the reward -----------------------------------------------------------------


class Seen(Reward):
    """A test reward that keeps the items it is given and scores each by its metadata's `score`."""

    type = "test.seen"

    def __init__(self, name: str, reward_id: str) -> None:
        super().__init__(name, reward_id)
        self.items: list[Item] = []

    async def score(self, items: Sequence[Item], granularity: Granularity) -> list[Outcome]:
        self.items.extend(items)
        return [Scored(float((i.metadata or {}).get("score", 0))) for i in items]


METADATA = {"score": 3, "answer": "51", "level": 2, "tags": ["a", None, 1.5], "nested": {"ok": True}}


def test_a_conversation_and_metadata_reach_the_reward_exactly_as_sent_over_http_and_grpc():
    seen = Seen("seen", "sha256:seen")
    service = RewardService({"seen": seen})
    items = [
        ScoreItem(id="m", messages=CONVERSATION, response=RIGHT, reference="51", metadata=METADATA),
        ScoreItem(id="t", prompt="Q: 1+1 A: ", response="2", metadata={}),
        ScoreItem(id="n", prompt="", response=""),
    ]
    expected = [
        Item(CONVERSATION, RIGHT, "51", "m", METADATA),
        Item("Q: 1+1 A: ", "2", None, "t", {}),
        Item("", "", None, "n", None),
    ]
    req = ScoreRequest(reward="seen", items=items)
    with LoopThread() as loop:
        loop.run(service.start())
        with serve(create_app(service)) as url:
            r = post(url, "/v1/score", req.model_dump(mode="json", exclude_none=True))
            assert r.status_code == 200, r.text
            assert [x.score for x in ScoreResponse.model_validate_json(r.content).results] == [3.0, 0.0, 0.0]
        assert seen.items == expected
        seen.items.clear()
        with grpc_served(loop, start_grpc_server(service, ApiKeys(), "127.0.0.1", 0, Limits())) as channel:
            reply = reward_pb2_grpc.RewardServiceStub(channel).Score(convert.score_request_to_proto(req), timeout=30)
        assert [x.score for x in convert.score_response_from_proto(reply).results] == [3.0, 0.0, 0.0]
        assert seen.items == expected
        assert isinstance(seen.items[0].metadata["level"], int)  # JSON text keeps an int an int
