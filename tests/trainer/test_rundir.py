"""The run directory's TensorBoard events: every number of a metrics line as a scalar at its step,
nested values under their prefix, steps past a resumed checkpoint hidden, and clear() removing them."""

from __future__ import annotations

import time

import pytest
import torch

from assay.trainer.rundir import RunDir, scalars
from tests.helpers import same_scalars, tensorboard_scalars

pytestmark = pytest.mark.unit


def test_scalars_are_the_numbers_of_a_line_flattened():
    line = {"step": 3, "loss": 0.5, "ok": True, "note": "x", "none": None, "nan": float("nan"), "eval": {"correct": 1}}
    assert dict(scalars(line)) == {"loss": 0.5, "eval/correct": 1.0}


def test_every_line_lands_at_its_step_or_round_and_one_without_after_the_last(tmp_path):
    run = RunDir(tmp_path)
    run.log({"eval": "before", "heldout_pass1": 0.2})  # DPO's evaluation before the first round
    for r in range(3):
        run.log({"round": r, "loss": 0.7 - r / 10, "eval_by_reward": {"orm": {"mean": r / 4}}})
    run.log({"eval": "after", "heldout_pass1": 0.3})
    got = tensorboard_scalars(tmp_path)
    assert same_scalars(got["heldout_pass1"], [(0, 0.2), (3, 0.3)])
    assert same_scalars(got["loss"], [(0, 0.7), (1, 0.6), (2, 0.5)])
    assert same_scalars(got["eval_by_reward/orm/mean"], [(0, 0.0), (1, 0.25), (2, 0.5)])
    run.clear()
    assert not list(tmp_path.glob("events.out.tfevents.*")) and not (tmp_path / "metrics.jsonl").exists()


def test_a_resumed_run_hides_the_steps_after_its_checkpoint(tmp_path):
    module = torch.nn.Linear(2, 1)
    first = RunDir(tmp_path)
    for step in (1, 2):
        first.log({"step": step, "loss": float(step)})
    first.save(2, {"policy": module}, {}, {"reward_id": "r"})
    first.log({"step": 3, "loss": 99.0})  # killed after this line, before step 3's checkpoint
    first.close()
    # TensorBoard reads a folder's event files in name order, and a name starts with the writer's
    # second and ends with a per-process counter (9 sorts after 10): a real resume is a later process,
    # so let the second turn, as it would, before the resumed writer opens its file
    opened = int(time.time())
    while int(time.time()) == opened:
        time.sleep(0.05)

    resumed = RunDir(tmp_path)
    state = resumed.load(resumed.latest(), {"policy": module}, {})
    assert state["step"] == 2
    resumed.log({"step": 3, "loss": 3.0})
    assert same_scalars(tensorboard_scalars(tmp_path)["loss"], [(1, 1.0), (2, 2.0), (3, 3.0)])
    assert [m["loss"] for m in resumed.metrics()] == [1.0, 2.0, 3.0]
