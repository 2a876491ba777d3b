"""/metrics labels only names the server declares: client text never becomes a Prometheus label."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

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


def test_metrics_answer_openmetrics_when_asked_and_prometheus_text_otherwise(rules_server):
    """What a Prometheus server negotiates: OpenMetrics (parsed by the strict parser) on its Accept
    header, the text format without one, neither with the per-child `_created` gauges duplicated."""
    with httpx.Client(base_url=rules_server.http_url, timeout=60) as http:
        assert http.post("/v1/score", json={"reward": "exact", "items": [ITEM]}).status_code == 200
        text = http.get("/metrics")
        om = http.get("/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0,text/plain;q=0.5"})
    assert text.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "_created" not in text.text
    names = {s.name for f in text_string_to_metric_families(text.text) for s in f.samples}
    assert {"assay_rm_requests_total", "process_resident_memory_bytes", "python_info"} <= names
    assert om.headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
    families = {f.name: f for f in openmetrics_families(om.text)}
    assert {s.name for s in families["assay_rm_requests"].samples} == {
        "assay_rm_requests_total",
        "assay_rm_requests_created",
    }
    assert "process_open_fds" in families
    assert "assay_rm_reward_value" in families  # negative buckets: no _sum, so no _count either
