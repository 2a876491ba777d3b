"""The official `openai` package against the policy server, unchanged: completions, chat, models."""

from __future__ import annotations

import httpx
import openai
import pytest

from assay.generation import SamplingParams, sample
from assay.policy_server.protocol import ChatCompletionResponse, CompletionResponse, ModelList

pytestmark = pytest.mark.service

PROMPTS = ["Q: 23+45-17 A: ", "Q: 8-3+12 A: "]


def test_completions_round_trip_with_n_usage_and_weight_version(client, policy):
    _, tok = policy
    raw = client.completions.with_raw_response.create(
        model="policy",
        prompt=PROMPTS,
        n=3,
        max_tokens=40,
        temperature=1.0,
        seed=7,
        logprobs=0,
        extra_body={"return_token_ids": True},  # an extension, through the client's escape hatch
    )
    done = raw.parse()  # the client's own types
    ours = CompletionResponse.model_validate_json(raw.http_response.content)  # and ours
    assert [c.index for c in done.choices] == list(range(6))
    assert done.model == "policy" and done.object == "text_completion"
    # choices come prompt by prompt, n each
    by_choice = [c.model_extra["prompt_token_ids"] for c in done.choices]
    assert by_choice == [tok(p)["input_ids"] for p in PROMPTS for _ in range(3)]
    assert all(len(c.model_extra["token_ids"]) == len(c.logprobs.tokens) for c in done.choices)
    assert {c.finish_reason for c in done.choices} <= {"stop", "length"}
    prompt_tokens = sum(len(tok(p)["input_ids"]) for p in PROMPTS)
    assert done.usage.prompt_tokens == prompt_tokens
    assert done.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in done.choices)
    assert done.usage.total_tokens == prompt_tokens + done.usage.completion_tokens
    assert done.model_extra["weight_version"] == 0 and ours.weight_version == 0


def test_max_tokens_cuts_with_finish_reason_length(client):
    done = client.completions.create(model="policy", prompt=PROMPTS[0], max_tokens=3, temperature=0, logprobs=1)
    choice = done.choices[0]
    assert choice.finish_reason == "length" and choice.text == "23+"
    assert len(choice.logprobs.tokens) == 3 and done.usage.completion_tokens == 3


def test_chat_greedy_matches_in_process_sampling_and_lists_logprobs(client, policy):
    model, tok = policy
    messages = [{"role": "user", "content": "23+45-17"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == "<s>" + PROMPTS[0]  # the template writes <s>; `sample` has the tokenizer add it
    expected = sample(model, tok, [PROMPTS[0]], SamplingParams(temperature=0, max_new_tokens=60))[0][0]

    raw = client.chat.completions.with_raw_response.create(
        model="policy", messages=messages, temperature=0, logprobs=True, top_logprobs=3
    )
    done = raw.parse()
    ChatCompletionResponse.model_validate_json(raw.http_response.content)
    choice = done.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason == "stop"
    content = choice.logprobs.content
    assert "".join(t.token for t in content) == expected.text + "</s>"  # eos listed, kept out of the text
    assert [t.logprob for t in content] == pytest.approx(expected.logprobs, abs=1e-4)
    for t in content:
        assert len(t.top_logprobs) == 3
        assert t.top_logprobs[0].token == t.token  # greedy: the chosen token is the likeliest
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob
        assert bytes(t.bytes).decode() == t.token
    assert done.usage.completion_tokens == len(content)
    assert done.model_extra["weight_version"] == 0


def test_chat_takes_text_parts_and_max_completion_tokens(client):
    done = client.chat.completions.create(
        model="policy",
        messages=[{"role": "user", "content": [{"type": "text", "text": "23+45-17"}]}],
        temperature=0,
        max_completion_tokens=5,
        n=2,
    )
    assert [c.message.content for c in done.choices] == ["23+45"] * 2
    assert [c.finish_reason for c in done.choices] == ["length"] * 2


def test_models_lists_the_policy_and_the_verifier(client, server):
    listed = client.models.list()
    assert {m.id for m in listed.data} == {"policy", "verifier"}
    ours = ModelList.model_validate_json(httpx.get(f"{server.http_url}/v1/models").content)
    assert all(m.max_model_len == 256 and m.weight_version == 0 for m in ours.data)


def test_refusals_arrive_as_the_clients_typed_errors(client):
    with pytest.raises(openai.NotFoundError) as nf:
        client.completions.create(model="nope", prompt="Q: 1+1 A: ")
    assert nf.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="policy", prompt="Q: 1+1 A: ", n=10_000)
    assert bad.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as long:
        client.chat.completions.create(model="policy", messages=[{"role": "user", "content": "1+1"}], max_tokens=500)
    assert long.value.body["code"] == "context_length_exceeded"
