"""`stream: true` with the official `openai` client (sync and async) and httpx's raw stream.

The streamed chunks must add up to the non-streamed response for the same seed (text, tokens,
logprobs, finish and stop reasons), hold stop strings back, carry the weight version of the batch
that sampled them, end with `data: [DONE]`, and cancel their sequences when the client goes away.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time

import httpx
import openai
import pytest
from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerFast

from assay.checkpoints import EMBEDDED, load_embedded
from assay.clients import PolicyClient
from assay.policy_server.backends import GenerationBackend, GenerationFailed, GenerationRequest, TokenDelta
from assay.policy_server.config import BatchSettings, Limits, ServerConfig
from assay.policy_server.protocol import ChatCompletionChunk, CompletionChunk, ErrorResponse
from assay.policy_server.server import BackgroundServer
from assay.policy_server.streaming import _Text
from tests.policy_server.backend_double import ScriptedBackend

pytestmark = pytest.mark.service

PROMPTS = ["Q: 23+45-17 A: ", "Q: 8-3+12 A: "]
STOPS = ["=68 ", "17=", " #"]  # several characters each: their first ones are held back, then sent or cut
KEY, ADMIN = "gen-key-for-tests:generate", "admin-key-for-tests:admin,generate"


def metric(url: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    m = re.search(rf"^{re.escape(name)}{{{re.escape(want)}}} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def events(url: str, route: str, body: dict, headers: dict | None = None) -> tuple[httpx.Response, list[str]]:
    """The raw `data: ...` payloads of one streamed request, checking the SSE framing on the way."""
    with httpx.stream("POST", f"{url}/v1/{route}", json=body, headers=headers, timeout=120) as r:
        raw = r.read().decode()
    if r.status_code != 200:
        return r, []
    assert r.headers["content-type"].startswith("text/event-stream")
    assert raw.endswith("\n\n")
    blocks = raw[:-2].split("\n\n")
    assert all(b.startswith("data: ") and "\n" not in b for b in blocks), raw
    return r, [b.removeprefix("data: ") for b in blocks]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streamed_completions_add_up_to_the_non_streamed_ones(client, seed):
    common = dict(model="policy", prompt=PROMPTS, n=3, max_tokens=40, seed=seed, stop=STOPS, logprobs=2)
    whole = client.completions.create(**common, extra_body={"return_token_ids": True})
    texts, tokens, logprobs, ends = {}, {}, {}, {}
    for chunk in client.completions.create(**common, stream=True, extra_body={"return_token_ids": True}):
        assert chunk.object == "text_completion" and len(chunk.choices) == 1
        c, i = chunk.choices[0], chunk.choices[0].index
        assert i not in ends  # nothing after a choice's last chunk
        assert c.model_extra["weight_version"] == chunk.model_extra["weight_version"] == 0
        texts[i] = texts.get(i, "") + c.text
        tokens[i] = tokens.get(i, []) + c.model_extra["token_ids"]
        logprobs[i] = logprobs.get(i, []) + c.logprobs.token_logprobs
        if c.finish_reason is not None:
            ends[i] = (c.finish_reason, c.model_extra["stop_reason"])
    assert sorted(texts) == list(range(6))
    for i, choice in enumerate(whole.choices):
        assert texts[i] == choice.text and not any(s in texts[i] for s in STOPS)
        assert tokens[i] == choice.model_extra["token_ids"]
        assert logprobs[i] == pytest.approx(choice.logprobs.token_logprobs, abs=1e-5)
        assert ends[i] == (choice.finish_reason, choice.model_extra.get("stop_reason"))
    assert {s for _, s in ends.values()} - {None}, "no stop string ended a choice: pick seeds that hit one"


def test_async_chat_stream_with_usage_matches_the_response(server):
    messages = [{"role": "user", "content": "23+45-17"}]
    common = dict(model="policy", messages=messages, n=2, seed=5, logprobs=True, top_logprobs=2)

    async def run():
        client = openai.AsyncOpenAI(base_url=f"{server.http_url}/v1", api_key="unused", max_retries=0)
        async with client:
            whole = await client.chat.completions.create(**common)
            stream = await client.chat.completions.create(**common, stream=True, stream_options={"include_usage": True})
            return whole, [chunk async for chunk in stream]

    whole, chunks = asyncio.run(run())
    *streamed, last = chunks
    assert last.choices == [] and last.usage == whole.usage  # the usage chunk, last
    assert all(c.object == "chat.completion.chunk" and c.usage is None for c in streamed)
    for i, choice in enumerate(whole.choices):
        mine = [c.choices[0] for c in streamed if c.choices[0].index == i]
        assert (mine[0].delta.role, mine[0].delta.content) == ("assistant", "")
        assert all(c.delta.role is None for c in mine[1:])
        assert "".join(c.delta.content for c in mine) == choice.message.content
        assert [c.finish_reason for c in mine] == [None] * (len(mine) - 1) + [choice.finish_reason]
        content = [t for c in mine if c.logprobs for t in c.logprobs.content]
        assert [(t.token, len(t.top_logprobs)) for t in content] == [
            (t.token, len(t.top_logprobs)) for t in choice.logprobs.content
        ]


def test_raw_sse_framing_usage_per_chunk_and_one_recorded_request(server):
    url = server.http_url
    ok = metric(url, "assay_policy_requests_total", route="/v1/completions", model="policy", code="200")
    body = {
        "model": "policy",
        "prompt": PROMPTS[0],
        "n": 2,
        "max_tokens": 6,
        "temperature": 0,
        "stream": True,
        "stream_options": {"continuous_usage_stats": True},  # include_usage defaults to true, as in vLLM
        "return_token_ids": True,
    }
    r, data = events(url, "completions", body)
    assert data[-1] == "[DONE]" and r.headers["cache-control"] == "no-cache"
    chunks = [CompletionChunk.model_validate_json(d) for d in data[:-1]]
    *choices, usage = chunks
    assert usage.choices == [] and usage.usage is not None and usage.usage.completion_tokens == 12
    for i in range(2):
        mine = [c for c in choices if c.choices[0].index == i]
        assert [c.usage.completion_tokens for c in mine] == list(range(1, 7))  # its usage so far, each chunk
        assert mine[0].choices[0].prompt_token_ids is not None
        assert all(c.choices[0].prompt_token_ids is None for c in mine[1:])
        assert "".join(c.choices[0].text for c in mine) == "23+45="
    first = json.loads(data[0])["choices"][0]
    assert first["finish_reason"] is None and "logprobs" not in first  # OpenAI's null; unrequested: absent
    assert metric(url, "assay_policy_requests_total", route="/v1/completions", model="policy", code="200") == ok + 1


def test_refusals_come_before_the_stream_as_json(server):
    url = server.http_url
    for route, body, status, param in [
        ("completions", {"model": "policy", "prompt": "Q: 1+1 A: ", "max_tokens": 500}, 400, "max_tokens"),
        ("completions", {"model": "nope", "prompt": "Q: 1+1 A: "}, 404, "model"),
        ("chat/completions", {"model": "policy", "messages": []}, 400, "messages"),
    ]:
        r, data = events(url, route, {**body, "stream": True})
        assert r.status_code == status and r.headers["content-type"] == "application/json" and data == []
        assert ErrorResponse.model_validate_json(r.content).error.param == param
    r = httpx.post(f"{url}/v1/completions", json={"model": "policy", "prompt": "x", "stream_options": {}})
    assert r.status_code == 400 and "stream_options needs stream=true" in r.text


def test_a_client_that_leaves_mid_stream_frees_its_sequences_while_others_stream_on(server):
    url = server.http_url
    aborted = metric(url, "assay_policy_sequences_total", model="policy", finish_reason="abort")
    cancelled = metric(url, "assay_policy_requests_total", route="/v1/completions", model="policy", code="499")
    long = {"model": "policy", "prompt": PROMPTS[0], "n": 4, "max_tokens": 240, "ignore_eos": True, "stream": True}
    other = {**long, "max_tokens": 120, "stream_options": {"include_usage": True}}
    finished: list = []
    neighbour = threading.Thread(target=lambda: finished.append(events(url, "completions", other)[1]))
    with httpx.stream("POST", f"{url}/v1/completions", json=long, timeout=120) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: {")
        neighbour.start()
        for _ in range(20):
            next(lines)
    # the connection is closed: its 4 sequences stop at their next step
    deadline = time.monotonic() + 60
    while metric(url, "assay_policy_sequences_total", model="policy", finish_reason="abort") - aborted < 4:
        assert time.monotonic() < deadline, "the abandoned stream's sequences were not aborted"
        time.sleep(0.05)
    neighbour.join(120)
    usage = CompletionChunk.model_validate_json(finished[0][-2]).usage
    assert finished[0][-1] == "[DONE]" and usage is not None and usage.completion_tokens == 4 * 120
    assert metric(url, "assay_policy_requests_total", route="/v1/completions", model="policy", code="499") > cancelled
    assert 'assay_policy_queue_depth{model="policy"} 0.0' in httpx.get(f"{url}/metrics").text


@pytest.fixture(scope="module")
def own():
    """A server of its own (its weights change): keys, and batches of 4 sequences in a queue of 8."""
    config = ServerConfig(
        port=0,
        grpc_port=None,
        models={"policy": EMBEDDED["policy"][1]},
        api_keys=(KEY, ADMIN),
        limits=Limits(max_sequences=8),
        batching=BatchSettings(max_sequences=4, max_queue=8, max_wait_s=0.2),
    )
    with BackgroundServer(config) as s:
        yield s


def test_keys_and_a_full_queue_are_answered_before_the_stream(own):
    url, body = own.http_url, {"model": "policy", "prompt": PROMPTS[0], "max_tokens": 4, "stream": True}
    r, _ = events(url, "completions", body)
    assert r.status_code == 401 and ErrorResponse.model_validate_json(r.content).error.code == "invalid_api_key"
    key = {"authorization": f"Bearer {KEY.split(':')[0]}"}
    long = {**body, "n": 8, "max_tokens": 200, "ignore_eos": True}
    first = threading.Thread(target=events, args=(url, "completions", long, key))
    first.start()
    try:  # 4 decode, 4 wait: the queue holds 8, so 5 more do not fit
        deadline = time.monotonic() + 60
        while metric(url, "assay_policy_queue_depth", model="policy") != 4:
            assert time.monotonic() < deadline, "the first request never filled a batch"
            time.sleep(0.02)
        r, data = events(url, "completions", {**body, "n": 5}, key)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1 and data == []
        assert ErrorResponse.model_validate_json(r.content).error.code == "queue_full"
    finally:
        first.join(120)
    r, data = events(url, "completions", body, key)
    assert r.status_code == 200 and data[-1] == "[DONE]"


def test_a_weight_update_mid_stream_shows_only_in_batches_that_start_after_it(own):
    admin_key = ADMIN.split(":")[0]
    weights = load_embedded("policy")[0].state_dict()
    client = openai.OpenAI(base_url=f"{own.http_url}/v1", api_key=admin_key, max_retries=0, timeout=120)
    with PolicyClient.http(own.http_url, api_key=admin_key, max_retries=0) as admin:
        before = admin.weight_version()
        pushed: list = []
        push = threading.Thread(target=lambda: pushed.append(admin.update_weights(weights)))
        started = False
        versions: dict[int, set[int]] = {}
        stream = client.completions.create(
            model="policy", prompt=PROMPTS[0], n=8, max_tokens=120, stream=True, extra_body={"ignore_eos": True}
        )
        for chunk in stream:
            if not started:
                push.start()  # while the first batch (choices 0-3) decodes
                started = True
            for c in chunk.choices:
                assert c.model_extra["weight_version"] == chunk.model_extra["weight_version"]
                versions.setdefault(c.index, set()).add(c.model_extra["weight_version"])
        push.join(60)
    assert pushed[0].weight_version == before + 1
    assert all(len(v) == 1 for v in versions.values())  # no choice changes version midway
    assert all(versions[i] == {before} for i in range(4))  # the batch running when it landed kept its weights
    assert all(versions[i] <= {before, before + 1} for i in range(4, 8))
    after = client.completions.create(model="policy", prompt=PROMPTS[0], max_tokens=4, stream=True)
    assert {c.model_extra["weight_version"] for c in after} == {before + 1}


class BreaksMidway(GenerationBackend):
    """Test double: a model whose sequence fails after its first tokens (a real checkpoint does not fail on
    cue). It reports three tokens, then fails as the transformers backend fails a sequence."""

    def __init__(self, tokenizer) -> None:
        self.name, self.tokenizer, self.max_model_len = "breaks", tokenizer, 256

    async def generate(self, requests: list[GenerationRequest]):
        raise AssertionError("only streamed here")

    async def generate_streaming(self, requests, progress):
        ids = self.tokenizer("23+", add_special_tokens=False)["input_ids"]
        progress(0, TokenDelta(ids, [0.0] * len(ids), None, self.weight_version))
        await asyncio.sleep(0.05)
        raise GenerationFailed("generating this sequence failed (FloatingPointError: NaN logits)")


def test_an_error_after_the_stream_started_is_its_last_event_and_a_backend_without_reports_streams(tokenizer):
    backends = {"breaks": BreaksMidway(tokenizer), "scripted": ScriptedBackend("scripted", tokenizer, ["12+3"])}
    with BackgroundServer(ServerConfig(port=0, grpc_port=None), backends) as s:
        body = {"model": "breaks", "prompt": PROMPTS[0], "max_tokens": 8, "stream": True}
        r, data = events(s.http_url, "completions", body)
        assert r.status_code == 200 and data[-1] == "[DONE]"
        assert CompletionChunk.model_validate_json(data[0]).choices[0].text == "23+"
        error = ErrorResponse.model_validate_json(data[-2]).error
        assert (error.type, error.code) == ("server_error", "generation_failed")
        code = {"route": "/v1/completions", "model": "breaks", "code": "500"}
        assert metric(s.http_url, "assay_policy_requests_total", **code) == 1
        chat = {"model": "scripted", "messages": [{"role": "user", "content": "1+1"}], "stream": True}
        r, data = events(s.http_url, "chat/completions", chat)
        role, whole = (ChatCompletionChunk.model_validate_json(d).choices[0] for d in data[:2])
        assert role.delta.role == "assistant" and (whole.delta.content, whole.finish_reason) == ("12+3", "stop")


@pytest.mark.unit
def test_text_held_back_mid_character_and_before_stop_strings_adds_up(tokenizer):
    """A byte-level BPE splits characters over tokens: no chunk may carry half of one (U+FFFD)."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["héllo wörld, 1+1=2 ✓ 🙂 done"] * 4, vocab_size=280, min_frequency=1)
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer)
    backend = ScriptedBackend("bpe", fast, [])
    text = "héllo 🙂 wörld, 1+1=2 ✓ done"
    ids = fast(text)["input_ids"]
    for stops in ([], ["1=2", "🙂 x"], ["wör"]):
        streamed = _Text(backend, stops)
        sent = [streamed.add([t]) for t in ids]
        cuts = [text.index(s) for s in stops if s in text]
        final = text[: min(cuts)] if cuts else text  # what the backend's output holds
        assert all("\ufffd" not in piece for piece in sent)
        assert final.startswith("".join(sent))
        assert "".join(sent) + streamed.rest(final) == final
