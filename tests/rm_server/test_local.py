"""The in-process transport: a RewardClient over it answers what the same client over HTTP gets
from the real service on loopback (scores, reward ids, typed refusals), and loads only what it serves."""

from __future__ import annotations

import pytest

from assay.clients import InvalidRequest, RewardClient, UnknownReward
from assay.rm_server.local import LocalTransport

pytestmark = pytest.mark.service

PROMPT = "Q: 23+45-17 A: "
RESPONSES = ["23+45=68 68-17=51 #### 51", "23+45=68 68-17=52 #### 52", "23+45=68 68-1"]  # right, wrong, no answer


def items(reference: str | None = "51") -> list[dict]:
    return [{"prompt": PROMPT, "response": r, "reference": reference} for r in RESPONSES]


@pytest.fixture(scope="module")
def local(spec_path):
    with RewardClient(LocalTransport(spec_path, rewards=["final"]), timeout_s=120) as client:
        yield client


@pytest.fixture
def remote(server):
    with RewardClient.http(server.http_url, timeout_s=120) as client:
        yield client


def test_it_serves_the_named_reward_and_its_parts_only_under_the_services_ids(local, remote):
    served = {r.name: r.reward_id for r in local.rewards().rewards}
    assert list(served) == ["correct", "format", "orm", "final"]  # no prm, judge, ...: never loaded
    by_server = {r.name: r.reward_id for r in remote.rewards().rewards}
    assert served == {name: by_server[name] for name in served}


def test_scores_are_the_services(local, remote):
    for reward, granularity in (("final", "outcome"), ("orm", "tokens"), ("correct", "outcome")):
        mine = local.score(reward, items(), granularity=granularity)
        theirs = remote.score(reward, items(), granularity=granularity)
        assert mine == theirs
    assert [r.score for r in mine.results[:2]] == [1.0, 0.0]  # correct: not vacuous
    fn = local.as_reward_fn("final")
    assert fn.reward_id == remote.reward_id("final")
    assert fn([PROMPT] * 3, RESPONSES, reference=["51"] * 3) == remote.as_reward_fn("final")(
        [PROMPT] * 3, RESPONSES, reference=["51"] * 3
    )


def test_refusals_are_the_clients_typed_errors(local):
    with pytest.raises(UnknownReward, match="unknown reward 'prm'"):
        local.score("prm", items())
    with pytest.raises(InvalidRequest, match="needs a `reference`"):
        local.score("correct", items(reference=None))


def test_a_reward_not_in_the_spec_is_refused_before_anything_loads():
    with pytest.raises(ValueError, match="no reward 'nope' in the spec"):
        LocalTransport(rewards=["format", "nope"])


def test_close_stops_the_service_once():
    transport = LocalTransport(rewards=["format"])
    assert transport.probe("ready", 1.0) and transport.probe("health", 1.0)
    transport.close()
    transport.close()
    assert not transport.probe("health", 1.0)
