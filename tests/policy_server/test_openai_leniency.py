"""The policy server takes what OpenAI and vLLM clients send, as vLLM's server does (issue 14).

With the official `openai` SDK (sync and async) against the session's live server: every field the
SDK can send is accepted at its neutral value (the list is the SDK's own, read from its types, so a
field a new SDK adds fails here until it is handled), refused otherwise with a 400 naming it;
unknown fields are ignored; `extra_body` works merged by the SDK or sent as a literal key; the
sampling extensions (`min_p`, `repetition_penalty`, `min_tokens`, `include_stop_str_in_output`,
`return_tokens_as_token_ids`) do what vLLM's do. TRL's `VLLMClient.generate` (trl, installed) posts
its own request shape. System messages reach the model through the chat template.
"""

from __future__ import annotations

import asyncio
import logging
import typing

import httpx
import openai
import pytest
from openai.types import completion_create_params as completion_params
from openai.types.chat import completion_create_params as chat_params

from assay.policy_server.protocol import ChatCompletionRequest, ChatCompletionResponse, CompletionResponse

pytestmark = pytest.mark.service

PROMPT = "Q: 23+45-17 A: "
QUESTION = [{"role": "user", "content": "23+45-17"}]

# Every field of the SDK's request types, at the value that asks for nothing this server lacks.
CHAT_NEUTRAL = {
    "messages": QUESTION,
    "model": "policy",
    "audio": None,
    "frequency_penalty": 0,
    "function_call": "none",
    "functions": [],
    "logit_bias": {},
    "logprobs": False,
    "max_completion_tokens": 8,
    "max_tokens": None,
    "metadata": {"run": "test"},
    "modalities": ["text"],
    "moderation": None,
    "n": 1,
    "parallel_tool_calls": True,
    "prediction": None,
    "presence_penalty": 0,
    "prompt_cache_key": "k",
    "prompt_cache_options": {"mode": "implicit", "ttl": "30m"},
    "prompt_cache_retention": "in-memory",
    "reasoning_effort": "high",  # accepted and ignored: the served models have no reasoning phase
    "response_format": {"type": "text"},
    "safety_identifier": "user-1",
    "seed": 1,
    "service_tier": "auto",
    "stop": None,
    "store": False,
    "stream_options": None,
    "temperature": 0,
    "tool_choice": "none",
    "tools": [],
    "top_logprobs": None,
    "top_p": 1,
    "user": "u",
    "verbosity": "low",
    "web_search_options": None,
}
COMPLETION_NEUTRAL = {
    "model": "policy",
    "prompt": PROMPT,
    "best_of": 1,
    "echo": False,
    "frequency_penalty": 0,
    "logit_bias": {},
    "logprobs": None,
    "max_tokens": 8,
    "n": 1,
    "presence_penalty": 0,
    "seed": 1,
    "stop": None,
    "stream_options": None,
    "suffix": None,
    "temperature": 0,
    "top_p": 1,
    "user": "u",
}


def test_the_neutral_tables_cover_every_field_the_sdk_sends():
    assert set(CHAT_NEUTRAL) == set(typing.get_type_hints(chat_params.CompletionCreateParamsBase))
    assert set(COMPLETION_NEUTRAL) == set(typing.get_type_hints(completion_params.CompletionCreateParamsBase))


def test_every_sdk_field_at_its_neutral_value_is_accepted_sync_and_async(server, client):
    # max_tokens: None is "not given" to the SDK's own types; the SDK does send the null
    chat = client.chat.completions.create(**CHAT_NEUTRAL)
    baseline = client.chat.completions.create(model="policy", messages=QUESTION, max_completion_tokens=8, temperature=0)
    assert chat.choices[0].message.content == baseline.choices[0].message.content  # and change nothing

    async def complete():
        async with openai.AsyncOpenAI(base_url=f"{server.http_url}/v1", api_key="unused", max_retries=0) as aclient:
            return await aclient.completions.create(**COMPLETION_NEUTRAL)

    done = asyncio.run(complete())
    assert done.choices[0].text == "23+45=68"
    assert done.choices[0].text == baseline.choices[0].message.content


