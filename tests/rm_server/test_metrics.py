"""/metrics labels only names the server declares: client text never becomes a Prometheus label."""

from __future__ import annotations

import httpx
import pytest

from assay.rm_server.config import ServerConfig
from assay.rm_server.server import BackgroundServer

pytestmark = pytest.mark.service

ITEM = {"id": "a", "prompt": "Q: 1+1 A: ", "response": "#### 2", "reference": "2"}
PAIR = {"id": "a", "prompt": "Q: 1+1 A: ", "response_a": "#### 2", "response_b": "#### 3", "reference": "2"}


@pytest.fixture(scope="module")
def rules_server(tmp_path_factory):
    spec = tmp_path_factory.mktemp("spec") / "rewards.yaml"
    spec.write_text('rewards:\n  exact: {type: rule.exact_match, answer_pattern: "####\\\\s*(\\\\d+)"}\n')
    with BackgroundServer(ServerConfig(spec=spec, port=0, grpc_port=None)) as s:
        yield s


def test_unknown_reward_names_share_one_label_and_never_reach_metrics(rules_server):
    url = rules_server.http_url
    with httpx.Client(base_url=url, timeout=60) as http:
        assert http.post("/v1/score", json={"reward": "exact", "items": [ITEM]}).status_code == 200
        before = http.get("/metrics").text
        names = [f"client-text-{k}" for k in range(200)] + ["client-text-" + "x" * (1 << 20)]
        for name in names:
            for route, item in (("/v1/score", ITEM), ("/v1/compare", PAIR)):
                assert http.post(route, json={"reward": name, "items": [item]}).status_code == 404
        after = http.get("/metrics").text
    assert "client-text" not in after
    assert 'assay_rm_requests_total{code="404",reward="(unknown)",route="/v1/score"} 201.0' in after
    assert 'assay_rm_requests_total{code="200",reward="exact",route="/v1/score"} 1.0' in after
    # a fixed handful of new series (404 counters and latency histograms), not one per name
    assert len(after) < len(before) + 10_000, (len(before), len(after))
