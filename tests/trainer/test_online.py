"""The online loop's pure parts: how versions thread through the steps, and the reward-id check all algorithms share."""

from __future__ import annotations

import pytest

from assay.trainer.online import RewardMismatch, same_reward, steps

pytestmark = pytest.mark.unit


def test_each_step_samples_from_the_version_the_step_before_pushed():
    seen: list[tuple[int, int]] = []

    def step_fn(n: int, version: int) -> dict:
        seen.append((n, version))
        return {"step": n, "weight_version": version + 2}  # e.g. a sync that re-pushed, then the step's push

    reported: list[dict] = []
    history = steps(range(1, 4), step_fn, 7, reported.append)
    assert seen == [(1, 7), (2, 9), (3, 11)]
    assert reported == history and [m["step"] for m in history] == [1, 2, 3]


def test_a_reward_id_other_than_the_recorded_one_stops_the_run():
    assert same_reward("sha256:a", None, "round 0") == "sha256:a"  # nothing recorded yet: this one is the run's
    assert same_reward("sha256:a", "sha256:a", "round 1") == "sha256:a"
    with pytest.raises(
        RewardMismatch,
        match="round 2: this run was trained on reward sha256:a, and the reward now "
        "answers as sha256:b: rm_server's reward changed mid-run",
    ):
        same_reward("sha256:b", "sha256:a", "round 2")
