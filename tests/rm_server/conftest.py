"""Fixtures for the reward service: the judge double, a full spec, a real server on loopback."""

from __future__ import annotations

from pathlib import Path

import pytest

from assay.checkpoints import ARITH_DIR
from assay.rm_server.config import ServerConfig
from assay.rm_server.server import BackgroundServer
from tests.rm_server.judge_double import serve_judge_double


def full_spec(judge_url: str) -> str:
    """Every reward type, on the embedded checkpoints, with the judge at `judge_url`."""
    return f"""
rewards:
  correct: {{type: rule.math_equal, answer_pattern: "####\\\\s*(-?\\\\d+)\\\\s*$"}}
  exact:   {{type: rule.exact_match, answer_pattern: "####\\\\s*(-?\\\\d+)\\\\s*$"}}
  format:  {{type: rule.regex, pattern: "^(-?\\\\d+[+-]\\\\d+=-?\\\\d+ )*#### -?\\\\d+$", mode: fullmatch}}
  short:   {{type: rule.length_penalty, max_length: 30, buffer: 10}}
  json:    {{type: rule.json_schema, schema: {{type: object, required: [answer]}}}}
  steps:   {{type: rule.arith_steps}}
  orm:     {{type: model.outcome, path: {ARITH_DIR / "orm"}, activation: sigmoid, max_tokens: 64}}
  prm:     {{type: model.process, path: {ARITH_DIR / "prm"}, steps: arith, aggregate: min, max_tokens: 64}}
  judge:   {{type: judge, endpoint: "{judge_url}", model: verifier, mode: yes_prob}}
  down:    {{type: judge, endpoint: "http://127.0.0.1:9/v1", model: verifier, timeout_s: 2}}
  final:   {{type: composite, expr: "0.8*correct + 0.2*orm", gate: format}}
  either:  {{type: composite, expr: "max(orm, down)"}}
"""


@pytest.fixture(scope="session")
def judge_url():
    with serve_judge_double() as url:
        yield url


@pytest.fixture(scope="session")
def spec_path(judge_url, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("spec") / "rewards.yaml"
    path.write_text(full_spec(judge_url))
    return path


@pytest.fixture(scope="session")
def server(spec_path):
    """The real reward service (HTTP and gRPC) on loopback, serving every reward type."""
    with BackgroundServer(ServerConfig(spec=spec_path, port=0, grpc_port=None)) as s:
        yield s
