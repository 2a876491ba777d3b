"""RemoteScorer against the real reward service on loopback, with the embedded ORM and PRM."""

from __future__ import annotations

import pytest

from assay.arith import world
from assay.checkpoints import ARITH_DIR
from assay.clients.reward import RewardClient
from assay.rm_server.config import ServerConfig
from assay.rm_server.server import BackgroundServer
from assay.search import STRATEGIES, SearchConfig
from assay.search.local import LocalGenerator, LocalScorer
from assay.search.remote import RemoteScorer

pytestmark = pytest.mark.service

SPEC = f"""
rewards:
  orm: {{type: model.outcome, path: {ARITH_DIR / "orm"}, activation: sigmoid, max_tokens: 64}}
  prm: {{type: model.process, path: {ARITH_DIR / "prm"}, steps: arith, aggregate: min, max_tokens: 64}}
  orm_chat: {{type: model.outcome, path: {ARITH_DIR / "orm"}, chat_template: true, max_tokens: 128}}
"""
PROBLEM = world.eval_problems(1)[0]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    spec = tmp_path_factory.mktemp("spec") / "rewards.yaml"
    spec.write_text(SPEC)
    with (
        BackgroundServer(ServerConfig(spec=spec, port=0, grpc_port=None)) as server,
        RewardClient.http(server.http_url) as c,
    ):
        yield c


def test_remote_scores_match_the_in_process_ones(client):
    p = PROBLEM
    items = [(p.prompt, p.solution), (p.prompt, p.solution.replace("=", "x", 1))]
    for kind in ("orm", "prm"):
        remote, reward_id = RemoteScorer(client, kind).score(items, "steps")
        local, _ = LocalScorer.embedded(kind).score(items, "steps")
        assert reward_id == client.reward_id(kind)
        assert [s.value for s in remote] == pytest.approx([s.value for s in local], abs=1e-4)
        if kind == "prm":
            assert remote[0].steps == pytest.approx(local[0].steps, abs=1e-4)
        else:  # an outcome reward asked for steps answers its outcome score
            assert remote[0].steps is None


def test_a_failed_item_is_none_with_the_servers_reason(client):
    scores, _ = RemoteScorer(client, "prm").score([(PROBLEM.prompt, "")], "steps")
    assert scores[0].value is None and scores[0].error.startswith("invalid_input")


def test_search_through_the_service_reports_its_reward_id(client):
    generator = LocalGenerator.embedded()
    config = SearchConfig(n=4, seed=3)
    remote = STRATEGIES["weighted_best_of_n"](PROBLEM.prompt, generator, RemoteScorer(client, "orm"), config)
    local = STRATEGIES["weighted_best_of_n"](PROBLEM.prompt, generator, LocalScorer.embedded("orm"), config)
    assert remote.reward_id == client.reward_id("orm")
    assert remote.answer == local.answer and [c.text for c in remote.candidates] == [c.text for c in local.candidates]
    assert remote.usage.reward_calls == 1 and remote.usage.scored_items == 4


def test_with_messages_the_reward_is_sent_the_conversation(client):
    """The items' prompt is the policy's rendering; the reward gets the conversation in its place."""
    messages = [{"role": "user", "content": PROBLEM.prompt.removeprefix("Q: ").removesuffix(" A: ")}]
    right, wrong = PROBLEM.solution, PROBLEM.solution.replace("=", "x", 1)
    rendered = "<rendered by the policy's template>"  # not what the reward reads: it renders the messages itself
    scores, reward_id = RemoteScorer(client, "orm_chat", messages=messages).score(
        [(rendered, right), (rendered, wrong)]
    )
    direct = client.score("orm_chat", [{"messages": messages, "response": r} for r in (right, wrong)])
    assert reward_id == direct.reward_id
    assert [s.value for s in scores] == pytest.approx([r.score for r in direct.results], abs=1e-6)
    as_text = client.score("orm_chat", [{"prompt": rendered, "response": r} for r in (right, wrong)])
    assert [s.value for s in scores] != pytest.approx([r.score for r in as_text.results], abs=1e-3)

    # a reward that reads text through its `template` cannot take a conversation: each item fails, saying why
    failed, _ = RemoteScorer(client, "orm", messages=messages).score([(rendered, right)])
    assert failed[0].value is None and "chat_template" in failed[0].error
