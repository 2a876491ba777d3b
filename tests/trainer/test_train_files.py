"""`assay train sft|rm` and `assay train dpo --data` from dataset files, through the command line
(typer's runner, in process) on the embedded tiny checkpoints: the loss falls, the checkpoint loads
(and rm_server serves the reward model, scoring what the trainer scores), held-out figures are
logged as training goes, a malformed row is named or skipped and counted, and the run directory
holds TensorBoard events with the same scalars as metrics.jsonl."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from assay.arith import world
from assay.checkpoints import ARITH_DIR, load_model
from assay.cli import app
from tests.helpers import same_scalars, tensorboard_scalars

pytestmark = pytest.mark.unit

POLICY = str(ARITH_DIR / "policy")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def problems():
    return world.take("train", 48, seed=5)


@pytest.fixture(scope="module")
def preferences(problems, tmp_path_factory):
    """Pairs with an easy tell (a final answer of 0), so a few steps separate them."""
    rows = [
        {"prompt": p.prompt, "chosen": p.solution, "rejected": p.solution.rsplit(" ", 1)[0] + " 0"} for p in problems
    ]
    return write_jsonl(tmp_path_factory.mktemp("prefs") / "prefs.jsonl", rows)


def invoke(*args: str) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_sft_from_a_file_learns_logs_held_out_loss_and_saves_a_checkpoint(problems, tmp_path, one_torch_thread):
    rows = [{"prompt": p.prompt, "completion": p.solution.replace("####", "answer:")} for p in problems]
    rows.insert(7, {"prompt": ["not", "messages"], "completion": "x"})  # row 7: a malformed prompt
    data = write_jsonl(tmp_path / "demos.jsonl", rows)
    out = tmp_path / "sft"
    common = ["train", "sft", "--model", POLICY, "--data", data, "--out", out]
    refused = CliRunner().invoke(app, common)
    assert refused.exit_code == 2
    said = " ".join(refused.output.split())  # the console wraps long lines
    assert str(data) in said and "row 7" in said and "'prompt'" in said and not out.exists()

    flags = ["--skip-bad-rows", "--eval-fraction", "0.25", "--eval-every", "4"]
    output = invoke(*common, *flags, "--steps", "8", "--batch-size", "8", "--lr", "3e-3", "--warmup-steps", "0")
    assert "skipped 1 malformed rows" in output
    run = Path(f"{out}.run")
    config = json.loads((run / "config.json").read_text())
    assert (config["skipped_rows"], config["train_rows"], config["heldout_rows"]) == (1, 36, 12)

    lines = metrics(run)
    assert [m["step"] for m in lines] == list(range(1, 9))
    assert [m["step"] for m in lines if "heldout_loss" in m] == [4, 8]
    # the completions end in "answer: n", which the policy has never written: the loss on them falls
    assert lines[-1]["heldout_loss"] < lines[3]["heldout_loss"]
    assert sum(m["loss"] for m in lines[-2:]) < sum(m["loss"] for m in lines[:2])
    scalars = tensorboard_scalars(run)
    assert same_scalars(scalars["loss"], [(m["step"], m["loss"]) for m in lines])
    assert [s for s, _ in scalars["heldout_loss"]] == [4, 8]

    load_model(out, "causal_lm")
    assert not (out / "metrics.jsonl").exists()  # the checkpoint folder holds the checkpoint alone


@pytest.mark.service
def test_rm_from_a_file_logs_held_out_accuracy_and_rm_server_serves_what_it_trained(preferences, tmp_path):
    from assay.clients import RewardClient
    from assay.rm_server.local import LocalTransport
    from assay.scoring import score_outcome

    out = tmp_path / "rm"
    flags = [
        "--eval-fraction",
        "0.25",
        "--eval-every",
        "5",
        "--steps",
        "15",
        "--batch-size",
        "8",
        "--lr",
        "3e-3",
        "--warmup-steps",
        "0",
    ]
    output = invoke("train", "rm", "--model", POLICY, "--data", preferences, "--loss", "bt", "--out", out, *flags)
    said = " ".join(output.split())
    assert f"rm: {{type: model.outcome, path: {out.resolve()}}}" in said  # plain text: the default template

    run = Path(f"{out}.run")
    lines = metrics(run)
    accuracy = [(m["step"], m["heldout_accuracy"]) for m in lines if "heldout_accuracy" in m]
    assert [s for s, _ in accuracy] == [5, 10, 15]
    assert accuracy[-1][1] >= 0.9  # the policy's backbone with a new head tells a final 0 apart in 15 steps
    assert same_scalars(tensorboard_scalars(run)["heldout_accuracy"], accuracy)
    assert json.loads((run / "config.json").read_text())["new_head"] is True

    spec = tmp_path / "rm.yaml"
    spec.write_text(f"rewards:\n  rm: {{type: model.outcome, path: {out}}}\n")
    rows = [json.loads(line) for line in preferences.read_text().splitlines()][:6]
    items = [
        {"id": f"{i}{side}", "prompt": r["prompt"], "response": r[side]}
        for i, r in enumerate(rows)
        for side in ("chosen", "rejected")
    ]
    with RewardClient(LocalTransport(spec, rewards=["rm"]), timeout_s=120) as client:
        served = [r.score for r in client.score("rm", items).results]
    model, tok = load_model(out, "sequence_classification")
    assert served == pytest.approx(score_outcome(model, tok, [it["prompt"] + it["response"] for it in items]), abs=1e-4)


def test_dpo_from_a_file_lowers_the_loss_and_saves_a_policy(preferences, tmp_path, one_torch_thread):
    out = tmp_path / "dpo"
    flags = ["--epochs", "2", "--batch-size", "12", "--lr", "1e-3", "--beta", "0.5", "--eval-fraction", "0.25"]
    invoke("train", "dpo", "--model", POLICY, "--data", preferences, "--out", out, "--eval-every", "3", *flags)
    lines = metrics(Path(f"{out}.run"))
    assert [m["step"] for m in lines] == list(range(1, 7))  # 36 pairs / 12, two epochs
    assert lines[-1]["loss"] < lines[0]["loss"]
    held = [m["heldout"] for m in lines if "heldout" in m]
    assert len(held) == 2 and held[-1]["reward_accuracy"] >= 0.75
    load_model(out, "causal_lm")


def test_offline_dpo_needs_its_checkpoint_paths_and_iterative_its_run_dir(preferences, tmp_path):
    refused = CliRunner().invoke(app, ["train", "dpo", "--data", str(preferences), "--model", POLICY])
    assert refused.exit_code == 2 and "--out" in refused.output
    refused = CliRunner().invoke(app, ["train", "dpo", "--rounds", "1"])
    assert refused.exit_code == 2 and "--run-dir" in refused.output


def test_an_existing_checkpoint_is_replaced_only_with_overwrite(preferences, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["train", "rm", "--model", POLICY, "--data", str(preferences), "--out", str(out)]
    refused = CliRunner().invoke(app, [*args, "--overwrite"])
    assert refused.exit_code == 2 and "not a checkpoint" in " ".join(refused.output.split())
    assert (out / "notes.txt").read_text() == "mine"


# --- conversations, on the tiny-chat fixture (a ChatML policy, an ORM on another template) ----------


@pytest.mark.service
@pytest.mark.slow  # the tiny-chat build, once per run
def test_chat_demonstrations_train_on_the_policys_template_and_stop_at_its_end_of_turn(tiny_chat, tmp_path):
    from assay.data import load_demonstrations
    from assay.trainer.files import demonstrations

    policy = tiny_chat / "policy"
    _, tok = load_model(policy, "causal_lm")
    loaded = load_demonstrations(tiny_chat / "demonstrations.jsonl")
    prompt, completion = demonstrations(tok, loaded.rows[:1], loaded.path)[0]
    last = loaded.rows[0].completion[-1]["content"]
    # what generation continues from, and the answer up to where the template ends the turn: eos follows
    assert prompt.endswith("<|im_start|>assistant\n") and completion == last and tok.eos_token == "<|im_end|>"

    out = tmp_path / "sft"
    flags = ["--steps", "6", "--batch-size", "8", "--lr", "1e-3", "--warmup-steps", "0", "--eval-fraction", "0.1"]
    invoke("train", "sft", "--model", policy, "--data", tiny_chat / "demonstrations.jsonl", "--out", out, *flags)
    lines = metrics(Path(f"{out}.run"))
    assert lines[-1]["heldout_loss"] > 0 and len(lines) == 6
    _, saved = load_model(out, "causal_lm")
    assert saved.apply_chat_template(loaded.rows[0].prompt, tokenize=False, add_generation_prompt=True) == prompt

    dpo = tmp_path / "dpo"
    data = ["--data", tiny_chat / "eval_preferences.jsonl", "--out", dpo, "--epochs", "1", "--batch-size", "16"]
    invoke("train", "dpo", "--model", out, *data, "--lr", "1e-4")
    assert [m["step"] for m in metrics(Path(f"{dpo}.run"))] == list(range(1, 7))  # 96 pairs / 16
    load_model(dpo, "causal_lm")


@pytest.mark.service
@pytest.mark.slow  # the tiny-chat build, once per run
def test_chat_rm_scores_served_with_its_own_template_on_messages_are_the_trained_ones(tiny_chat, tmp_path):
    from assay.chat import split_exchange
    from assay.clients import RewardClient
    from assay.data import load_preferences
    from assay.rm_server.local import LocalTransport
    from assay.scoring import score_outcome

    out = tmp_path / "rm"
    data = ["--data", tiny_chat / "preferences.jsonl", "--eval-data", tiny_chat / "eval_preferences.jsonl"]
    flags = ["--steps", "10", "--batch-size", "16", "--lr", "1e-4", "--warmup-steps", "0", "--eval-every", "5"]
    output = invoke("train", "rm", "--model", tiny_chat / "orm", *data, "--loss", "listwise", "--out", out, *flags)
    assert f"rm: {{type: model.outcome, path: {out.resolve()}, chat_template: true}}" in " ".join(output.split())
    accuracy = [m["heldout_accuracy"] for m in metrics(Path(f"{out}.run")) if "heldout_accuracy" in m]
    assert len(accuracy) == 2 and accuracy[-1] > 0.6  # the fixture's ORM, trained on, stays well above chance

    spec = tmp_path / "rm.yaml"
    spec.write_text(f"rewards:\n  rm: {{type: model.outcome, path: {out}, chat_template: true}}\n")
    rows = load_preferences(tiny_chat / "eval_preferences.jsonl").rows[:4]
    items = [
        {"id": f"{i}{side}", "messages": r.prompt, "response": getattr(r, side)[0]["content"]}
        for i, r in enumerate(rows)
        for side in ("chosen", "rejected")
    ]
    with RewardClient(LocalTransport(spec, rewards=["rm"]), timeout_s=120) as client:
        served = [r.score for r in client.score("rm", items).results]
    model, tok = load_model(out, "sequence_classification")
    texts = ["".join(split_exchange(tok, it["messages"], it["response"])) for it in items]
    assert served == pytest.approx(score_outcome(model, tok, texts, add_special_tokens=False), abs=1e-4)


def test_files_train_on_the_device_and_precision_asked_and_save_float32(
    problems, preferences, tmp_path, one_torch_thread
):
    """sft, rm and dpo take --dtype, --gradient-checkpointing and --attn-implementation (bfloat16 autocast
    on the CPU here), print what the run holds, and save the float32 master weights."""
    import torch
    from safetensors.torch import load_file

    demos = write_jsonl(tmp_path / "demos.jsonl", [{"prompt": p.prompt, "completion": p.solution} for p in problems])
    hardware = ["--dtype", "bfloat16", "--gradient-checkpointing", "--attn-implementation", "eager"]
    runs = {
        "sft": ["--data", demos, "--steps", "2", "--batch-size", "8", "--warmup-steps", "0"],
        "rm": ["--data", preferences, "--steps", "2", "--batch-size", "8", "--warmup-steps", "0"],
        "dpo": ["--data", preferences, "--epochs", "1", "--batch-size", "24"],
    }
    for command, args in runs.items():
        out = tmp_path / command
        output = " ".join(invoke("train", command, "--model", POLICY, *args, "--out", out, *hardware).split())
        assert "compute bfloat16 autocast over float32 weights, gradient checkpointing" in output
        assert re.search(r"gradients [34]\.\d MiB, optimizer state [78]\.\d MiB \(AdamW\)", output), output
        assert all(m["loss"] == m["loss"] for m in metrics(Path(f"{out}.run")))  # no NaN
        assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.float32}


def test_a_device_this_machine_lacks_ends_the_command_before_training(preferences, tmp_path):
    """Offline DPO before it trains; GRPO before any service starts."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "dpo"
    commands = [
        ["train", "dpo", "--model", POLICY, "--data", str(preferences), "--out", str(out)],
        ["train", "grpo", "--run-dir", str(tmp_path / "grpo")],
    ]
    for command in commands:
        refused = CliRunner().invoke(app, [*command, "--device", "cuda"])
        assert refused.exit_code == 2
        assert "device 'cuda' is not available" in " ".join(refused.output.split())
    assert not (out / "model.safetensors").exists() and not (tmp_path / "grpo" / "config.json").exists()
