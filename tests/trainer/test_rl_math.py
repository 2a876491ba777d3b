import math

import pytest
import torch

from assay.trainer.rl_math import (
    entropy_from_logits,
    gae,
    gather_logprobs,
    group_advantages,
    kl_estimate,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    token_loss,
)

pytestmark = pytest.mark.unit

NAN = float("nan")


def values(t: torch.Tensor) -> list:
    return t.tolist()


# --- masked reductions ----------------------------------------------------------------------


def test_masked_mean_and_sum_skip_masked_entries_even_nan():
    x = torch.tensor([1.0, NAN, 3.0, 100.0])
    mask = torch.tensor([1, 0, 1, 0])
    assert masked_sum(x, mask).item() == 4.0
    assert masked_mean(x, mask).item() == 2.0  # (1 + 3) / 2
    assert masked_mean(x, mask.bool()).item() == 2.0


def test_masked_mean_of_an_empty_mask_is_zero_not_nan():
    x = torch.tensor([1.0, 2.0])
    assert masked_mean(x, torch.zeros(2)).item() == 0.0


def test_masked_mean_per_row_gives_zero_for_an_empty_row():
    x = torch.tensor([[1.0, 2.0, 6.0], [5.0, NAN, 7.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert values(masked_mean(x, mask, dim=1)) == [1.5, 0.0]
    assert values(masked_sum(x, mask, dim=1)) == [3.0, 0.0]


def test_masked_var_unbiased_and_biased_by_hand():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, NAN])
    mask = torch.tensor([1, 1, 1, 1, 0])
    # mean 2.5, squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5 -> 5/3 unbiased, 5/4 biased
    assert masked_var(x, mask).item() == pytest.approx(5 / 3, rel=1e-6)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(1.25, rel=1e-6)
    assert masked_var(x, torch.tensor([1, 0, 0, 0, 0])).item() == 0.0  # one entry: no spread


def test_masked_whiten_by_hand():
    x = torch.tensor([2.0, 4.0, 6.0, 100.0])
    mask = torch.tensor([1, 1, 1, 0])
    # mean 4, unbiased var (4 + 0 + 4) / 2 = 4, std 2 -> [-1, 0, 1]; padding -> 0
    assert values(masked_whiten(x, mask)) == pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-6)
    # shift_mean=False keeps the mean (TRL): [-1, 0, 1] + 4
    assert values(masked_whiten(x, mask, shift_mean=False)) == pytest.approx([3.0, 4.0, 5.0, 0.0], abs=1e-6)


# --- group advantages -----------------------------------------------------------------------


def test_group_advantages_use_the_sample_std_of_the_group():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    valid = torch.ones(1, 4, dtype=torch.bool)
    # mean 0.5, sample std sqrt(1/3) = 0.57735 (population std would be 0.5 -> +-1.0)
    # A = +-0.5 / (0.57735 + 1e-4) = +-0.86588
    expected = [0.86588, -0.86588, -0.86588, 0.86588]
    assert values(group_advantages(rewards, valid)[0]) == pytest.approx(expected, rel=1e-4)


def test_group_advantages_exclude_invalid_members_and_their_nan():
    rewards = torch.tensor([[1.0, NAN, 0.0, 1.0], [0.0, 1.0, 1.0, 1.0]])
    valid = torch.tensor([[True, False, True, True], [True, True, True, True]])
    adv = group_advantages(rewards, valid)
    assert not adv.isnan().any()
    # group 0 valid [1, 0, 1]: mean 2/3, deviations 1/3, -2/3, 1/3, sample var (2/3)/2 = 1/3
    # A = (1/3) / (0.57735 + 1e-4) = 0.57725, (-2/3) / (0.57745) = -1.15450; invalid -> 0
    assert values(adv[0]) == pytest.approx([0.57725, 0.0, -1.15450, 0.57725], rel=1e-4)
    # group 1 [0, 1, 1, 1], unaffected by group 0: mean 0.75, squared deviations
    # 0.5625 + 3 * 0.0625 = 0.75, sample var 0.75 / 3 = 0.25, std 0.5 -> -0.75 / 0.5001, 0.25 / 0.5001
    assert values(adv[1]) == pytest.approx([-1.4997, 0.4999, 0.4999, 0.4999], rel=1e-4)


