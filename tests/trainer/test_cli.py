"""`assay plot` and `assay train` argument handling; one short run (against the services) for --overwrite."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import MISSING, Field, fields, is_dataclass
from typing import get_type_hints

import pytest
from typer.testing import CliRunner

from assay.cli import app

pytestmark = pytest.mark.unit


def test_plot_writes_curves_for_step_and_round_runs(tmp_path):
    steps = tmp_path / "grpo"
    steps.mkdir()
    rows = [{"step": 0, "heldout_pass1": 0.2}] + [
        {"step": i, "reward_mean": i / 10, "kl": 0.01 * i, "seconds": 2.0} for i in range(1, 6)
    ]
    (steps / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rounds = tmp_path / "dpo"
    rounds.mkdir()
    rows = [{"eval": "before", "heldout_pass1": 0.2}] + [
        {"round": i, "loss": 0.7, "reward_accuracy": 0.5} for i in range(3)
    ]
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


@pytest.mark.slow  # a subprocess that imports torch before it refuses: ~10 s
def test_an_unknown_config_key_is_refused_before_anything_starts(tmp_path):
    config = tmp_path / "grpo.yaml"
    config.write_text("steps: 3\ngroup_sise: 4\n")
    out = subprocess.run(
        [sys.executable, "-m", "assay", "train", "grpo", "--config", str(config), "--run-dir", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "group_sise" in out.stdout + out.stderr
    assert not (tmp_path / "run").exists()


# --- every config field is an option; flags win over --config -----------------------------------


def test_every_config_field_is_an_option_with_its_default_and_help():
    import typer.main

    from assay.trainer.config import DPOConfig, GRPOConfig, PPOConfig

    train = typer.main.get_command(app).commands["train"]
    for name, cls in (("grpo", GRPOConfig), ("ppo", PPOConfig), ("dpo", DPOConfig)):
        params = {p.name: p for p in train.commands[name].params}
        for f, owner in _leaf_fields(cls):
            option = params[f.metadata.get("flag", f.name).replace("-", "_")]
            assert option.opts == ["--" + f.metadata.get("flag", f.name.replace("_", "-"))], (name, f.name)
            default = list(f.default_factory()) if f.default is MISSING else f.default  # type: ignore[misc]
            default = list(default) if isinstance(default, tuple) else default
            assert (option.help, option.default or None) == (f.metadata["help"], default or None), (name, owner, f.name)


def _leaf_fields(cls: type) -> list[tuple[Field, str]]:
    """Every field that is an option: a nested dataclass's fields in its place (Hardware, LoRA)."""
    out = []
    hints = get_type_hints(cls)
    for f in fields(cls):
        if is_dataclass(kind := hints[f.name]):
            out += [(g, f.name) for g, _ in _leaf_fields(kind)]
        else:
            out.append((f, cls.__name__))
    return out


def _refusal(args: list[str]) -> str:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    return " ".join(re.sub("[│╭╮╰╯─]", " ", result.output).split())  # unboxed, unwrapped


def test_flags_override_the_config_file_and_the_file_fills_the_rest(tmp_path):
    _old_run(tmp_path / "run")  # every command below ends, at the latest, at this run directory's refusal
    bad_group, good_group = tmp_path / "bad.yaml", tmp_path / "good.yaml"
    bad_group.write_text("group_size: 1\nlr: 1.0e-5\n")
    good_group.write_text("group_size: 4\nsteps: 0\n")
    base = ["train", "grpo", "--run-dir", str(tmp_path / "run")]
    assert "group_size >= 2" in _refusal([*base, "--config", str(bad_group)])
    assert "already holds a run" in _refusal([*base, "--config", str(bad_group), "--group-size", "4"])
    assert "group_size >= 2" in _refusal([*base, "--config", str(good_group), "--group-size", "1", "--steps", "3"])
    said = _refusal([*base, "--config", str(good_group), "--lr", "1e-4"])  # the file's steps: 0 stays
    assert "steps, checkpoint_every and eval_problems must be >= 1" in said
    assert "already holds a run" in _refusal([*base, "--config", str(good_group), "--steps", "3"])
    assert "scale must be std, none or batch" in _refusal([*base, "--scale", "nope"])
    assert "already holds a run" in _refusal(
        [
            "train",
            "dpo",
            "--run-dir",
            str(tmp_path / "run"),
            "--rounds",
            "2",
            "--ref-update",
            "each_round",
            "--beta",
            "0.5",
        ]
    )
    assert "beta must be > 0" in _refusal(["train", "dpo", "--run-dir", str(tmp_path / "run"), "--beta", "0"])


