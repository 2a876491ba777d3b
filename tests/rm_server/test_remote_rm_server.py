"""Remote rewards against a real server: rm_server's own vLLM `/classify` and OpenRLHF routes.

Two real reward services on loopback: `origin` serves the embedded ORM and rules locally (and,
through `rm_server/compat.py`, speaks vLLM's pooling and OpenRLHF's protocols); `front` serves
`remote.*` rewards pointing at `origin`. What `front` says must be what `origin` says of the same
items through its own `/v1/score`: the same scores to 1e-6 (`use_activation` mapped to the local
`activation`), the same failures, typed.
"""

from __future__ import annotations

import httpx
import pytest

from assay.checkpoints import ARITH_DIR
from assay.rm_server.config import ServerConfig
from assay.rm_server.protocol import ErrorType, RewardsResponse, ScoreResponse
from assay.rm_server.server import BackgroundServer

pytestmark = pytest.mark.service

PROMPT = "Q: 23+45-17 A: "
RESPONSES = ["23+45=68 68-17=51 #### 51", "23+45=68 68-17=52 #### 52", "23+45=6q 68-17=51 #### 51", "#### 7"]
ORM = ARITH_DIR / "orm"


@pytest.fixture(scope="module")
def origin(tmp_path_factory):
    spec = tmp_path_factory.mktemp("origin") / "rewards.yaml"
    spec.write_text(
        "rewards:\n"
        '  correct: {type: rule.math_equal, answer_pattern: "####\\\\s*(-?\\\\d+)\\\\s*$"}\n'
        f"  orm: {{type: model.outcome, path: {ORM}, activation: sigmoid, max_tokens: 64}}\n"
        f"  orm_logit: {{type: model.outcome, path: {ORM}, max_tokens: 64}}\n"
        f"  orm_chat: {{type: model.outcome, path: {ORM}, activation: sigmoid, chat_template: true, max_tokens: 64}}\n"
        "  final: {type: composite, expr: '0.8*correct + 0.2*orm'}\n"
    )
    with BackgroundServer(ServerConfig(spec=spec, port=0, grpc_port=None)) as s:
        yield s


@pytest.fixture(scope="module")
def front(origin, tmp_path_factory):
    url = origin.http_url
    spec = tmp_path_factory.mktemp("front") / "rewards.yaml"
    spec.write_text(
        "rewards:\n"
        f"  orm: {{type: remote.vllm_classify, url: '{url}', model: orm, use_activation: true}}\n"
        f"  orm_logit: {{type: remote.vllm_classify, url: '{url}', model: orm, use_activation: false}}\n"
        f"  orm_chat: {{type: remote.vllm_classify, url: '{url}', model: orm_chat, chat_template: true}}\n"
        f"  correct: {{type: remote.openrlhf, url: '{url}/compat/openrlhf/correct'}}\n"
        f"  orm_openrlhf: {{type: remote.openrlhf, url: '{url}/compat/openrlhf/orm'}}\n"
        f"  missing: {{type: remote.vllm_classify, url: '{url}', model: no_such_reward}}\n"
        "  final: {type: composite, expr: '0.8*correct + 0.2*orm'}\n"
    )
    with BackgroundServer(ServerConfig(spec=spec, port=0, grpc_port=None)) as s:
        yield s


def score(url: str, reward: str, items: list[dict]) -> ScoreResponse:
    r = httpx.post(f"{url}/v1/score", json={"reward": reward, "items": items}, timeout=120)
    assert r.status_code == 200, r.text
    return ScoreResponse.model_validate_json(r.content)


def text_items(reference: str = "51") -> list[dict]:
    return [{"id": f"i{k}", "prompt": PROMPT, "response": r, "reference": reference} for k, r in enumerate(RESPONSES)]


def values(resp: ScoreResponse) -> list[float]:
    assert all(x.error is None and x.score is not None for x in resp.results), resp.results
    return [x.score for x in resp.results if x.score is not None]


@pytest.mark.parametrize(
    ("reward", "local"),
    [("orm", "orm"), ("orm_logit", "orm_logit"), ("orm_openrlhf", "orm"), ("correct", "correct"), ("final", "final")],
)
def test_a_remote_reward_scores_what_the_local_reward_scores(origin, front, reward, local):
    """vllm_classify with use_activation true is the local activation: sigmoid, false the logit;
    OpenRLHF's route gives the reward's own score; a composite over remote parts is the local one."""
    remote = values(score(front.http_url, reward, text_items()))
    here = values(score(origin.http_url, local, text_items()))
    assert remote == pytest.approx(here, abs=1e-6)
    assert len(set(here)) > 1  # the items tell right from wrong: equality is not a constant's


def test_a_conversation_goes_as_messages_and_is_rendered_by_the_remote_models_template(origin, front):
    items = [
        {"id": f"c{k}", "messages": [{"role": "user", "content": "23+45-17"}], "response": r}
        for k, r in enumerate(RESPONSES)
    ]
    remote = values(score(front.http_url, "orm_chat", items))
    assert remote == pytest.approx(values(score(origin.http_url, "orm_chat", items)), abs=1e-6)


def test_a_remote_that_refuses_the_input_fails_typed_never_a_score(front):
    resp = score(front.http_url, "missing", text_items()[:2])  # origin answers 404 for the unknown reward
    for x in resp.results:
        assert x.score is None and x.error is not None and x.error.type == ErrorType.remote_error
        assert "404" in x.error.message and "no_such_reward" in x.error.message
    # a reference the rule needs: without it the OpenRLHF route says 400 for the batch
    no_reference = [{"id": "a", "prompt": PROMPT, "response": RESPONSES[0]}]
    [x] = score(front.http_url, "correct", no_reference).results
    assert x.score is None and x.error is not None and x.error.type == ErrorType.remote_error


def test_remote_ids_name_the_server_and_are_not_pinned(origin, front):
    listing = RewardsResponse.model_validate_json(httpx.get(f"{front.http_url}/v1/rewards").content)
    remote = {r.name: r for r in listing.rewards}
    assert not any(r.pinned for r in remote.values())
    assert {r.type for r in remote.values()} == {"remote.vllm_classify", "remote.openrlhf", "composite"}
    local = RewardsResponse.model_validate_json(httpx.get(f"{origin.http_url}/v1/rewards").content)
    assert all(r.pinned for r in local.rewards)
    assert {r.reward_id for r in local.rewards}.isdisjoint(r.reward_id for r in remote.values())
