"""Refusals in OpenAI's error shape, body and queue limits, batching, disconnects, keys, metrics."""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from assay.base.connections import InsecureBinding
from assay.policy_server.config import BatchSettings, Limits, ServerConfig
from assay.policy_server.protocol import CompletionResponse, ErrorResponse
from assay.policy_server.server import BackgroundServer, PolicyServer

pytestmark = pytest.mark.service

PROMPT = "Q: 23+45-17 A: "
OK = {"model": "policy", "prompt": PROMPT, "max_tokens": 4}


def error_of(r: httpx.Response, status: int) -> ErrorResponse:
    assert r.status_code == status, r.text
    return ErrorResponse.model_validate_json(r.content)


def metric(url: str, name: str, **labels: str) -> float:
    """One sample from /metrics (0 when absent)."""
    text = httpx.get(f"{url}/metrics").text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    m = re.search(rf"^{re.escape(name)}{{{re.escape(want)}}} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


@pytest.mark.parametrize(
    ("route", "change", "status", "param"),
    [
        ("completions", {"n": 1000}, 400, "n"),
        ("completions", {"max_tokens": -1}, 400, "max_tokens"),
        ("completions", {"max_tokens": 0}, 400, "max_tokens"),
        ("completions", {"max_tokens": 300}, 400, "max_tokens"),  # past the 256-token context
        ("completions", {"prompt": ""}, 400, "prompt"),
        ("completions", {"prompt": []}, 400, "prompt"),
        ("completions", {"prompt": [PROMPT, ""]}, 400, "prompt"),
        ("completions", {"prompt": [1, 2, 100]}, 400, "prompt"),  # outside the 100-token vocabulary
        ("completions", {"prompt": "9" * 300}, 400, "prompt"),
        ("completions", {"prompt": ["9" * 20_000]}, 400, "prompt"),  # tokenized on a thread
        ("completions", {"prompt": [[5] * 300]}, 400, "prompt"),
        ("completions", {"model": "nope"}, 404, "model"),
        ("completions", {"logprobs": 21}, 400, "logprobs"),
        ("completions", {"temperature": -0.5}, 400, "temperature"),
        ("completions", {"top_p": 0}, 400, "top_p"),
        ("completions", {"stop": [""]}, 400, "stop"),
        ("completions", {"stream_options": {"include_usage": True}}, 400, None),  # without stream=true
        ("completions", {"echo": True}, 400, "echo"),
        ("completions", {"best_of": 3}, 400, "best_of"),
        ("completions", {"min_tokens": 5}, 400, "min_tokens"),  # more than max_tokens (4)
        ("chat/completions", {"messages": []}, 400, "messages"),
        ("chat/completions", {"max_completion_tokens": 300}, 400, "max_completion_tokens"),
        ("chat/completions", {"messages": [{"role": "user", "content": "1" * 20_000}]}, 400, "prompt"),
        ("chat/completions", {"top_logprobs": 2}, 400, None),  # without logprobs=true
        ("chat/completions", {"messages": [{"role": "robot", "content": "1+1"}]}, 400, "messages"),
        ("chat/completions", {"model": "nope"}, 404, "model"),
    ],
)
def test_bad_requests_get_4xx_in_openai_shape(server, route, change, status, param):
    base = OK if route == "completions" else {"model": "policy", "messages": [{"role": "user", "content": "1+1"}]}
    body = {k: v for k, v in {**base, **change}.items() if k != "prompt" or route == "completions"}
    err = error_of(httpx.post(f"{server.http_url}/v1/{route}", json=body, timeout=30), status).error
    assert err.param == param, err
    assert err.type == ("not_found_error" if status == 404 else "invalid_request_error")
    assert err.message


def test_unparseable_bodies_and_unknown_routes_get_4xx(server):
    json_type = {"content-type": "application/json"}
    bad_json = httpx.post(f"{server.http_url}/v1/completions", content=b'{"model": ', headers=json_type)
    assert "invalid request" in error_of(bad_json, 400).error.message
    assert error_of(httpx.get(f"{server.http_url}/v1/nothing"), 404).error.type == "not_found_error"


@pytest.fixture(scope="module")
def tight():
    """A server with small limits: a 2 KiB body, 8 queued sequences, 4 per batch, a 0.2 s batching wait."""
    config = ServerConfig(
        models=None,
        port=0,
        limits=Limits(max_body_bytes=2048, max_sequences=8),
        batching=BatchSettings(max_sequences=4, max_queue=8, max_wait_s=0.2),
    )
    with BackgroundServer(config) as s:
        yield s


def test_oversized_bodies_get_413_declared_or_streamed(tight):
    body = {"model": "policy", "prompt": "1" * 4000}
    err = error_of(httpx.post(f"{tight.http_url}/v1/completions", json=body), 413).error
    assert err.code == "request_too_large" and "2048" in err.message

    def chunks():
        yield b'{"model": "policy", "prompt": "'
        for _ in range(10):
            yield b"1" * 500
        yield b'"}'

    json_type = {"content-type": "application/json"}
    streamed = httpx.post(f"{tight.http_url}/v1/completions", content=chunks(), headers=json_type)  # no content-length
    assert error_of(streamed, 413).error.code == "request_too_large"


def test_concurrent_requests_share_batches(tight):
    url = tight.http_url
    batches, sequences = (metric(url, f"assay_policy_batch_sequences_{k}", model="policy") for k in ("count", "sum"))
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda _: httpx.post(f"{url}/v1/completions", json=OK, timeout=60), range(4)))
    assert all(r.status_code == 200 for r in replies)
    assert metric(url, "assay_policy_batch_sequences_sum", model="policy") - sequences == 4
    assert metric(url, "assay_policy_batch_sequences_count", model="policy") - batches < 4
    ttft = metric(url, "assay_policy_time_to_first_token_seconds_count", model="policy")
    assert ttft >= 4 and metric(url, "assay_policy_time_to_first_token_seconds_sum", model="policy") > 0


