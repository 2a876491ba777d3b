"""`assay plot` and `assay train` argument handling (no training here)."""

from __future__ import annotations

import json
import subprocess
import sys

from typer.testing import CliRunner

from assay.cli import app


def test_plot_writes_curves_for_step_and_round_runs(tmp_path):
    steps = tmp_path / "grpo"
    steps.mkdir()
    rows = [{"step": 0, "heldout_pass1": 0.2}] + [{"step": i, "reward_mean": i / 10, "kl": 0.01 * i, "seconds": 2.0}
                                                  for i in range(1, 6)]  # fmt: skip
    (steps / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rounds = tmp_path / "dpo"
    rounds.mkdir()
    rows = [{"eval": "before", "heldout_pass1": 0.2}] + [{"round": i, "loss": 0.7, "reward_accuracy": 0.5}
                                                         for i in range(3)]  # fmt: skip
    (rounds / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    runner = CliRunner()
    for run in (steps, rounds):
        result = runner.invoke(app, ["plot", str(run)])
        assert result.exit_code == 0, result.output
        png = run / "curves.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_plot_of_a_missing_run_says_so(tmp_path):
    result = CliRunner().invoke(app, ["plot", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_an_unknown_config_key_is_refused_before_anything_starts(tmp_path):
    config = tmp_path / "grpo.yaml"
    config.write_text("steps: 3\ngroup_sise: 4\n")
    out = subprocess.run([sys.executable, "-m", "assay", "train", "grpo", "--config", str(config), "--run-dir",
                          str(tmp_path / "run")], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 2 and "group_sise" in out.stdout + out.stderr
    assert not (tmp_path / "run").exists()
