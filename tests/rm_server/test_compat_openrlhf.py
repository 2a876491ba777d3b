"""OpenRLHF's and slime's reward protocols on rm_server, driven by the peers' own request code.

The clients are copied from upstream (tests/peers, each file names its commit): OpenRLHF 0.11.2's
`_fetch_rewards_via_http` (aiohttp, one call per sample), OpenRLHF's older `request_api_wrapper`
with its sharding over several URLs (empty shards included), and slime's `remote_rm`.
"""

from __future__ import annotations

import asyncio
import types
from pathlib import Path

import httpx
import pytest
import requests

from assay.checkpoints import ARITH_DIR
from assay.rm_server.compat_protocol import OpenRLHFResponse, SlimeResponse
from assay.rm_server.config import Compat, ModelRuntime, ServerConfig
from assay.rm_server.protocol import ErrorResponse, ErrorType
from assay.rm_server.server import BackgroundServer
from tests.peers import openrlhf_client, slime_rm_hub

pytestmark = pytest.mark.service

PROMPT = "Q: 23+45-17 A: "
RIGHT = "23+45=68 68-17=51 #### 51"
WRONG = "23+45=68 68-17=52 #### 52"


# A small spec for the servers of one test: rules, a judge nobody serves, the orm in this process.
SMALL_SPEC = f"""
rewards:
  correct: {{type: rule.exact_match, answer_pattern: "####\\\\s*(-?\\\\d+)\\\\s*$"}}
  down:    {{type: judge, endpoint: "http://127.0.0.1:9/v1", model: verifier, timeout_s: 2}}
  orm:     {{type: model.outcome, path: {ARITH_DIR / "orm"}, activation: sigmoid, max_tokens: 64}}
"""