# --- one run per run directory (issue 10, defect 9: runs were silently mixed, steps 1,2,3,4,1,2) ---


def _old_run(run) -> None:
    """What a finished 4-step run leaves, plus a file of the user's that is not the run's."""
    (run / "checkpoints" / "step-000004").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": i}) + "\n" for i in range(1, 5)))
    (run / "config.json").write_text("{}")
    (run / "notes.txt").write_text("mine")


def test_a_second_run_in_the_same_directory_is_refused_before_anything_starts(tmp_path):
    runner = CliRunner()
    for algorithm, advice in (("grpo", "--resume"), ("ppo", "--resume"), ("dpo", "--overwrite")):
        run = tmp_path / algorithm
        _old_run(run)
        before = (run / "metrics.jsonl").read_text()
        result = runner.invoke(app, ["train", algorithm, "--run-dir", str(run)])
        assert result.exit_code == 2, result.output
        said = " ".join(re.sub("[│╭╮╰╯─]", " ", result.output).split())  # unboxed, unwrapped
        assert "already holds a run" in said and advice in said and "--overwrite" in said
        assert (run / "metrics.jsonl").read_text() == before and (run / "checkpoints" / "step-000004").is_dir()
    result = runner.invoke(app, ["train", "grpo", "--run-dir", str(tmp_path / "grpo"), "--resume", "--overwrite"])
    assert result.exit_code == 2 and "give one" in result.output


def test_the_library_loop_refuses_to_mix_runs_too(tmp_path):
    from assay.checkpoints import load_embedded
    from assay.trainer.grpo import GRPOConfig, train
    from assay.trainer.online import RunExists
    from assay.trainer.rundir import RunDir

    _old_run(tmp_path)
    model, tok = load_embedded("policy")
    with pytest.raises(RunExists, match="already holds a run"):  # before any service is called
        train(GRPOConfig(steps=1), model, tok, None, None, RunDir(tmp_path))


@pytest.mark.e2e
def test_overwrite_discards_the_old_run_and_starts_afresh_and_the_cli_trains_lora_in_bf16(services, tmp_path):
    run = tmp_path / "run"
    _old_run(run)
    config = tmp_path / "grpo.yaml"
    config.write_text("prompts_per_step: 2\ngroup_size: 2\nmax_tokens: 24\nsteps: 2\ncheckpoint_every: 1\n")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "assay",
            "train",
            "grpo",
            "--run-dir",
            str(run),
            "--config",
            str(config),
            "--overwrite",
            "--rm-url",
            services.rm_url,
            "--policy-url",
            services.policy_url,
            # the flags a GPU run takes (`--device cuda` aside), through the command line
            *("--lora-r", "4", "--lora-alpha", "8", "--dtype", "bfloat16", "--gradient-checkpointing"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    assert (run / "notes.txt").read_text() == "mine"  # only the run's own files go
    # A LoRA run checkpoints its adapter alone and ends with the merged policy as a plain checkpoint.
    saved = run / "checkpoints" / "step-000002" / "policy.safetensors"
    assert saved.stat().st_size < (run / "merged" / "model.safetensors").stat().st_size / 5
    config = json.loads((run / "config.json").read_text())
    assert config["lora"]["r"] == 4 and config["hardware"]["dtype"] == "bfloat16"
