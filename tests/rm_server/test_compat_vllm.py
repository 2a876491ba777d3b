"""vLLM's pooling shapes on rm_server (`/classify`, `/pooling`, `/compat/vllm/score`) and SGLang's
`/v1/embeddings`, driven by a vLLM-style request (vLLM's own classification client example) and by
veRL's reward loop (copied in tests/peers/verl_reward_loop.py, which names its commit)."""

from __future__ import annotations

import asyncio
import math
import types

import httpx
import pytest
import requests

from assay.checkpoints import ARITH_DIR
from assay.rm_server.compat_protocol import (
    ClassificationResponse,
    EmbeddingResponse,
    PoolingResponse,
    VllmScoreResponse,
)
from assay.rm_server.protocol import ErrorResponse, ErrorType
from tests.peers.verl_reward_loop import RewardLoopWorker

pytestmark = pytest.mark.service

PROMPT = "Q: 23+45-17 A: "
RIGHT = "23+45=68 68-17=51 #### 51"
WRONG = "23+45=68 68-17=52 #### 52"


def _orm(url: str, response: str) -> float:
    """The orm's own score (sigmoid of its logit) through Assay's /v1/score."""
    items = [{"id": "a", "prompt": PROMPT, "response": response}]
    r = httpx.post(f"{url}/v1/score", json={"reward": "orm", "items": items}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["results"][0]["score"]


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


def post_http_request(payload: dict, api_url: str) -> requests.Response:
    """vLLM's examples/online_serving/openai_classification_client.py, as it is."""
    headers = {"User-Agent": "Test Client"}
    response = requests.post(api_url, headers=headers, json=payload)
    return response


def test_classify_as_vllms_example_sends_it_gives_the_rewards_scores(server):
    """The whole text the reward model reads (for the orm, prompt + response), one or many."""
    url = server.http_url
    payload = {"model": "orm", "input": [PROMPT + RIGHT, PROMPT + WRONG]}
    r = post_http_request(payload=payload, api_url=f"{url}/classify")
    assert r.status_code == 200, r.text
    out = ClassificationResponse.model_validate(r.json())
    assert out.model == "orm" and out.id.startswith("classify-") and out.reward_id.startswith("sha256:")
    assert [d.index for d in out.data] == [0, 1] and all(d.num_classes == 1 for d in out.data)
    assert [d.probs[0] for d in out.data] == [pytest.approx(_orm(url, RIGHT)), pytest.approx(_orm(url, WRONG))]
    assert out.usage.prompt_tokens == out.usage.total_tokens > 2 * len(PROMPT + RIGHT)  # <s> and characters

    # use_activation (vLLM's meaning): false gives the logit, true its sigmoid; one text alone is fine
    one = {"model": "orm", "input": PROMPT + RIGHT}
    raw = httpx.post(f"{url}/classify", json={**one, "use_activation": False}, timeout=60).json()
    assert raw["data"][0]["probs"][0] == pytest.approx(_logit(_orm(url, RIGHT)), rel=1e-4)
    act = httpx.post(f"{url}/classify", json={**one, "use_activation": True}, timeout=60).json()
    assert act["data"][0]["probs"][0] == pytest.approx(_orm(url, RIGHT))


def test_classify_messages_are_rendered_with_the_reward_models_chat_template(server):
    from transformers import AutoTokenizer

    url = server.http_url
    messages = [{"role": "user", "content": "23+45-17"}, {"role": "assistant", "content": RIGHT}]
    text = AutoTokenizer.from_pretrained(ARITH_DIR / "orm").apply_chat_template(messages, tokenize=False)
    chat = httpx.post(f"{url}/classify", json={"model": "orm", "messages": messages}, timeout=60).json()
    plain = {"model": "orm", "input": text, "add_special_tokens": False}
    assert chat["data"] == httpx.post(f"{url}/classify", json=plain, timeout=60).json()["data"]


def test_verl_reward_loop_reads_the_logit_from_classify_and_from_embeddings(server):
    """veRL names the model by its checkpoint path (vLLM's default model name) and sends the old
    `activation: false`; its SGLang path reads `/v1/embeddings`. Both read the orm's logit."""
    url = server.http_url
    expected = _logit(_orm(url, RIGHT))
    for engine in ("vllm", "sglang"):
        config = types.SimpleNamespace(
            reward_model=types.SimpleNamespace(
                rollout=types.SimpleNamespace(name=engine), model=types.SimpleNamespace(path=str(ARITH_DIR / "orm"))
            )
        )
        worker = RewardLoopWorker(config, reward_router_address=url.removeprefix("http://"))
        out = asyncio.run(worker.compute_score_disrm(PROMPT + RIGHT))
        assert out["reward_score"] == pytest.approx(expected, rel=1e-4), engine
    r = httpx.post(f"{url}/v1/embeddings", json={"model": "orm", "input": [PROMPT + RIGHT]}, timeout=60)
    assert EmbeddingResponse.model_validate_json(r.content).data[0].embedding == [pytest.approx(expected, rel=1e-4)]


def test_pooling_and_vllm_score_shapes(server):
    url = server.http_url
    r = httpx.post(f"{url}/pooling", json={"model": "orm", "input": PROMPT + RIGHT}, timeout=60)
    out = PoolingResponse.model_validate_json(r.content)
    assert out.data[0].data == [pytest.approx(_orm(url, RIGHT))] and out.id.startswith("pool-")

    # vLLM's /score on its own path: text_1 is the prompt, text_2 the response, any pointwise reward
    body = {"model": "orm", "text_1": PROMPT, "text_2": [RIGHT, WRONG]}
    score = VllmScoreResponse.model_validate_json(httpx.post(f"{url}/compat/vllm/score", json=body, timeout=60).content)
    assert [d.score for d in score.data] == [pytest.approx(_orm(url, RIGHT)), pytest.approx(_orm(url, WRONG))]
    body = {"model": "format", "text_1": [PROMPT, PROMPT], "text_2": [RIGHT, "no"]}
    r = httpx.post(f"{url}/compat/vllm/score", json=body, timeout=60)
    assert [d["score"] for d in r.json()["data"]] == [1.0, 0.0]


def test_only_outcome_model_rewards_serve_whole_texts(server):
    url = server.http_url
    for model, what in (("correct", "rule.math_equal"), ("prm", "model.process"), ("judge", "judge")):
        r = httpx.post(f"{url}/classify", json={"model": model, "input": PROMPT + RIGHT}, timeout=60)
        error = ErrorResponse.model_validate_json(r.content).error
        assert r.status_code == 400 and f"is {what}: only model.outcome rewards" in error.message, r.text
    r = httpx.post(f"{url}/classify", json={"model": "nope", "input": "x"}, timeout=60)
    assert r.status_code == 404 and r.json()["error"]["type"] == ErrorType.unknown_reward
    r = httpx.post(f"{url}/pooling", json={"model": "orm", "input": [101, 7]}, timeout=60)  # token ids
    assert r.status_code == 400
    r = httpx.post(f"{url}/classify", json={"model": "orm", "input": "x", "truncate_prompt_tokens": 8}, timeout=60)
    assert r.status_code == 400 and "truncate_prompt_tokens" in r.text
    # this server has one outcome model reward: vLLM's `model` may be left out
    r = httpx.post(f"{url}/classify", json={"input": PROMPT + RIGHT, "priority": 0, "user": "u"}, timeout=60)
    assert r.status_code == 200 and r.json()["model"] == "orm"
