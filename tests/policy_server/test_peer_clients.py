"""Inference-time tools written for OpenAI-compatible servers, run against the policy server unchanged.

- its_hub 1.2 (installed, `its_hub[lm]`): its `OpenAICompatibleLanguageModel` posts to
  /v1/chat/completions with aiohttp, and for any endpoint whose URL does not say "openai" adds a
  literal `"extra_body"` key (vLLM's `add_generation_prompt`, `continue_final_message`,
  `include_stop_str_in_output`). Its own self-consistency and its step generation (what its beam
  search and particle filtering call) run end to end on the embedded policy.
- optillm 0.4.0's best-of-N and self-consistency (copied, see `optillm_approaches.py`), called as
  the library functions with an `openai.OpenAI` client. They ask `max_tokens` 4096 (and 256 for
  bon's ratings) of a model whose context holds 256 tokens: against a server started with
  `--clamp-max-tokens` that is lowered to what the context has room for; without it, refused.
"""

from __future__ import annotations

import asyncio

import openai
import pytest

from assay.policy_server.config import Limits, ServerConfig
from assay.policy_server.server import BackgroundServer
from tests.policy_server.optillm_approaches import advanced_self_consistency_approach, best_of_n_sampling

pytestmark = pytest.mark.service

ANSWER = "23+45=68 68-17=51 #### 51"
SYSTEM = "You are a careful calculator."


@pytest.fixture(scope="module")
def its_hub_lm(server):
    from its_hub.core.lms.openai_lm import OpenAICompatibleLanguageModel

    return OpenAICompatibleLanguageModel(
        endpoint=f"{server.http_url}/v1", api_key="unused", model_name="policy", max_completion_tokens=40, max_tries=1
    )


def test_its_hub_sends_a_literal_extra_body_and_generates(its_hub_lm):
    request = its_hub_lm._prepare_request_data([{"role": "user", "content": "x"}], include_stop_str_in_output=False)
    assert "extra_body" in request  # what makes its_hub 1.2 fail against a strict server

    async def once():
        try:
            return await its_hub_lm.agenerate_single([{"role": "user", "content": "23+45-17"}], temperature=0.0)
        finally:
            await its_hub_lm.close()  # its aiohttp session, cached per event loop

    reply = asyncio.run(once())
    assert reply["role"] == "assistant" and reply["content"] == ANSWER


def test_its_hub_self_consistency_votes_over_the_policys_samples(its_hub_lm):
    from its_hub.core.algorithms.self_consistency import SelfConsistency, create_regex_projection_function

    vote = SelfConsistency(create_regex_projection_function(r"####\s*(-?\d+)"))
    result = vote.infer(its_hub_lm, "23+45-17", budget=6, return_response_only=False)
    assert len(result.responses) == 6 and sum(result.response_counts.values()) == 6
    assert all(r["role"] == "assistant" and r["content"] for r in result.responses)


def test_its_hub_step_generation_continues_the_assistants_steps(its_hub_lm):
    """Steps end at a space, kept in the text (`include_stop_str_in_output`); each later step continues the
    assistant message of the steps so far (`continue_final_message`), as its beam search does."""
    from its_hub.core.lms.step_generation import StepGeneration

    steps = StepGeneration(
        max_steps=5, step_token=" ", stop_token="####", temperature=0.0, include_stop_str_in_output=True
    )
    so_far: list[str] = []
    stopped = False
    while not stopped:
        step, stopped = steps.forward(its_hub_lm, "23+45-17", so_far)
        so_far.append(step)
    assert so_far == ["23+45=68 ", "68-17=51 ", "#### "]


@pytest.fixture(scope="module")
def clamped(tiny_chat):
    """The tiny-chat policy (ChatML, a 512-token context: optillm's rating prompts do not fit the embedded
    policy's 256), served with `--clamp-max-tokens`: a max_tokens beyond the context is lowered to the room."""
    config = ServerConfig(
        port=0, grpc_port=None, models={"policy": tiny_chat / "policy"}, limits=Limits(clamp_max_tokens=True)
    )
    with BackgroundServer(config) as s:
        yield openai.OpenAI(base_url=f"{s.http_url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_max_tokens_beyond_the_context_is_refused_or_clamped(client, clamped):
    question = [{"role": "user", "content": "What is 23+45-17?"}]
    with pytest.raises(openai.BadRequestError) as refused:  # by default, as vLLM and OpenAI refuse it
        client.chat.completions.create(model="policy", messages=question, max_tokens=4096)
    assert refused.value.code == "context_length_exceeded" and refused.value.param == "max_tokens"
    done = clamped.chat.completions.create(
        model="policy", messages=question, max_tokens=4096, extra_body={"ignore_eos": True}
    )
    assert done.usage.total_tokens == 512 and done.choices[0].finish_reason == "length"


def test_optillm_best_of_n_with_its_4096_token_budget(clamped):
    best, tokens = best_of_n_sampling(SYSTEM, "What is 23+45-17?", clamped, "policy", n=3)
    assert not best.startswith("Error") and best.strip() and tokens > 0


def test_optillm_self_consistency_clusters_the_policys_answers(clamped):
    answer, tokens = advanced_self_consistency_approach(SYSTEM, "What is 23+45-17?", clamped, "policy")
    assert answer != "No consistent answer found." and tokens > 0
