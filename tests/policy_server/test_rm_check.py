"""A policy server whose --rm-url does not answer starts anyway, warns, and says so on /ready.

Real servers on loopback: the policy server (the embedded policy alone) with `--rm-url` at a free
port nobody listens on, then a reward server (rules only) started on that port. Promised (README,
"Operating the services"): a WARNING naming the URL and what went wrong; `/ready` 200 with
`dependencies.rm` `degraded`, turning `ok` once the reward service answers, re-checked in the
background; a wrong key at the reward service is degraded too.
"""

from __future__ import annotations

import logging

import httpx
import pytest

from assay.checkpoints import EMBEDDED
from assay.policy_server.config import ServerConfig
from assay.policy_server.protocol import HealthResponse
from assay.policy_server.server import BackgroundServer
from assay.rm_server.config import ServerConfig as RewardConfig
from assay.rm_server.server import BackgroundServer as RewardServer
from assay.services import free_port
from tests.helpers import wait_for

pytestmark = pytest.mark.e2e

RIGHT = "r" * 32
RULES = 'rewards:\n  format: {type: rule.regex, pattern: "#### -?\\\\d+$"}\n'


def _ready(url: str) -> tuple[int, HealthResponse]:
    r = httpx.get(f"{url}/ready", timeout=30)
    return r.status_code, HealthResponse.model_validate_json(r.content)


def _policy(rm_url: str, **kw) -> BackgroundServer:
    config = ServerConfig(
        port=0, models={"policy": EMBEDDED["policy"][1]}, rm_url=rm_url, rm_check_interval_s=0.2, **kw
    )
    return BackgroundServer(config)


def test_an_rm_url_that_does_not_answer_warns_reports_degraded_and_turns_ok_when_it_comes_up(tmp_path, caplog):
    spec = tmp_path / "rules.yaml"
    spec.write_text(RULES)
    port = free_port()
    rm_url = f"http://127.0.0.1:{port}"
    with caplog.at_level(logging.WARNING, logger="assay.policy_server.rm_check"), _policy(rm_url) as policy:
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and rm_url in warnings[0] and "starting anyway" in warnings[0], warnings
        assert _ready(policy.http_url) == (200, HealthResponse(status="ok", dependencies={"rm": "degraded"}))
        # generation does not need the reward service
        r = httpx.post(
            f"{policy.http_url}/v1/completions",
            json={"model": "policy", "prompt": "Q: 1+1 A: ", "max_tokens": 4},
            timeout=60,
        )
        assert r.status_code == 200, r.text

        with RewardServer(RewardConfig(spec=spec, port=port, grpc_port=None)):
            wait_for(
                lambda: _ready(policy.http_url)[1].dependencies == {"rm": "ok"},
                timeout_s=60,
                what="/ready did not report the reward service ok once it answered",
            )
            assert _ready(policy.http_url)[0] == 200
        wait_for(
            lambda: _ready(policy.http_url)[1].dependencies == {"rm": "degraded"},
            timeout_s=60,
            what="/ready did not report the reward service degraded once it stopped",
        )


def test_a_key_the_reward_service_refuses_is_degraded_with_the_reason_in_the_warning(tmp_path, caplog):
    spec = tmp_path / "rules.yaml"
    spec.write_text(RULES)
    with RewardServer(RewardConfig(spec=spec, port=0, grpc_port=None, api_keys=(f"{RIGHT}:score",))) as rm:
        with (
            caplog.at_level(logging.WARNING, logger="assay.policy_server.rm_check"),
            _policy(rm.http_url, rm_api_key="w" * 32) as policy,
        ):
            assert _ready(policy.http_url)[1].dependencies == {"rm": "degraded"}
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any(rm.http_url in w and "401" in w for w in warnings), warnings
        with _policy(rm.http_url, rm_api_key=RIGHT) as policy:
            assert _ready(policy.http_url)[1].dependencies == {"rm": "ok"}
