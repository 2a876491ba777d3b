"""The forward passes the reward models are trained and read with: one score per text, one position per step."""

import pytest
import torch
from transformers import LlamaForSequenceClassification

from assay.arith import world
from assay.arith.checks import segments
from assay.scoring import outcome_scores, step_token_positions
from tests.helpers import tiny_llama_config

pytestmark = pytest.mark.unit


def test_scores_do_not_depend_on_padding(tokenizer):
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(tiny_llama_config(tokenizer)).eval()
    short, long = "Q: 1+2 A: 1+2=3 #### 3", "Q: 11+22-5 A: 11+22=33 33-5=28 #### 28"
    with torch.no_grad():
        alone = outcome_scores(model, tokenizer, [short])
        padded = outcome_scores(model, tokenizer, [short, long])
    assert torch.allclose(alone[0], padded[0], atol=1e-5)


def test_step_positions_point_at_each_steps_last_character(tokenizer):
    p = world.Problem((23, 45, 17), ("+", "-"))
    ids, pos = step_token_positions(tokenizer, p.prompt, p.solution, [s.end for s in segments(p.solution)])
    assert [tokenizer.decode([ids[i]]) for i in pos] == ["8", "1", "1"]
    assert tokenizer.decode(ids[: pos[0] + 1], skip_special_tokens=True) == p.prompt + "23+45=68"
