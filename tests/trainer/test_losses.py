import math

import pytest
import torch

from assay.trainer.reward_model import bradley_terry_loss, listwise_loss, margin_ranking_loss

pytestmark = pytest.mark.unit


def test_bradley_terry_matches_hand_computed_values():
    chosen = torch.tensor([2.0, 0.0])
    rejected = torch.tensor([1.0, 1.0])
    # -log sigmoid(1) = log(1 + e^-1); -log sigmoid(-1) = log(1 + e^1)
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1))) / 2
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(expected, rel=1e-6)
    assert bradley_terry_loss(torch.tensor([0.0]), torch.tensor([0.0])).item() == pytest.approx(math.log(2))


def test_listwise_is_softmax_cross_entropy_with_the_best_as_target():
    scores = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    best = torch.tensor([2, 0])
    z = math.exp(1) + math.exp(2) + math.exp(3)
    expected = (-math.log(math.exp(3) / z) + math.log(3)) / 2
    assert listwise_loss(scores, best).item() == pytest.approx(expected, rel=1e-6)


def test_listwise_with_two_candidates_equals_bradley_terry():
    c, r = torch.tensor([0.3, -1.2]), torch.tensor([0.9, 0.4])
    pair = torch.stack([c, r], dim=1)
    assert listwise_loss(pair, torch.zeros(2, dtype=torch.long)).item() == pytest.approx(
        bradley_terry_loss(c, r).item(), rel=1e-6
    )


def test_margin_ranking_matches_hand_computed_values():
    chosen = torch.tensor([3.0, 1.0, 0.0])
    rejected = torch.tensor([1.0, 0.5, 0.0])
    # margins: max(0, 1-2)=0, max(0, 1-0.5)=0.5, max(0, 1-0)=1 -> mean 0.5
    assert margin_ranking_loss(chosen, rejected, margin=1.0).item() == pytest.approx(0.5)
    assert margin_ranking_loss(chosen, rejected, margin=0.0).item() == pytest.approx(0.0)


def test_losses_push_the_chosen_score_up():
    chosen = torch.tensor([0.0], requires_grad=True)
    rejected = torch.tensor([0.0], requires_grad=True)
    bradley_terry_loss(chosen, rejected).backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()