@pytest.mark.parametrize(
    ("route", "field", "value"),
    [
        ("chat", "tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
        ("chat", "tool_choice", "required"),
        ("chat", "functions", [{"name": "f"}]),
        ("chat", "function_call", {"name": "f"}),
        ("chat", "response_format", {"type": "json_object"}),
        ("chat", "store", True),
        ("chat", "modalities", ["text", "audio"]),
        ("chat", "audio", {"voice": "alloy", "format": "wav"}),
        ("chat", "prediction", {"type": "content", "content": "x"}),
        ("chat", "web_search_options", {}),
        ("chat", "moderation", {"model": "omni-moderation-latest"}),
        ("chat", "presence_penalty", 0.5),
        ("chat", "logit_bias", {"5": 1.0}),
        ("chat", "skip_special_tokens", False),
        ("chat", "continue_final_message", True),  # the last message is the user's
        ("chat", "min_tokens", 9),  # more than max_completion_tokens
        ("chat", "extra_body", "not an object"),
        ("completions", "frequency_penalty", -1),
        ("completions", "echo", True),
        ("completions", "suffix", "!"),
        ("completions", "best_of", 2),
        ("completions", "min_p", 1.5),
        ("completions", "repetition_penalty", 0),
    ],
)
def test_a_non_neutral_value_is_refused_naming_the_field(client, route, field, value):
    if route == "chat":
        request = dict(messages=QUESTION, max_completion_tokens=8)
        create = client.chat.completions.create
    else:
        request = dict(prompt=PROMPT, max_tokens=8)
        create = client.completions.create
    with pytest.raises(openai.BadRequestError) as refused:
        create(model="policy", **request, extra_body={field: value})
    assert refused.value.param == field, refused.value.body
    assert refused.value.type == "invalid_request_error"


def test_unknown_fields_are_ignored_and_named_in_one_debug_line(server, caplog):
    body = {"model": "policy", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "prompt_typo": 1, "vendor_x": {}}
    reply = httpx.post(f"{server.http_url}/v1/completions", json=body, timeout=60)
    assert CompletionResponse.model_validate_json(reply.content).choices[0].text == "23+45=68"
    with caplog.at_level(logging.DEBUG, logger="assay.policy_server.protocol"):
        ChatCompletionRequest.model_validate({"model": "policy", "messages": QUESTION, "b_typo": 1, "a_typo": 2})
    assert [r.getMessage() for r in caplog.records] == ["ChatCompletionRequest: ignored the fields a_typo, b_typo"]


def test_a_literal_extra_body_key_is_merged_and_its_fields_win(server):
    """its_hub 1.2 posts `"extra_body": {...}` as a key of the JSON, beside the same fields at the top."""
    body = {
        "model": "policy",
        "messages": QUESTION,
        "max_tokens": 30,
        "temperature": 1.0,
        "seed": 3,
        "top_k": 50,
        "extra_body": {"top_k": 1, "return_token_ids": True, "not_ours": 1},  # top_k=1 samples greedily
    }
    reply = ChatCompletionResponse.model_validate_json(
        httpx.post(f"{server.http_url}/v1/chat/completions", json=body, timeout=60).content
    )
    assert reply.choices[0].message.content == "23+45=68 68-17=51 #### 51"
    assert reply.choices[0].token_ids is not None and reply.prompt_token_ids is not None


def test_min_p_1_keeps_only_the_likeliest_token(client):
    sampled = client.completions.create(
        model="policy", prompt=[PROMPT] * 4, max_tokens=30, temperature=1.0, seed=5, extra_body={"min_p": 1.0}
    )
    assert {c.text for c in sampled.choices} == {"23+45=68 68-17=51 #### 51"}  # the greedy answer, every time


def test_min_tokens_holds_off_end_of_sequence_and_stop_strings(client):
    greedy = dict(model="policy", prompt=PROMPT, max_tokens=40, temperature=0)
    plain = client.completions.create(**greedy).choices[0]
    assert plain.finish_reason == "stop" and len(plain.text) == 25  # one token per character
    held = client.completions.create(**greedy, extra_body={"min_tokens": 30, "return_token_ids": True}).choices[0]
    assert held.text.startswith(plain.text) and len(held.model_extra["token_ids"]) >= 30
    # a stop string inside the first min_tokens is passed over; the next one ends the text
    stopped = client.completions.create(**greedy, stop=" ", extra_body={"min_tokens": 10}).choices[0]
    assert stopped.text == "23+45=68 68-17=51"


def test_include_stop_str_in_output_ends_the_text_with_the_stop_string(client):
    done = client.completions.create(
        model="policy",
        prompt=PROMPT,
        max_tokens=40,
        temperature=0,
        stop=["=", "-"],
        extra_body={"include_stop_str_in_output": True},
    )
    assert done.choices[0].text == "23+45=" and done.choices[0].model_extra["stop_reason"] == "="


def test_trl_vllm_client_generate_gets_ids_and_logprobs_by_token_id(server, policy):
    """TRL's own request code (`trl.generation.vllm_client.VLLMClient.generate`): it posts /v1/completions
    with `return_token_ids`, `return_tokens_as_token_ids`, `repetition_penalty`, `min_p`, `top_k` and
    `logprobs=0`, and parses "token_id:<id>" tokens. Its constructor needs vLLM installed (it checks),
    so the instance is made without it and given what the constructor would set."""
    import requests
    from trl.generation.vllm_client import VLLMClient

    _, tok = policy
    trl_client = VLLMClient.__new__(VLLMClient)
    trl_client.session, trl_client.base_url, trl_client.model = requests.Session(), server.http_url, "policy"
    out = trl_client.generate([PROMPT, "Q: 8-3+12 A: "], n=2, max_tokens=12, temperature=1.0, min_p=0.05)
    assert out["prompt_ids"] == [tok(p)["input_ids"] for p in (PROMPT, "Q: 8-3+12 A: ")]
    assert len(out["completion_ids"]) == 4
    for ids, logprobs, lp_ids in zip(out["completion_ids"], out["logprobs"], out["logprob_token_ids"], strict=True):
        assert [position[0] for position in lp_ids] == ids  # logprobs=0: the sampled token only
        assert all(len(p) == 1 and p[0] <= 0 for p in logprobs)


def test_repetition_penalty_greedy_matches_hugging_face_generate(client, policy):
    """vLLM's and HF's definition (over prompt and generated tokens): HF's generate is the reference."""
    import torch

    model, tok = policy
    ids = tok(PROMPT, return_tensors="pt")
    with torch.inference_mode():
        ref = model.generate(
            **ids, max_new_tokens=30, do_sample=False, repetition_penalty=1.5, pad_token_id=tok.pad_token_id
        )
    expected = tok.decode(ref[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    done = client.completions.create(
        model="policy", prompt=PROMPT, max_tokens=30, temperature=0, extra_body={"repetition_penalty": 1.5}
    )
    assert done.choices[0].text == expected
    assert expected != "23+45=68 68-17=51 #### 51"  # the penalty changed the greedy answer


def test_system_messages_reach_the_model_and_dropped_roles_are_refused(client, policy):
    _, tok = policy
    messages = [{"role": "system", "content": "Add, then subtract."}, *QUESTION]
    done = client.chat.completions.create(
        model="policy", messages=messages, max_tokens=4, temperature=0, extra_body={"return_token_ids": True}
    )
    # the embedded template has no system turn: the message is folded into the first user turn
    assert done.model_extra["prompt_token_ids"] == tok("Q: Add, then subtract.\n\n23+45-17 A: ")["input_ids"]
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model="policy", messages=[*QUESTION, {"role": "tool", "content": "3", "tool_call_id": "c"}]
        )
    assert refused.value.param == "messages" and "'tool'" in refused.value.message


def test_continue_final_message_continues_the_assistants_text(client):
    done = client.chat.completions.create(
        model="policy",
        messages=[*QUESTION, {"role": "assistant", "content": "23+45=68 "}],
        max_tokens=40,
        temperature=0,
        extra_body={"add_generation_prompt": False, "continue_final_message": True},
    )
    assert done.choices[0].message.content == "68-17=51 #### 51"
