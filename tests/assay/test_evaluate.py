import json
import math
import subprocess
import sys

import pytest

from assay.eval_config import TARGETS, EvalConfig
from assay.evaluate import auroc, evaluate, meets_targets, pass_at_k

pytestmark = pytest.mark.unit


def test_pass_at_k_unbiased_estimator_by_hand():
    assert pass_at_k(4, 0, 1) == 0.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert pass_at_k(4, 3, 2) == 1.0  # fewer than k wrong: some k-subset always holds a right one
    assert pass_at_k(64, 16, 16) == pytest.approx(1 - math.comb(48, 16) / math.comb(64, 16))


def test_auroc_by_hand():
    assert auroc([0.9, 0.8, 0.1], [True, True, False]) == 1.0
    assert auroc([0.1, 0.9], [True, False]) == 0.0
    assert auroc([0.5, 0.5], [True, False]) == 0.5
    assert auroc([0.3, 0.7, 0.5, 0.2], [True, True, False, False]) == pytest.approx(0.75)
    assert math.isnan(auroc([0.3], [True]))


def test_eval_config_needs_enough_samples_for_pass_at_64():
    with pytest.raises(ValueError, match="samples must be >= 64"):
        EvalConfig(samples=16)


@pytest.mark.slow  # the full `assay eval`: 51 s on a quiet machine
def test_embedded_checkpoints_meet_the_targets_on_the_fixed_heldout_set():
    """The full `assay eval`: if a rebuild or a code change degrades a model, this fails."""
    figures = evaluate(EvalConfig())
    assert meets_targets(figures) == dict.fromkeys(TARGETS, True), figures
    assert figures["pass@1"] <= figures["pass@4"] <= figures["pass@16"] <= figures["pass@64"]
    assert 0.5 < figures["orm_auroc"] <= 1.0
    assert 0.5 < figures["prm_step_accuracy"] <= 1.0


@pytest.mark.slow  # `assay eval` on 2 problems, in a subprocess
def test_cli_eval_json_prints_one_object():
    out = subprocess.run(
        [sys.executable, "-m", "assay", "eval", "--json", "--problems", "2"],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    figures = json.loads(out.stdout)
    assert figures["heldout_problems"] == 2 and figures["samples_per_problem"] == 64
    assert set(TARGETS) <= set(figures)


def test_cli_refuses_bad_options_without_a_traceback():
    out = subprocess.run(
        [sys.executable, "-m", "assay", "eval", "--samples", "4"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2
    assert "samples must be >= 64" in out.stderr
    assert "Traceback" not in out.stderr
