"""The decode loop's speed options change nothing it generates: a static KV cache (and a compiled
step) give the same greedy and seeded completions, logprobs, top logprobs and stops as the default
dynamic cache, batch after batch, on the embedded policy."""

from __future__ import annotations

import dataclasses
import threading

import pytest

from assay.policy_server.backends import GenerationOutput, GenerationRequest
from assay.policy_server.backends.hf import _Job, decode
from assay.policy_server.backends.steps import Steps
from assay.policy_server.config import BatchSettings

pytestmark = pytest.mark.unit

PROMPTS = ["Q: 23+45-17 A: ", "Q: 1+2 A: ", "Q: 99-12+13-1 A: ", "Q: 50+50 A: "]


def _requests(tokenizer, max_tokens: int = 24) -> list[GenerationRequest]:
    """Prompts of different lengths (left padding), greedy and sampled rows, a stop string, top logprobs."""
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    return [
        GenerationRequest(ids[0], max_tokens=max_tokens, temperature=0.0, top_logprobs=2),
        GenerationRequest(ids[1], max_tokens=max_tokens, temperature=1.5, seed=7),
        GenerationRequest(ids[2], max_tokens=max_tokens, temperature=1.0, top_p=0.9, top_k=20, seed=8, stop=(" ",)),
        GenerationRequest(ids[3], max_tokens=max_tokens // 2, temperature=1.0, seed=9, ignore_eos=True),
    ]


def _decode(policy, requests, steps: Steps | None) -> list[GenerationOutput]:
    model, tokenizer = policy
    outs = decode(model, tokenizer, [_Job(r, threading.Event()) for r in requests], 0, steps)
    assert all(isinstance(o, GenerationOutput) for o in outs), outs
    return outs  # type: ignore[return-value]


def _assert_same(got: list[GenerationOutput], want: list[GenerationOutput]) -> None:
    for g, w in zip(got, want, strict=True):
        assert (g.token_ids, g.text, g.finish_reason, g.stop_reason) == (
            w.token_ids,
            w.text,
            w.finish_reason,
            w.stop_reason,
        )
        assert g.logprobs == pytest.approx(w.logprobs, abs=1e-4)
        if w.top_logprobs is not None:
            assert [[t for t, _ in step] for step in g.top_logprobs] == [
                [t for t, _ in step] for step in w.top_logprobs
            ]


def test_a_static_cache_generates_what_the_dynamic_one_does_batch_after_batch(policy):
    requests = _requests(policy[1])
    want = _decode(policy, requests, None)
    assert {o.finish_reason for o in want} >= {"stop", "length"} and want[2].stop_reason == " "
    static = Steps(policy[0], BatchSettings(kv_cache="static"))
    _assert_same(_decode(policy, requests, static), want)
    # Another shape in between (a new cache), then the first shape again (a cache reset, not rebuilt).
    _decode(policy, requests[:2], static)
    _assert_same(_decode(policy, requests, static), want)
    again = _decode(policy, requests, static)
    _assert_same(again, want)


def test_a_seeded_row_draws_the_same_alone_as_in_a_batch_with_a_static_cache(policy):
    requests = _requests(policy[1])
    static = Steps(policy[0], BatchSettings(kv_cache="static"))
    together = _decode(policy, requests, static)
    alone = _decode(policy, [requests[1]], static)
    assert alone[0].token_ids == together[1].token_ids


def test_the_static_cache_is_sized_in_powers_of_two_and_kept_for_its_shape(policy):
    model, tokenizer = policy
    steps = Steps(model, BatchSettings(kv_cache="static"))
    prompt = tokenizer(PROMPTS[0])["input_ids"]
    steps.start([prompt], tokenizer.pad_token_id, max_new=100)
    first = steps._cache
    assert first is not None and steps._cache_shape == (1, 128)
    steps.start([prompt], tokenizer.pad_token_id, max_new=90)
    assert steps._cache is first  # same shape: reset, same tensors (what a captured CUDA graph needs)


def test_compile_needs_a_static_cache():
    with pytest.raises(ValueError, match="compile needs kv_cache static"):
        BatchSettings(compile=True)


@pytest.mark.slow
def test_a_compiled_step_generates_what_the_eager_one_does(policy):
    requests = _requests(policy[1], max_tokens=8)
    want = _decode(policy, requests, None)
    compiled = Steps(policy[0], BatchSettings(kv_cache="static", compile=True))
    _assert_same(_decode(policy, requests, compiled), want)


def test_rows_with_min_p_repetition_penalty_and_min_tokens_batch_with_neutral_rows_unchanged(policy):
    """Each row keeps its own sampling extensions: rows with them draw what they draw alone, and rows at the
    neutral values (the defaults) draw what they draw without them in the batch."""
    _, tokenizer = policy
    neutral = _requests(tokenizer)
    extended = [
        dataclasses.replace(neutral[1], min_p=0.3, repetition_penalty=1.3),
        dataclasses.replace(neutral[2], repetition_penalty=0.8, min_tokens=6),  # its stop string only after 6
        dataclasses.replace(neutral[0], repetition_penalty=1.5, min_tokens=20),  # greedy
    ]
    together = _decode(policy, [*neutral, *extended], None)
    _assert_same(together[: len(neutral)], _decode(policy, neutral, None))
    _assert_same(together[len(neutral) :], [_decode(policy, [r], None)[0] for r in extended])
    assert len(together[-1].token_ids) >= 20 and tokenizer.eos_token_id not in together[-1].token_ids[:19]
    assert len(together[-2].token_ids) >= 6
