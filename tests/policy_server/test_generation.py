"""What the policy server generates: logprobs, seeds, stop strings, sampling filters."""

from __future__ import annotations

import httpx
import pytest
import torch

from assay.policy_server.protocol import ChatCompletionResponse, CompletionResponse

pytestmark = pytest.mark.service

PROMPTS = ["Q: 23+45-17 A: ", "Q: 91-38 A: ", "Q: 12+7+30-5 A: "]  # different lengths: left padding
GREEDY = "23+45=68 68-17=51 #### 51"


def complete(server, **body) -> CompletionResponse:
    r = httpx.post(f"{server.http_url}/v1/completions", json={"model": "policy", **body}, timeout=60)
    assert r.status_code == 200, r.text
    return CompletionResponse.model_validate_json(r.content)


@torch.inference_mode()
def teacher_forced(model, ids: list[int], n_prompt: int) -> torch.Tensor:
    """[completion tokens, vocab]: log-probs of each completion position, from one plain forward pass."""
    logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    return logits.log_softmax(-1)[n_prompt - 1 : len(ids) - 1]


def test_completion_logprobs_match_a_teacher_forced_forward_pass(server, policy):
    model, tok = policy
    # temperature 0.7 and top_p: sampling is shaped, the reported logprobs must stay the raw model's
    done = complete(
        server,
        prompt=PROMPTS,
        n=2,
        max_tokens=40,
        temperature=0.7,
        top_p=0.95,
        seed=11,
        logprobs=5,
        return_token_ids=True,
    )
    assert len(done.choices) == 6
    for choice in done.choices:
        ids, out = choice.prompt_token_ids, choice.token_ids
        lp = choice.logprobs
        want = teacher_forced(model, ids + out, len(ids))  # [len(out), vocab]
        assert lp.tokens == [tok.decode([i]) for i in out]
        assert lp.token_logprobs == pytest.approx([float(want[j, i]) for j, i in enumerate(out)], abs=1e-4)
        for j, top in enumerate(lp.top_logprobs):
            values, idx = want[j].topk(5)
            assert list(top) == [tok.decode([int(i)]) for i in idx]  # best first
            assert list(top.values()) == pytest.approx(values.tolist(), abs=1e-4)
        # offsets index prompt + completion text
        text = tok.decode(ids, skip_special_tokens=True) + choice.text
        visible = [(o, t) for o, t in zip(lp.text_offset, lp.tokens, strict=True) if t != "</s>"]
        assert all(text[o : o + len(t)] == t for o, t in visible)


def test_chat_logprobs_match_a_teacher_forced_forward_pass(server, policy):
    model, tok = policy
    body = {
        "model": "policy",
        "messages": [{"role": "user", "content": "91-38"}],
        "n": 3,
        "temperature": 1.3,
        "seed": 5,
        "logprobs": True,
        "top_logprobs": 2,
        "return_token_ids": True,
    }
    r = httpx.post(f"{server.http_url}/v1/chat/completions", json=body, timeout=60)
    done = ChatCompletionResponse.model_validate_json(r.content)
    ids = done.prompt_token_ids
    assert ids == tok("Q: 91-38 A: ")["input_ids"]
    for choice in done.choices:
        want = teacher_forced(model, ids + choice.token_ids, len(ids))
        got = choice.logprobs.content
        assert [t.logprob for t in got] == pytest.approx(
            [float(want[j, i]) for j, i in enumerate(choice.token_ids)], abs=1e-4
        )
        for j, t in enumerate(got):
            assert [a.logprob for a in t.top_logprobs] == pytest.approx(want[j].topk(2).values.tolist(), abs=1e-4)


def test_same_seed_same_completions_and_list_prompts_sample_as_single_ones(server):
    hot = dict(max_tokens=30, temperature=2.0, n=4)  # hot enough that different seeds must differ
    a = complete(server, prompt=PROMPTS[:2], seed=123, logprobs=0, **hot)
    b = complete(server, prompt=PROMPTS[:2], seed=123, logprobs=0, **hot)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert [c.logprobs.token_logprobs for c in a.choices] == [c.logprobs.token_logprobs for c in b.choices]
    assert len({c.text for c in a.choices}) > 1  # the n choices are not copies of one another
    other = complete(server, prompt=PROMPTS[:2], seed=124, **hot)
    assert [c.text for c in other.choices] != [c.text for c in a.choices]
    # the second prompt alone, with the same seed, gets the same completions as inside the list
    alone = complete(server, prompt=PROMPTS[1], seed=123, **hot)
    assert [c.text for c in alone.choices] == [c.text for c in a.choices[4:]]


def test_stop_strings_end_the_text_before_them(server):
    assert complete(server, prompt=PROMPTS[0], temperature=0, max_tokens=40).choices[0].text == GREEDY
    done = complete(
        server, prompt=PROMPTS[0], temperature=0, max_tokens=40, stop=["####", " 68-"], return_token_ids=True
    )
    choice = done.choices[0]
    assert choice.text == "23+45=68" and choice.finish_reason == "stop"
    assert len(choice.token_ids) == len("23+45=68 68-")  # the tokens that completed the stop are generated
    assert done.usage.completion_tokens == len(choice.token_ids)
    single = complete(server, prompt=PROMPTS[0], temperature=0, max_tokens=40, stop="####").choices[0]
    assert single.text == "23+45=68 68-17=51 "


def test_top_k_1_and_a_tiny_top_p_sample_the_greedy_completion(server):
    for shape in ({"top_k": 1}, {"top_p": 1e-6}):
        done = complete(server, prompt=PROMPTS[0], temperature=1.5, max_tokens=40, n=3, seed=9, **shape)
        assert [c.text for c in done.choices] == [GREEDY] * 3, shape


def test_ignore_eos_generates_max_tokens(server):
    done = complete(server, prompt=PROMPTS[0], temperature=0, max_tokens=50, ignore_eos=True, logprobs=0)
    choice = done.choices[0]
    assert choice.finish_reason == "length" and len(choice.logprobs.tokens) == 50
    assert "</s>" in choice.logprobs.tokens and choice.text.startswith(GREEDY)


def test_token_id_prompts_answer_as_their_text(server, policy):
    _, tok = policy
    ids = [tok(p)["input_ids"] for p in PROMPTS[:2]]
    by_ids = complete(server, prompt=ids, temperature=0, max_tokens=40)
    by_text = complete(server, prompt=PROMPTS[:2], temperature=0, max_tokens=40)
    assert [c.text for c in by_ids.choices] == [c.text for c in by_text.choices]
    assert complete(server, prompt=ids[0], temperature=0, max_tokens=40).choices[0].text == GREEDY
