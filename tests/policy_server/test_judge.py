"""rm_server's judge reward asks the policy server's `verifier`: scores equal the in-process verifier."""

from __future__ import annotations

import httpx
import pytest

from assay.arith.verifier import verifier_prompt
from assay.rm_server.config import ServerConfig as RewardConfig
from assay.rm_server.protocol import ScoreResponse
from assay.rm_server.server import BackgroundServer as RewardBackgroundServer
from assay.scoring import verifier_yes_prob

pytestmark = pytest.mark.e2e

PROBLEM = "23+45-17"
RESPONSES = ["23+45=68 68-17=51 #### 51", "23+45=68 68-17=52 #### 52", "23+45=68 68-1", "#### 51"]


@pytest.fixture(scope="module")
def reward_server(server, tmp_path_factory):
    spec = tmp_path_factory.mktemp("spec") / "rewards.yaml"
    judge = f'{{type: judge, endpoint: "{server.http_url}/v1", model: verifier, mode: yes_prob}}'
    spec.write_text(f"rewards:\n  judge: {judge}\n")
    with RewardBackgroundServer(RewardConfig(spec=spec, port=0, grpc_port=None)) as s:
        yield s


def test_judge_scores_equal_the_in_process_verifier(reward_server, verifier):
    items = [{"id": f"r{i}", "prompt": f"Q: {PROBLEM} A: ", "response": r} for i, r in enumerate(RESPONSES)]
    r = httpx.post(f"{reward_server.http_url}/v1/score", json={"reward": "judge", "items": items}, timeout=60)
    assert r.status_code == 200, r.text
    results = ScoreResponse.model_validate_json(r.content).results
    assert all(x.error is None for x in results), results
    model, tok = verifier
    expected = verifier_yes_prob(model, tok, [verifier_prompt(PROBLEM, resp) for resp in RESPONSES])
    assert [x.score for x in results] == pytest.approx(expected, abs=1e-4)
    assert results[0].score > results[2].score  # a finished solution above a broken one