def test_group_advantages_single_valid_member_and_empty_group_get_zero():
    rewards = torch.tensor([[5.0, NAN, NAN], [NAN, NAN, NAN]])
    valid = torch.tensor([[True, False, False], [False, False, False]])
    for scale in ("std", "none", "batch"):
        assert values(group_advantages(rewards, valid, scale=scale)) == [[0.0] * 3, [0.0] * 3]


def test_group_advantages_scale_none_only_centres():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [3.0, 1.0, NAN, 2.0]])
    valid = torch.tensor([[True] * 4, [True, True, False, True]])
    adv = group_advantages(rewards, valid, scale="none")
    assert values(adv) == [[0.5, -0.5, -0.5, 0.5], [1.0, -1.0, 0.0, 0.0]]


def test_group_advantages_scale_batch_divides_by_the_std_of_all_valid_rewards():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0, NAN], [1.0, 1.0, 1.0, 0.0, NAN]])
    valid = torch.tensor([[True] * 4 + [False]] * 2)
    # the 8 valid rewards: mean 5/8, squared deviations 5 * (3/8)^2 + 3 * (5/8)^2 = 1.875,
    # sample std sqrt(1.875 / 7) = 0.51755; centring stays per group (means 0.5 and 0.75)
    adv = group_advantages(rewards, valid, scale="batch")
    assert values(adv[0]) == pytest.approx([0.96591, -0.96591, -0.96591, 0.96591, 0.0], rel=1e-4)
    assert values(adv[1]) == pytest.approx([0.48295, 0.48295, 0.48295, -1.44886, 0.0], rel=1e-4)


def test_group_advantages_reject_an_unknown_scale():
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), scale="group")


# --- token loss normalisation ---------------------------------------------------------------


RAGGED_LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, NAN]])
RAGGED_MASK = torch.tensor([[1, 1, 1], [1, 0, 0]])


def test_token_loss_variants_differ_on_ragged_masks():
    # sequence_mean: (mean(1,2,3) + mean(4)) / 2 = (2 + 4) / 2 = 3
    assert token_loss(RAGGED_LOSS, RAGGED_MASK).item() == pytest.approx(3.0)
    # token_mean: (1 + 2 + 3 + 4) / 4 = 2.5
    assert token_loss(RAGGED_LOSS, RAGGED_MASK, kind="token_mean").item() == pytest.approx(2.5)
    # constant: 10 / (batch 2 * seq 3) = 5/3; with max_tokens=5: 10 / 10 = 1
    assert token_loss(RAGGED_LOSS, RAGGED_MASK, kind="constant").item() == pytest.approx(5 / 3)
    assert token_loss(RAGGED_LOSS, RAGGED_MASK, kind="constant", max_tokens=5).item() == pytest.approx(1.0)


def test_token_loss_rejects_an_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        token_loss(RAGGED_LOSS, RAGGED_MASK, kind="mean")


# --- KL estimators --------------------------------------------------------------------------


def test_kl_estimators_by_hand():
    logp, ref_logp = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    # lr = ref_logp - logp = -ln 2
    assert kl_estimate(logp, ref_logp, "k1").item() == pytest.approx(0.693147, rel=1e-5)  # ln 2
    assert kl_estimate(logp, ref_logp, "k2").item() == pytest.approx(0.240227, rel=1e-5)  # ln2^2/2
    # k3 = e^-ln2 + ln 2 - 1 = 0.5 + 0.693147 - 1
    assert kl_estimate(logp, ref_logp, "k3").item() == pytest.approx(0.193147, rel=1e-5)
    assert kl_estimate(logp, ref_logp).item() == pytest.approx(0.193147, rel=1e-5)  # default k3


def test_k3_is_nonnegative_and_zero_when_the_policies_agree():
    g = torch.Generator().manual_seed(0)
    logp, ref_logp = -5 * torch.rand(1000, generator=g), -5 * torch.rand(1000, generator=g)
    assert (kl_estimate(logp, ref_logp, "k3") >= 0).all()
    assert (kl_estimate(logp, ref_logp, "k1") < 0).any()  # k1 alone can go negative
    assert values(kl_estimate(logp, logp, "k3")) == [0.0] * 1000


