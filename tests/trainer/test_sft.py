import itertools

import torch

from arith import world
from trainer.sft import IGNORE, SFTConfig, collate, encode_example, lr_lambda, train_sft


def test_prompt_tokens_are_masked_and_completion_ends_with_eos(tokenizer):
    ids, labels = encode_example(tokenizer, "Q: 1+2 A: ", "1+2=3 #### 3")
    n_prompt = len(tokenizer("Q: 1+2 A: ")["input_ids"])
    assert labels[:n_prompt] == [IGNORE] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[n_prompt:-1]) == "1+2=3 #### 3"


def test_collate_right_pads_and_masks():
    ids, mask, labels = collate([([5, 6, 7], [IGNORE, 6, 7]), ([5], [5])], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [5, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert labels.tolist() == [[IGNORE, 6, 7], [5, IGNORE, IGNORE]]


def test_loss_decreases_on_a_fixed_batch(tiny_lm, tokenizer):
    batch = [(p.prompt, p.solution) for p in world.take("train", 8, seed=0)]
    losses = train_sft(tiny_lm, tokenizer, itertools.cycle(batch), SFTConfig(steps=40, batch_size=8, lr=3e-3, warmup_steps=0))
    assert losses[-1] < 0.6 * losses[0]


def test_schedule_warms_up_then_decays_to_the_floor():
    f = lr_lambda(SFTConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1))
    assert f(0) == 0.1 and f(9) == 1.0
    assert f(50) < 1.0 and abs(f(100) - 0.1) < 1e-9


def test_config_refuses_nonsense():
    import pytest

    with pytest.raises(ValueError):
        SFTConfig(steps=0)
    with pytest.raises(ValueError):
        SFTConfig(steps=10, warmup_steps=20)
