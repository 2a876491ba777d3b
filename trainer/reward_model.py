"""Reward-model training: outcome RMs from rankings, process RMs from step labels.

Outcome RMs (sequence classification, one logit) learn from candidates ranked for one prompt,
with any of the three losses the RLHF literature uses:

- Bradley-Terry pairwise:  L = -log sigmoid(r_chosen - r_rejected)
- K-wise listwise:         L = -log softmax(r_1..r_K)[best]        (cross-entropy, best = target)
- margin ranking:          L = max(0, margin - (r_chosen - r_rejected))

Process RMs (token classification, one logit per token) learn a correct/incorrect label at the
last token of each step: L = BCE(sigmoid(logit at step end), label).

Both train on `config.hardware` (`trainer.models`: device, autocast over float32 weights, gradient
checkpointing), with the losses computed in float32.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from assay.scoring import outcome_scores, score_outcome, step_token_positions
from assay.trainer.config import RMConfig, SFTConfig
from assay.trainer.models import Precision, device_of, prepare
from assay.trainer.sft import make_update, step_guard

# --- losses -------------------------------------------------------------------------------


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """[pairs], [pairs] -> scalar: mean of -log sigmoid(r_chosen - r_rejected)."""
    return -F.logsigmoid(chosen - rejected).mean()


def listwise_loss(scores: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
    """[groups, K], [groups] -> scalar: softmax cross-entropy with the best candidate as target."""
    return F.cross_entropy(scores, best)


def margin_ranking_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """[pairs], [pairs] -> scalar: mean of max(0, margin - (r_chosen - r_rejected))."""
    return torch.clamp(margin - (chosen - rejected), min=0).mean()


# --- outcome reward model -----------------------------------------------------------------


@dataclass
class RankedGroup:
    """Candidates for one prompt; `best` indexes the preferred one, `worse` the dispreferred."""

    prompt: str
    responses: list[str]
    best: int
    worse: list[int]

    def __post_init__(self) -> None:
        if not self.worse or self.best in self.worse:
            raise ValueError("a ranked group needs a best candidate and at least one worse one")


def _group_batch(groups: Sequence[RankedGroup], config: RMConfig, rng: random.Random) -> list[list[str]]:
    """Texts to score per group, best first: a (chosen, rejected) pair, or for the listwise loss the
    best and up to k - 1 worse candidates (a group of two, a preference pair, stays a pair)."""
    batch = []
    for g in groups:
        if config.loss == "listwise":
            picks = [g.best, *rng.sample(g.worse, min(config.k - 1, len(g.worse)))]
        else:
            picks = [g.best, rng.choice(g.worse)]
        batch.append([g.prompt + g.responses[i] for i in picks])
    return batch


def train_outcome_rm(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    groups: Sequence[RankedGroup],
    config: RMConfig,
    on_step: Callable[[int, float], None] | None = None,
    add_special_tokens: bool = True,
) -> list[float]:
    """Train a one-logit sequence classifier in place on ranked groups; returns step losses.

    add_special_tokens=False for text a chat template rendered (`assay.scoring.outcome_scores`)."""
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    prepare(model, config.hardware)
    precision = Precision(config.hardware)
    update = make_update(model, config, precision)
    device = device_of(model)
    losses = []
    for step in range(config.steps):
        batch = _group_batch(rng.sample(list(groups), config.batch_size), config, rng)
        with step_guard("reward model", step, config):
            with precision.autocast():
                texts = [t for group in batch for t in group]
                flat = outcome_scores(model, tokenizer, texts, add_special_tokens).float()  # [texts]
            # [groups, widest]: a group with fewer candidates is padded with -inf, which softmax gives no mass
            scores = torch.full((len(batch), max(map(len, batch))), float("-inf"), device=device)
            scores[_filled(batch).to(device)] = flat
            if config.loss == "bt":
                loss = bradley_terry_loss(scores[:, 0], scores[:, 1])
            elif config.loss == "margin":
                loss = margin_ranking_loss(scores[:, 0], scores[:, 1], config.margin)
            else:
                loss = listwise_loss(scores, torch.zeros(len(scores), dtype=torch.long, device=device))
            losses.append(update(loss))
        if on_step:
            on_step(step, losses[-1])
    model.eval()
    return losses


def pairwise_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    groups: Sequence[RankedGroup],
    add_special_tokens: bool = True,
) -> float:
    """Share of a group's (best, worse) pairs the model scores in that order, over every worse candidate
    of every group; a tie counts half, as in `assay eval`. The model's train/eval mode is kept."""
    was_training = model.training
    model.eval()
    flat = score_outcome(
        model, tokenizer, [g.prompt + r for g in groups for r in g.responses], add_special_tokens=add_special_tokens
    )
    model.train(was_training)
    wins, count, at = 0.0, 0, 0
    for g in groups:
        scores = flat[at : at + len(g.responses)]
        at += len(g.responses)
        wins += sum(1.0 if scores[g.best] > scores[i] else 0.5 if scores[g.best] == scores[i] else 0.0 for i in g.worse)
        count += len(g.worse)
    return wins / count


def _filled(batch: list[list[str]]) -> torch.Tensor:
    """[groups, widest] True where a group has a candidate: the places of the flat scores, row by row."""
    width = max(map(len, batch))
    return torch.arange(width)[None, :] < torch.tensor([len(texts) for texts in batch])[:, None]


# --- process reward model -----------------------------------------------------------------


@dataclass
class StepExample:
    """A response with the character index where each step ends and that step's label."""

    prompt: str
    response: str
    step_ends: list[int]  # exclusive end offsets into `response`, one per step
    labels: list[bool]


def train_process_rm(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[StepExample],
    config: SFTConfig,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train a one-logit token classifier in place with BCE at step ends; returns step losses."""
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    encoded = [(*step_token_positions(tokenizer, e.prompt, e.response, e.step_ends), e.labels) for e in examples]
    prepare(model, config.hardware)
    precision = Precision(config.hardware)
    update = make_update(model, config, precision)
    device = device_of(model)
    losses = []
    for step in range(config.steps):
        batch = rng.sample(encoded, config.batch_size)
        width = max(len(ids) for ids, _, _ in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        target = torch.full((len(batch), width), -1.0)  # -1: no label at this token
        for row, (x, pos, lab) in enumerate(batch):
            ids[row, : len(x)] = torch.tensor(x)
            target[row, pos] = torch.tensor(lab, dtype=torch.float)
        ids, target = ids.to(device), target.to(device)
        with step_guard("process reward model", step, config):
            # right padding: no attention mask needed under the causal mask
            with precision.autocast():
                logits = model(input_ids=ids, use_cache=False).logits[..., 0].float()  # [batch, seq]
            keep = target >= 0
            loss = F.binary_cross_entropy_with_logits(logits[keep], target[keep])
            losses.append(update(loss))
        if on_step:
            on_step(step, losses[-1])
    model.eval()
    return losses