def test_k1_and_k3_sample_means_approximate_the_true_kl():
    p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.3, 0.5])
    true_kl = 0.3 * math.log(2.5)  # 0.5 ln(0.5/0.2) + 0 + 0.2 ln(0.2/0.5) = 0.274887
    g = torch.Generator().manual_seed(0)
    x = torch.multinomial(p, 100_000, replacement=True, generator=g)
    logp, ref_logp = p.log()[x], q.log()[x]
    # k1 has std ~0.72 per sample -> standard error ~0.0023 at n = 1e5
    assert kl_estimate(logp, ref_logp, "k1").mean().item() == pytest.approx(true_kl, abs=0.01)
    assert kl_estimate(logp, ref_logp, "k3").mean().item() == pytest.approx(true_kl, abs=0.01)


def test_kl_estimate_rejects_an_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        kl_estimate(torch.zeros(1), torch.zeros(1), "k4")


# --- GAE ------------------------------------------------------------------------------------


def test_gae_three_tokens_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    vals = torch.tensor([[0.5, 0.6, 0.7]])
    adv, ret = gae(rewards, vals, torch.ones(1, 3), gamma=0.9, lam=0.8)
    # deltas: d2 = 1 + 0 - 0.7 = 0.3; d1 = 0 + 0.9*0.7 - 0.6 = 0.03; d0 = 0.9*0.6 - 0.5 = 0.04
    # gamma*lam = 0.72: A2 = 0.3; A1 = 0.03 + 0.72*0.3 = 0.246; A0 = 0.04 + 0.72*0.246 = 0.21712
    assert values(adv[0]) == pytest.approx([0.21712, 0.246, 0.3], rel=1e-5)
    assert values(ret[0]) == pytest.approx([0.71712, 0.846, 1.0], rel=1e-5)  # A + V


def test_gae_ragged_batch_does_not_bootstrap_from_padding():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 5.0]])
    vals = torch.tensor([[0.5, 0.6, 0.7], [0.5, 0.6, 9.9]])  # 5.0 and 9.9 are padding garbage
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, vals, mask, gamma=0.9, lam=0.8)
    # short row: A1 = 1 + 0 - 0.6 = 0.4; A0 = 0.04 + 0.72*0.4 = 0.328; padding 0
    assert values(adv[1]) == pytest.approx([0.328, 0.4, 0.0], rel=1e-5)
    assert values(ret[1]) == pytest.approx([0.828, 1.0, 0.0], rel=1e-5)
    assert values(adv[0]) == pytest.approx([0.21712, 0.246, 0.3], rel=1e-5)
    alone_adv, alone_ret = gae(rewards[1:, :2], vals[1:, :2], mask[1:, :2], gamma=0.9, lam=0.8)
    assert values(adv[1, :2]) == pytest.approx(values(alone_adv[0]), rel=1e-6)
    assert values(ret[1, :2]) == pytest.approx(values(alone_ret[0]), rel=1e-6)


# --- logits ---------------------------------------------------------------------------------


def test_gather_logprobs_equals_log_softmax_then_gather():
    g = torch.Generator().manual_seed(0)
    logits = 10 * torch.randn(2, 4, 11, generator=g)
    tokens = torch.randint(0, 11, (2, 4), generator=g)
    expected = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    got = gather_logprobs(logits, tokens)
    assert got.shape == (2, 4)
    assert torch.allclose(got, expected, atol=1e-5)


def test_gather_logprobs_by_hand():
    logits = torch.tensor([[[0.0, math.log(3.0)]]])  # softmax [0.25, 0.75]
    got = gather_logprobs(logits, torch.tensor([[1]]))
    assert got.item() == pytest.approx(math.log(0.75), rel=1e-6)


def test_entropy_of_uniform_is_log_vocab_even_for_huge_logits():
    h = entropy_from_logits(torch.zeros(2, 3, 7))
    assert h.shape == (2, 3)
    assert values(h.flatten()) == pytest.approx([math.log(7)] * 6, rel=1e-6)
    huge = entropy_from_logits(torch.full((7,), 1000.0))
    assert huge.item() == pytest.approx(math.log(7), rel=1e-5)


def test_entropy_by_hand_and_with_a_masked_out_token():
    # p = [0.25, 0.75]: H = 0.25 ln 4 + 0.75 ln(4/3) = 0.562335
    assert entropy_from_logits(torch.tensor([0.0, math.log(3.0)])).item() == pytest.approx(0.562335, rel=1e-5)
    # a -inf logit is a zero-probability token: same entropy, no NaN
    logits = torch.tensor([0.0, math.log(3.0), float("-inf")])
    assert entropy_from_logits(logits).item() == pytest.approx(0.562335, rel=1e-5)
