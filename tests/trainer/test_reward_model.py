import pytest
import torch
from transformers import LlamaForSequenceClassification, LlamaForTokenClassification

from assay.arith import world
from assay.arith.checks import segments, step_labels
from assay.scoring import outcome_scores
from assay.trainer.config import RMConfig
from assay.trainer.reward_model import RankedGroup, StepExample, train_outcome_rm, train_process_rm
from tests.helpers import tiny_llama_config

pytestmark = pytest.mark.unit


def _groups():
    out = []
    for p in world.take("train", 16, seed=0):
        wrong = p.solution.rsplit(" ", 1)[0] + " 0"  # an easy tell: the mechanics are under test
        out.append(RankedGroup(p.prompt, [p.solution, wrong, wrong + " "], best=0, worse=[1, 2]))
    return out


@pytest.mark.parametrize("loss", ["bt", "listwise", "margin"])
def test_outcome_rm_learns_to_rank_the_correct_answer_first(tokenizer, loss):
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(tiny_llama_config(tokenizer))
    groups = _groups()
    cfg = RMConfig(steps=60, batch_size=8, lr=3e-3, warmup_steps=0, loss=loss, k=3)
    train_outcome_rm(model, tokenizer, groups, cfg)
    with torch.no_grad():
        good = outcome_scores(model, tokenizer, [g.prompt + g.responses[0] for g in groups])
        bad = outcome_scores(model, tokenizer, [g.prompt + g.responses[1] for g in groups])
    assert (good > bad).float().mean() >= 0.9


def test_process_rm_learns_step_labels(tokenizer):
    torch.manual_seed(0)
    model = LlamaForTokenClassification(tiny_llama_config(tokenizer))
    examples = []
    for p in world.take("train", 8, seed=0):
        for text in [p.solution, p.solution.replace("=", "=x", 1)]:  # an easy tell
            examples.append(StepExample(p.prompt, text, [s.end for s in segments(text)], step_labels(p, text)))
    cfg = RMConfig(steps=60, batch_size=len(examples), lr=3e-3, warmup_steps=0)  # full batch
    losses = train_process_rm(model, tokenizer, examples, cfg)
    assert losses[-1] < 0.5 * losses[0]


def test_ranked_group_needs_a_worse_candidate():
    with pytest.raises(ValueError):
        RankedGroup("q", ["a"], best=0, worse=[])
    with pytest.raises(ValueError):
        RMConfig(loss="hinge")
