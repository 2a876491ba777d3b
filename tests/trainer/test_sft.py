import itertools
import math

import pytest
import torch

from assay.arith import world
from assay.trainer.config import SFTConfig
from assay.trainer.sft import IGNORE, collate, encode_example, lr_lambda, train_sft

pytestmark = pytest.mark.unit


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
    losses = train_sft(
        tiny_lm, tokenizer, itertools.cycle(batch), SFTConfig(steps=40, batch_size=8, lr=3e-3, warmup_steps=0)
    )
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


def test_sft_loss_without_smoothing_is_shifted_cross_entropy():
    from assay.trainer.sft import sft_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6)
    labels = torch.tensor([[IGNORE, 3, 1, 2], [IGNORE, IGNORE, 5, IGNORE]])
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 6), labels[:, 1:].reshape(-1))
    assert sft_loss(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)


def test_class_restricted_label_smoothing_by_hand():
    from assay.trainer.sft import sft_loss

    # one predicted position over a 4-token vocabulary; tokens 1 and 2 form the smoothed class
    logp = torch.log(torch.tensor([0.1, 0.6, 0.2, 0.1]))
    logits = torch.stack([logp, torch.zeros(4)])[None]  # [1, 2, 4]: position 0 predicts label at 1
    ids = torch.tensor([1, 2])
    in_class = sft_loss(logits, torch.tensor([[IGNORE, 1]]), 0.1, ids).item()
    expected = 0.9 * -math.log(0.6) + 0.1 * (-(math.log(0.6) + math.log(0.2)) / 2)
    assert in_class == pytest.approx(expected, rel=1e-5)
    # a target outside the class is not smoothed
    assert sft_loss(logits, torch.tensor([[IGNORE, 3]]), 0.1, ids).item() == pytest.approx(-math.log(0.1), rel=1e-5)
    # whole-vocabulary smoothing spreads over every token
    whole = sft_loss(logits, torch.tensor([[IGNORE, 1]]), 0.1).item()
    assert whole == pytest.approx(0.9 * -math.log(0.6) + 0.1 * -logp.mean().item(), rel=1e-5)
