import pytest
import torch

from assay.generation import GREEDY_BELOW, SamplingParams, _filter_logits, is_greedy, sample

pytestmark = pytest.mark.unit


def _teacher_forced_logprobs(model, tokenizer, prompt, token_ids):
    ids = tokenizer(prompt)["input_ids"] + token_ids
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
    start = len(ids) - len(token_ids)
    return [logits[start - 1 + i, t].item() for i, t in enumerate(token_ids)]


def test_logprobs_match_a_teacher_forced_forward_pass_under_left_padding(tiny_lm, tokenizer):
    prompts = ["Q: 1+2 A: ", "Q: 23+45-17 A: "]  # different lengths: the short one is left-padded
    out = sample(tiny_lm, tokenizer, prompts, SamplingParams(temperature=1.0, max_new_tokens=12), n=2, seed=3)
    for prompt, samples in zip(prompts, out):
        for s in samples:
            ids = s.token_ids + ([tokenizer.eos_token_id] if s.finish_reason == "stop" else [])
            expected = _teacher_forced_logprobs(tiny_lm, tokenizer, prompt, ids)
            assert s.logprobs == pytest.approx(expected, abs=1e-4)


def test_same_seed_same_samples_other_seed_other_samples(tiny_lm, tokenizer):
    params = SamplingParams(temperature=1.0, max_new_tokens=16)
    a = sample(tiny_lm, tokenizer, ["Q: 1+2 A: "], params, n=4, seed=1)
    b = sample(tiny_lm, tokenizer, ["Q: 1+2 A: "], params, n=4, seed=1)
    c = sample(tiny_lm, tokenizer, ["Q: 1+2 A: "], params, n=4, seed=2)
    assert [s.text for s in a[0]] == [s.text for s in b[0]]
    assert [s.text for s in a[0]] != [s.text for s in c[0]]


def test_greedy_is_the_argmax_chain(tiny_lm, tokenizer):
    out = sample(tiny_lm, tokenizer, ["Q: 5+5 A: "], SamplingParams(temperature=0, max_new_tokens=6), n=2)
    first, second = out[0]
    assert first.text == second.text
    ids = tokenizer("Q: 5+5 A: ")["input_ids"]
    with torch.no_grad():
        expected = tiny_lm(input_ids=torch.tensor([ids])).logits[0, -1].argmax().item()
    assert first.token_ids[0] == expected


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(_filter_logits(logits, 2, 1.0)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(_filter_logits(logits, 0, 0.79)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(_filter_logits(logits, 0, 0.81)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(_filter_logits(logits, 0, 0.1)).tolist() == [[True, False, False, False]]


def test_a_top_p_that_is_zero_in_float32_keeps_the_most_likely_token():
    logits = torch.log(torch.tensor([[0.3, 0.5, 0.15, 0.05]]))
    for top_p in (5e-324, 1e-46):  # 0.0 once the comparison runs in float32
        assert torch.isfinite(_filter_logits(logits, 0, top_p)).tolist() == [[False, True, False, False]]


@pytest.mark.parametrize(
    "shape",
    [{"temperature": 5e-324}, {"temperature": 1e-39}, {"top_p": 5e-324}, {"temperature": 1e-300, "top_p": 1e-300}],
)
def test_degenerate_temperature_or_top_p_decodes_greedily(tiny_lm, tokenizer, shape):
    prompts = ["Q: 1+2 A: ", "Q: 23+45-17 A: "]
    greedy = sample(tiny_lm, tokenizer, prompts, SamplingParams(temperature=0, max_new_tokens=10))
    got = sample(tiny_lm, tokenizer, prompts, SamplingParams(**{"temperature": 1.0, **shape}, max_new_tokens=10))
    assert [[s.token_ids for s in row] for row in got] == [[s.token_ids for s in row] for row in greedy]


def test_the_greedy_threshold():
    assert is_greedy(0.0, 1.0) and is_greedy(GREEDY_BELOW / 2, 1.0) and is_greedy(1.0, GREEDY_BELOW / 2)
    assert is_greedy(float("nan"), 1.0) and is_greedy(1.0, float("nan"))
    assert not is_greedy(GREEDY_BELOW, GREEDY_BELOW) and not is_greedy(0.7, 0.9)


def test_sampling_params_refuse_nonsense():
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError):
        SamplingParams(max_new_tokens=0)