@pytest.fixture(scope="module")
def small_spec(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("compat") / "rewards.yaml"
    path.write_text(SMALL_SPEC)
    return path


def _small(spec: Path, **config) -> BackgroundServer:
    return BackgroundServer(
        ServerConfig(spec=spec, port=0, grpc_port=None, models=ModelRuntime(model_workers=False), **config)
    )


def _v1_score(url: str, reward: str, response: str, reference: str | None = "51") -> float:
    items = [{"id": "a", "prompt": PROMPT, "response": response, "reference": reference}]
    r = httpx.post(f"{url}/v1/score", json={"reward": reward, "items": items}, timeout=60)
    assert r.status_code == 200, r.text
    score = r.json()["results"][0]["score"]
    assert score is not None
    return score


def test_openrlhf_client_one_call_per_sample_gets_the_scores_of_v1_score(server):
    """OpenRLHF 0.11.2's executor: query = prompt + response decoded with its special tokens (here
    the end of sequence and two pads); the route strips them and scores what /v1/score scores."""
    url = server.http_url
    executor = openrlhf_client.SingleTurnAgentExecutor(f"{url}/compat/openrlhf/orm")
    for response in (RIGHT, WRONG):
        query = PROMPT + response + "</s><pad><pad>"
        [info] = asyncio.run(executor._fetch_rewards_via_http([query], [PROMPT], ["51"]))
        out = OpenRLHFResponse.model_validate(info)
        assert out.rewards == out.scores == [pytest.approx(_v1_score(url, "orm", response))]
        assert out.extra_logs == {"assay_failed": [0.0]}
        assert out.reward_id.startswith("sha256:") and out.errors == [None]

    # labels are the references: the rule reward reads them
    rule = openrlhf_client.SingleTurnAgentExecutor(f"{url}/compat/openrlhf/correct")
    for label, reward in (("51", 1.0), ("52", 0.0)):
        [info] = asyncio.run(rule._fetch_rewards_via_http([PROMPT + RIGHT], [PROMPT], [label]))
        assert info["rewards"] == [reward]


def test_openrlhf_sharding_over_urls_sends_empty_shards_that_are_answered_empty(server):
    """OpenRLHF before 0.10 split a batch over every URL: a batch of one sends empty lists to the
    second URL, which must answer empty lists (with the same extra_logs keys, which it merges)."""
    url = f"{server.http_url}/compat/openrlhf/correct"
    client = openrlhf_client.OldShardingClient([url, url])
    first, second = client.get_rewards([PROMPT + RIGHT + "<|im_end|>"], [PROMPT], ["51"])
    assert first["rewards"] == [1.0] and first["extra_logs"] == {"assay_failed": [0.0]}
    assert second["rewards"] == second["scores"] == [] and second["extra_logs"] == {"assay_failed": []}
    assert second["reward_id"] == first["reward_id"]

    three = client.get_rewards([PROMPT + r for r in (RIGHT, WRONG, RIGHT)], [PROMPT] * 3, ["51"] * 3)
    assert [x for shard in three for x in shard["rewards"]] == [1.0, 0.0, 1.0]


def test_openrlhf_strip_tokens_are_the_servers_or_the_requests(server):
    url = f"{server.http_url}/compat/openrlhf/exact"
    body = {"query": ["<pad><s>" + PROMPT + RIGHT + "<|eot_id|>"], "prompts": [PROMPT], "labels": ["51"]}
    assert httpx.post(url, json=body, timeout=60).json()["rewards"] == [1.0]
    # a request's own list replaces the server's: `<|eot_id|>` then stays in the response
    r = httpx.post(url, params={"strip": ["<pad>", "<s>"]}, json=body, timeout=60)
    assert r.json()["rewards"] == [0.0]
    # a query that does not start with its prompt cannot be split: refused, naming it
    r = httpx.post(url, json={"query": ["Q: 1+1 A: 2"], "prompts": [PROMPT], "labels": ["2"]}, timeout=60)
    assert r.status_code == 400 and "query 0 does not start with its prompt" in r.text


def test_openrlhf_failed_item_is_a_retryable_503_never_a_number(server):
    """`down` is a judge nobody serves: its item fails `judge_unavailable`. OpenRLHF has no null
    reward, so the call fails (503, Retry-After) and OpenRLHF's client, having retried, raises."""
    url = f"{server.http_url}/compat/openrlhf/down"
    body = {"query": [PROMPT + RIGHT], "prompts": [PROMPT], "labels": ["51"]}
    r = httpx.post(url, json=body, timeout=60)
    assert r.status_code == 503 and r.headers["Retry-After"] == "1"
    error = ErrorResponse.model_validate_json(r.content).error
    assert error.type == ErrorType.judge_unavailable and error.message.startswith("item 0: ")
    with pytest.raises(Exception, match="Request error for 2 times"):
        openrlhf_client.request_api_wrapper(url, body, try_max_times=2)


def test_openrlhf_failed_reward_option_gives_that_value_flagged_in_extra_logs(small_spec):
    with _small(small_spec, compat=Compat(openrlhf_failed_reward=-1.0)) as s:
        body = {"query": [PROMPT + RIGHT], "prompts": [PROMPT], "labels": ["51"]}
        out = OpenRLHFResponse.model_validate(
            openrlhf_client.request_api_wrapper(f"{s.http_url}/compat/openrlhf/down", body)
        )
    assert out.rewards == out.scores == [-1.0] and out.extra_logs == {"assay_failed": [1.0]}
    assert out.errors[0] is not None and out.errors[0].type == ErrorType.judge_unavailable


def test_openrlhf_unknown_reward_and_mismatched_lists_are_refused(server):
    url = server.http_url
    r = httpx.post(f"{url}/compat/openrlhf/nope", json={"query": [], "prompts": [], "labels": []}, timeout=60)
    assert r.status_code == 404 and ErrorResponse.model_validate_json(r.content).error.type == ErrorType.unknown_reward
    r = httpx.post(f"{url}/compat/openrlhf/orm", json={"query": ["a"], "prompts": [], "labels": []}, timeout=60)
    assert r.status_code == 400 and "as long as each other" in r.text


# --- slime ---------------------------------------------------------------------------------------


def _slime(url: str, prompt, response: str, label: str | None = "51", max_retries: int = 10) -> dict:
    args = types.SimpleNamespace(rm_url=url)
    sample = types.SimpleNamespace(prompt=prompt, response=response, label=label)

    async def call() -> dict:
        try:
            return await slime_rm_hub.remote_rm(args, sample, max_retries=max_retries)
        finally:  # slime keeps one session per process; each asyncio.run here is a loop of its own
            await slime_rm_hub._get_shared_session().close()

    return asyncio.run(call())


def test_slime_remote_rm_reads_the_score_under_its_reward_key(server):
    url = server.http_url
    out = SlimeResponse.model_validate(_slime(f"{url}/compat/slime/final", PROMPT, RIGHT))
    assert out.score == pytest.approx(_v1_score(url, "final", RIGHT))
    assert out.reward == "final" and out.reward_id.startswith("sha256:")
    assert _slime(f"{url}/compat/slime/correct", PROMPT, WRONG)["score"] == 0.0


def test_slime_failed_item_is_an_http_error_with_the_error_never_a_score(server):
    url = f"{server.http_url}/compat/slime/down"
    r = httpx.post(url, json={"prompt": PROMPT, "response": RIGHT, "label": "51"}, timeout=60)
    assert r.status_code == 503 and r.headers["Retry-After"] == "1"
    error = ErrorResponse.model_validate_json(r.content).error
    assert error.type == ErrorType.judge_unavailable and "'down' (sha256:" in error.message
    # slime's client raises after its retries: the sample gets no reward rather than a wrong one
    with pytest.raises(Exception, match="503"):
        _slime(url, PROMPT, RIGHT, max_retries=1)


def test_compat_routes_need_the_score_key_on_a_keyed_server(small_spec):
    key = "k" * 24
    with _small(small_spec, api_keys=(f"{key}:score",)) as s:
        body = {"query": [PROMPT + RIGHT], "prompts": [PROMPT], "labels": ["51"]}
        for path, payload in (
            ("/compat/openrlhf/correct", body),
            ("/compat/slime/correct", {"prompt": PROMPT, "response": RIGHT, "label": "51"}),
            ("/classify", {"model": "orm", "input": PROMPT + RIGHT}),
        ):
            assert httpx.post(f"{s.http_url}{path}", json=payload, timeout=60).status_code == 401
            headers = {"Authorization": f"Bearer {key}"}
            assert httpx.post(f"{s.http_url}{path}", json=payload, headers=headers, timeout=60).status_code == 200
        # the peers' clients send no headers of their own: the key travels in the URL, which aiohttp
        # and requests send as Basic authentication (the password is the key)
        keyed = s.http_url.replace("http://", f"http://assay:{key}@") + "/compat/openrlhf/correct"
        executor = openrlhf_client.SingleTurnAgentExecutor(keyed)
        [info] = asyncio.run(executor._fetch_rewards_via_http([PROMPT + RIGHT], [PROMPT], ["51"]))
        assert info["rewards"] == [1.0]
        assert openrlhf_client.request_api_wrapper(keyed, body)["rewards"] == [1.0]
        wrong = s.http_url.replace("http://", "http://assay:not-the-key-at-all@") + "/compat/openrlhf/correct"
        assert requests.post(wrong, json=body, timeout=60).status_code == 401
