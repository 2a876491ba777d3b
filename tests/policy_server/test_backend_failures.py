"""One sequence's failure is its own: the transformers backend's decode batch, driven directly.

Each test submits its requests in one event-loop tick to a backend that waits long enough for
company (`max_wait_s`) that they share one decode batch, and checks that they did (`on_batch`).
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from assay.policy_server.backends import GenerationFailed, GenerationOutput, GenerationRequest
from assay.policy_server.backends.hf import FAULTS, HFBackend, _Job, _next_tokens, _Row
from assay.policy_server.backends.vllm import _sampling_options
from assay.policy_server.config import BatchSettings

pytestmark = pytest.mark.unit

PROMPT = "Q: 23+45-17 A: "
GREEDY = "23+45=68 68-17=51 #### 51"
INNOCENTS = 8


def _in_one_batch(policy, requests: list[GenerationRequest]) -> list[GenerationOutput | BaseException]:
    """Each request as its own generate call, all in one batch; their outputs or exceptions. A batch
    that fails as a whole reports no size: then the test checks that each request failed."""
    model, tokenizer = policy
    batches: list[int] = []

    async def run():
        backend = HFBackend(
            "policy",
            model,
            tokenizer,
            BatchSettings(max_wait_s=1.0),
            on_batch=lambda sequences, _: batches.append(sequences),
        )
        await backend.start()
        try:
            calls = [backend.generate([r]) for r in requests]
            return [
                r if isinstance(r, BaseException) else r[0]
                for r in await asyncio.gather(*calls, return_exceptions=True)
            ]
        finally:
            await backend.close()

    results = asyncio.run(run())
    assert batches in ([], [len(requests)]), batches
    return results


def _innocents(policy) -> list[GenerationRequest]:
    ids = policy[1](PROMPT)["input_ids"]
    return [GenerationRequest(ids, max_tokens=30, temperature=1.0, seed=i) for i in range(INNOCENTS)]


@pytest.mark.parametrize("poison", [{"temperature": 5e-324}, {"top_p": 5e-324}, {"temperature": 1e-39, "top_p": 1e-46}])
def test_a_degenerate_temperature_or_top_p_decodes_greedily_beside_sampled_sequences(policy, poison):
    ids = policy[1](PROMPT)["input_ids"]
    poisoned = GenerationRequest(ids, max_tokens=30, **{"temperature": 1.0, **poison})
    *innocent, greedy = _in_one_batch(policy, [*_innocents(policy), poisoned])
    assert all(isinstance(o, GenerationOutput) and o.finish_reason in ("stop", "length") for o in innocent), innocent
    assert greedy.text == GREEDY


def test_a_sequence_that_fails_fails_its_request_alone(policy):
    ids = policy[1](PROMPT)["input_ids"]
    refused = GenerationRequest(ids, max_tokens=30, temperature=1.0, seed=2**70)  # torch's generators refuse it
    results = _in_one_batch(policy, [*_innocents(policy), refused])
    assert all(isinstance(o, GenerationOutput) and o.finish_reason in ("stop", "length") for o in results[:-1])
    assert isinstance(results[-1], GenerationFailed)
    assert "generating this sequence failed (ValueError: Overflow" in str(results[-1])


def test_a_failed_forward_pass_fails_every_request_with_a_typed_error_of_its_own(policy):
    outside = GenerationRequest([10**6], max_tokens=5, temperature=0.0)  # no such embedding row
    results = _in_one_batch(policy, [*_innocents(policy)[:3], outside])
    assert all(isinstance(r, GenerationFailed) for r in results), results
    assert len({id(r) for r in results}) == len(results)  # not one object raised on several tasks
    assert "generating this batch of sequences failed (IndexError" in str(results[0])


def test_rows_whose_logits_cannot_be_sampled_fail_and_the_others_draw(policy):
    tokenizer = policy[1]
    rows = [_Row(_Job(GenerationRequest([1], max_tokens=4, temperature=t, seed=0), None)) for t in (1.0, 1.0, 0.0)]
    logits = torch.zeros(3, 8)
    logits[0, 3] = 5.0
    logits[1, 2] = float("nan")  # a sampled row, and
    logits[2, :] = float("-inf")  # a greedy one: neither has a distribution to take a token from
    logits[2, 1] = float("inf")
    choice, fault = _next_tokens(logits, rows)
    assert int(choice[0]) in range(8) and fault.tolist() == [0, 1, 1]  # decode fails the rows with a fault
    for r, why in zip(rows[1:], fault[1:].tolist(), strict=True):
        r.fail(FloatingPointError(FAULTS[why]))
    assert all(isinstance(r.output(tokenizer, 0), GenerationFailed) for r in rows[1:])


@pytest.mark.parametrize("poison", [{"temperature": 5e-324}, {"top_p": 5e-324}, {"temperature": 0.0}])
def test_vllm_gets_greedy_for_degenerate_parameters(poison):
    options = _sampling_options(GenerationRequest([1, 2], max_tokens=8, top_k=5, **{"temperature": 0.8, **poison}))
    assert (options["temperature"], options["top_p"], options["top_k"]) == (0.0, 1.0, 0)


def test_vllm_gets_ordinary_parameters_unchanged():
    req = GenerationRequest(
        [1, 2], max_tokens=8, temperature=0.7, top_p=0.9, top_k=5, seed=3, stop=("\n",), top_logprobs=2
    )
    options = _sampling_options(req)
    assert (options["temperature"], options["top_p"], options["top_k"], options["seed"]) == (0.7, 0.9, 5, 3)
    assert (options["max_tokens"], options["stop"], options["logprobs"]) == (8, ["\n"], 2)
