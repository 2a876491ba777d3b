"""Schemathesis against both services' OpenAPI schemas, over real HTTP on loopback: 0 failures.

Each operation gets a bounded, derandomized run (fixed examples, no deadline, so it is the same
run on a loaded machine), positive and negative cases, checked for no 5xx and for answers that
match the schema: status codes, content types and bodies as documented. The servers are the
keyless loopback defaults (what a fuzzer on the same machine meets), with small generation limits
so a fuzzed completion stays cheap, and the policy server's searches scored by the reward server.

The weights routes are fuzzed too: random bytes must be refused with 400, never 500 (they are
never a safetensors file that fits the model), and `weights/load` reads only inside its
`--weights-dir`, here an empty folder, so a fuzzer's random paths are all refused alike.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from assay.checkpoints import ARITH_DIR, EMBEDDED
from assay.policy_server.config import BatchSettings
from assay.policy_server.config import Limits as PolicyLimits
from assay.policy_server.config import ServerConfig as PolicyConfig
from assay.policy_server.protocol import (
    NO_REWARD_STRATEGIES,
    SEARCH_STRATEGIES,
    ChatCompletionRequest,
    CompletionRequest,
    SearchRequest,
)
from assay.policy_server.server import BackgroundServer as PolicyBackground
from assay.rm_server.config import ServerConfig as RewardConfig
from assay.rm_server.protocol import CompareRequest, ScoreRequest
from assay.rm_server.server import BackgroundServer as RewardBackground

pytestmark = [pytest.mark.reliability, pytest.mark.service]

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
# Bounded and repeatable: ~16 operations x 25 examples in about a minute on two busy cores.
FUZZ = settings(
    max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)

SPEC = f"""
rewards:
  correct: {{type: rule.math_equal, answer_pattern: "####\\\\s*(-?\\\\d+)\\\\s*$"}}
  format:  {{type: rule.regex, pattern: "^(-?\\\\d+[+-]\\\\d+=-?\\\\d+ )*#### -?\\\\d+$", mode: fullmatch}}
  steps:   {{type: rule.arith_steps}}
  orm:     {{type: model.outcome, path: {ARITH_DIR / "orm"}, activation: sigmoid, max_tokens: 64}}
  final:   {{type: composite, expr: "0.8*correct + 0.2*orm", gate: format}}
"""


@pytest.fixture(scope="module")
def rm(tmp_path_factory):
    spec = tmp_path_factory.mktemp("fuzz") / "rewards.yaml"
    spec.write_text(SPEC)
    with RewardBackground(RewardConfig(spec=spec, port=0, grpc_port=None)) as s:
        yield s


@pytest.fixture(scope="module")
def policy(rm, tmp_path_factory):
    limits = PolicyLimits(
        max_n=4,
        max_prompts=4,
        max_sequences=8,
        max_tokens=8,
        timeout_s=60,
        max_searches=2,
        max_search_candidates=4,
        max_search_tokens=16,
    )
    config = PolicyConfig(
        models={"policy": EMBEDDED["policy"][1]},
        port=0,
        limits=limits,
        rm_url=rm.http_url,
        batching=BatchSettings(max_sequences=4, max_queue=16),
        rm_max_retries=0,
        weights_dirs=(tmp_path_factory.mktemp("weights"),),
    )
    with PolicyBackground(config) as s:
        yield s


def served_names(cases: st.SearchStrategy, names: dict[str, list[str]]) -> st.SearchStrategy:
    """`cases` where a `model` or `reward` (body or query) often names what the server serves: a random
    name stops at the look-up's 404, and the fuzzing would never reach what lies behind it."""

    @st.composite
    def named(draw):
        case = draw(cases)
        for fields in (case.body, case.query):
            if not isinstance(fields, dict):
                continue
            for field, served in names.items():
                if isinstance(fields.get(field), str) and draw(st.booleans()):
                    fields[field] = draw(st.sampled_from(served))
        return case

    return named()


def fuzz(schema, names: dict[str, list[str]]) -> list[str]:
    """Run every operation of `schema` under FUZZ; what failed, per operation (none: [])."""
    failed = []
    for result in schema.get_all_operations():
        operation = result.ok()
        cases = st.one_of(
            served_names(operation.as_strategy(schemathesis.GenerationMode.POSITIVE), names),
            operation.as_strategy(schemathesis.GenerationMode.NEGATIVE),
        )

        @FUZZ
        @given(case=cases)
        def run(case):
            case.call_and_validate(checks=CHECKS, timeout=60)

        try:
            run()
        # A check's failures, with the request that reproduces them: whatever failed, report it and fuzz on.
        except (Exception, FailureGroup) as exc:  # noqa: BLE001
            failed.append(f"{operation.label}: {exc}")
    return failed


def reward_names(rm) -> list[str]:
    return [r["name"] for r in httpx.get(f"{rm.http_url}/v1/rewards").json()["rewards"]]


# schemathesis' own pytest plugin (`schemathesis.pytest.from_fixture`) does not run on pytest 9 yet
# (it reads the node's `_nodeid`), so the operations are driven with hypothesis directly.
def test_the_reward_service_answers_every_fuzzed_request_as_documented(rm):
    schema = schemathesis.openapi.from_url(f"{rm.http_url}/openapi.json")
    assert fuzz(schema, {"reward": reward_names(rm)}) == []


@pytest.mark.e2e
def test_the_policy_service_answers_every_fuzzed_request_as_documented(rm, policy):
    schema = schemathesis.openapi.from_url(f"{policy.http_url}/openapi.json")
    names = {"model": ["policy"], "reward": reward_names(rm)}
    assert fuzz(schema, names) == []


# --- the schemas state what the code enforces (defect 9) -------------------------------------


@pytest.mark.unit
def test_the_schemas_state_the_rules_serving_enforces():
    for request in (ScoreRequest, CompareRequest):
        assert request.model_json_schema()["properties"]["items"]["minItems"] == 1
    prompt = CompletionRequest.model_json_schema()["properties"]["prompt"]["anyOf"]
    assert all(p.get("minLength") == 1 or p.get("minItems") == 1 for p in prompt)
    for request in (CompletionRequest, ChatCompletionRequest):
        assert {"properties": {"stream": {"const": True}}, "required": ["stream"]} in [
            rule.get("then") for rule in request.model_json_schema()["allOf"]
        ]  # stream_options needs stream=true
    search = SearchRequest.model_json_schema()
    assert search["properties"]["strategy"]["enum"] == list(SEARCH_STRATEGIES)
    assert search["if"]["properties"]["strategy"]["enum"] == list(NO_REWARD_STRATEGIES)
    assert search["else"]["required"] == ["reward"]


@pytest.mark.unit
def test_the_schemas_strategy_names_are_the_servers():
    from assay import search
    from assay.policy_server.serving_search import NO_REWARD

    assert set(SEARCH_STRATEGIES) == set(search.STRATEGIES)
    assert set(NO_REWARD_STRATEGIES) == NO_REWARD
