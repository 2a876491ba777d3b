"""`assay train grpo|ppo --data`: online RL on a file of chat prompts with a user's checkpoint,
through both live services (subprocesses on loopback).

The tiny-chat fixture (`tiny_chat`, tests/conftest.py): a ChatML policy, an ORM on another tokenizer
and template served with `chat_template: true`, and `correct` (rule.math_equal) checking the
number after `####` against the rows' `answer`. The policy's rendering of a conversation is not
what the ORM was trained on, so a reward sent that rendering instead of the conversation scores
other text, silently: the test checks the reward received the conversation.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from assay.checkpoints import load_model
from assay.cli import app
from assay.clients import PolicyClient, RewardClient
from assay.services import LocalServices
from assay.trainer import grpo
from assay.trainer.config import GRPOConfig
from assay.trainer.evaluation import for_eval_set
from assay.trainer.prompts import load_prompt_files
from assay.trainer.rundir import RunDir

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def chat_services(tiny_chat):
    policy_args = ["--model", str(tiny_chat / "policy"), "--model-name", "policy"]
    with LocalServices.start(policy_args=policy_args, spec=tiny_chat / "rm.yaml") as svc:
        yield svc


def test_grpo_on_chat_prompts_scores_conversations_evaluates_by_reward_id_and_resumes_on_the_same_prompts(
    chat_services, tiny_chat, tmp_path, one_torch_thread
):
    model, tok = load_model(tiny_chat / "policy", "causal_lm")
    files = load_prompt_files(tok, str(tiny_chat / "prompts.jsonl"), eval_data=str(tiny_chat / "eval_prompts.jsonl"))
    config = GRPOConfig(
        steps=1,
        prompts_per_step=3,
        group_size=4,
        max_tokens=32,
        reward="orm",
        eval_every=1,
        eval_problems=5,
        eval_samples=2,
        checkpoint_every=1,
    )
    calls = []  # what the training reward received, call by call: (prompts, completions, scores)
    with (
        PolicyClient.http(chat_services.policy_url, timeout_s=300) as policy,
        RewardClient.http(chat_services.rm_url, timeout_s=300) as rm,
    ):
        orm = rm.as_reward_fn("orm")

        def reward(prompts, completions, **kw):
            scores = orm(prompts, completions, **kw)
            calls.append((prompts, completions, scores))
            return scores

        reward.reward_id = orm.reward_id  # type: ignore[attr-defined]
        evaluation = for_eval_set(rm, config, reward, files.eval)
        run = RunDir(tmp_path)
        common = dict(prompts=files.train, evaluation=evaluation)
        first = grpo.train(config, model, tok, policy, reward, run, **common)
        resumed = grpo.train(replace(config, steps=2), model, tok, policy, reward, run, resume=True, **common)

        assert [m["step"] for m in first + resumed] == [1, 2]
        for m in first + resumed:
            assert m["samples"] == 12 and m["reward_failed"] == 0 and m["reward_mean"] is not None
        lines = run.metrics()
        assert [m["step"] for m in lines] == [0, 1, 2]
        for m in lines:  # the eval set's figures, named by reward, at step 0 and after each step
            assert m["eval_samples"] == 10 and m["eval/orm/failed"] == m["eval/correct/failed"] == 0
            assert 0 <= m["eval/orm/mean"] <= 1 and 0 <= m["eval/correct/pass_rate"] <= 1
        recorded = json.loads((tmp_path / "config.json").read_text())
        assert recorded["reward_id"] == rm.reward_id("orm")
        assert recorded["eval_reward_ids"] == {"orm": rm.reward_id("orm"), "correct": rm.reward_id("correct")}
        assert recorded["data"] == str(tiny_chat / "prompts.jsonl")

        # training calls hold 12 items (3 prompts x 4), evaluation calls 10 (5 x 2)
        steps = [c for c in calls if len(c[0]) == 12]
        assert len(steps) == 2
        # the resumed run's step 2 trained on the prompts an unbroken run draws at step 2
        drawn = files.train.draw(2, config.prompts_per_step, config.seed)
        assert steps[1][0] == [p.messages for p in drawn for _ in range(config.group_size)]

        # the reward received the conversation, which its own template renders, not the policy's text
        prompts, completions, scores = steps[0]
        conversation, response = prompts[0], completions[0][-1]["content"]
        assert isinstance(conversation, list) and conversation[-1]["role"] == "user"
        as_sent = rm.score("orm", [{"id": "0", "messages": conversation, "response": response}]).results[0]
        policy_text = files.train.draw(1, config.prompts_per_step, config.seed)[0].text
        as_rendered = rm.score("orm", [{"id": "0", "prompt": policy_text, "response": response}]).results[0]
        assert as_sent.score == pytest.approx(scores[0])
        assert as_rendered.score != pytest.approx(as_sent.score, abs=1e-4)


def _cli(args: list[str]):
    return CliRunner().invoke(app, ["train", *args])


def test_a_bad_row_is_refused_with_its_file_row_and_column_before_anything_starts(tiny_chat, tmp_path):
    rows = (tiny_chat / "prompts.jsonl").read_text().splitlines()[:5]
    rows[3] = json.dumps({"prompt": [{"role": "user"}], "answer": "3"})
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(rows) + "\n")
    model = str(tiny_chat / "policy")
    result = _cli(["grpo", "--run-dir", str(tmp_path / "run"), "--model", model, "--data", str(bad)])
    assert result.exit_code == 2, result.output
    said = " ".join(result.output.split())
    assert f"{bad} row 3, column 'prompt'" in said
    result = _cli(["ppo", "--run-dir", str(tmp_path / "run"), "--data", str(bad), "--gamma-ptx", "0.1"])
    assert result.exit_code == 2 and "--ptx-data" in result.output  # never arithmetic mixed into a user's run


def test_ppo_with_data_starts_its_services_trains_a_step_and_mixes_in_the_users_demonstrations(tiny_chat, tmp_path):
    run_dir = tmp_path / "run"
    args = [
        "ppo",
        "--run-dir",
        str(run_dir),
        "--model",
        str(tiny_chat / "policy"),
        "--spec",
        str(tiny_chat / "rm.yaml"),
    ]
    args += ["--data", str(tiny_chat / "prompts.jsonl"), "--eval-fraction", "0.05", "--reward", "orm"]
    args += ["--ptx-data", str(tiny_chat / "demonstrations.jsonl"), "--gamma-ptx", "0.1", "--ptx-batch", "4"]
    args += ["--steps", "1", "--prompts-per-step", "2", "--samples-per-prompt", "2", "--epochs", "1"]
    args += ["--max-tokens", "32", "--eval-problems", "4", "--eval-samples", "1"]
    result = _cli(args)
    assert result.exit_code == 0, result.output
    lines = RunDir(run_dir).metrics()
    assert [m["step"] for m in lines] == [0, 1]  # an eval set is evaluated at the start and the end
    step = lines[1]
    assert step["samples"] == 4 and step["reward_failed"] == 0 and step["ptx_loss"] > 0
    assert step["eval/orm/mean"] is not None and step["eval/correct/pass_rate"] is not None