def test_a_full_queue_answers_429_with_retry_after(tight):
    url = tight.http_url
    long = {"model": "policy", "prompt": PROMPT, "n": 8, "max_tokens": 200, "ignore_eos": True}
    # 8 sequences: 4 decode, 4 wait; the queue holds 8, so 5 more do not fit
    first = threading.Thread(target=lambda: httpx.post(f"{url}/v1/completions", json=long, timeout=120))
    first.start()
    try:
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/metrics").text.count('assay_policy_queue_depth{model="policy"} 4.0') == 0:
            assert time.monotonic() < deadline, "the first request never filled a batch"
            time.sleep(0.02)
        r = httpx.post(f"{url}/v1/completions", json={**OK, "n": 5})
        err = error_of(r, 429).error
        assert (err.type, err.code) == ("rate_limit_error", "queue_full")
        assert int(r.headers["retry-after"]) >= 1
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model="policy", prompt=PROMPT, n=5, max_tokens=4)
    finally:
        first.join()
    assert httpx.post(f"{url}/v1/completions", json={**OK, "n": 5}, timeout=60).status_code == 200


def test_client_disconnect_aborts_running_generation(server):
    url = server.http_url
    aborted = metric(url, "assay_policy_sequences_total", model="policy", finish_reason="abort")
    generated = metric(url, "assay_policy_generated_tokens_total", model="policy")
    n, max_tokens = 64, 240  # one batch that would take a second or more to finish
    body = {"model": "policy", "prompt": PROMPT, "n": n, "max_tokens": max_tokens, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.3))
    deadline = time.monotonic() + 60
    while metric(url, "assay_policy_sequences_total", model="policy", finish_reason="abort") - aborted < n:
        assert time.monotonic() < deadline, "the disconnected request's sequences were not aborted"
        time.sleep(0.05)
    assert metric(url, "assay_policy_generated_tokens_total", model="policy") - generated < n * max_tokens
    assert metric(url, "assay_policy_requests_total", route="/v1/completions", model="policy", code="499") >= 1
    assert httpx.post(f"{url}/v1/completions", json=OK, timeout=60).status_code == 200


@pytest.mark.unit
def test_binding_beyond_loopback_needs_keys(monkeypatch):
    monkeypatch.delenv("ASSAY_POLICY_API_KEYS", raising=False)
    with pytest.raises(InsecureBinding, match="API keys"):
        PolicyServer(ServerConfig(host="0.0.0.0", port=0))
    with pytest.raises(ValueError, match="scopes"):
        PolicyServer(ServerConfig(host="0.0.0.0", port=0, api_keys=("k:score",)))  # the reward service's scope


def test_metrics_count_requests_tokens_and_refusals(server):
    url = server.http_url
    before = metric(url, "assay_policy_generated_tokens_total", model="policy")
    done = CompletionResponse.model_validate_json(httpx.post(f"{url}/v1/completions", json=OK, timeout=60).content)
    httpx.post(f"{url}/v1/completions", json={**OK, "model": "nope"})
    assert metric(url, "assay_policy_generated_tokens_total", model="policy") - before == done.usage.completion_tokens
    assert metric(url, "assay_policy_requests_total", route="/v1/completions", model="policy", code="200") >= 1
    assert (
        metric(url, "assay_policy_requests_total", route="/v1/completions", model="unknown", code="404") >= 1
    )  # not one label per made-up name
    assert metric(url, "assay_policy_prompt_tokens_total", model="policy") >= done.usage.prompt_tokens
    assert metric(url, "assay_policy_batch_sequences_count", model="policy") >= 1
    assert 'assay_policy_queue_depth{model="policy"} 0.0' in httpx.get(f"{url}/metrics").text
