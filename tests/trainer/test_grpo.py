"""Online GRPO, short real runs against both services on loopback (subprocesses, embedded checkpoints)."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time

import pytest
import torch

from assay.checkpoints import load_embedded
from clients.reward import RewardClient
from trainer.grpo import GRPOConfig, train
from trainer.online import RewardMismatch, RunDir
from trainer.rewards import InProcessReward

SMALL = dict(prompts_per_step=4, group_size=4, max_tokens=40, lr=1e-4, checkpoint_every=1)


def test_a_step_learns_pushes_and_the_server_serves_the_trained_weights(policy, reward_fn, tmp_path):
    model, tok = load_embedded("policy")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    history = train(GRPOConfig(steps=2, mu=4, **SMALL), model, tok, policy, reward_fn, RunDir(tmp_path))
    first = history[0]
    assert first["samples"] == 16 and first["reward_failed"] == 0 and first["stale_dropped"] == 0
    assert first["server_logprob_gap"] < 1e-3  # the server sampled with exactly the trainer's weights
    assert first["loss_last_pass"] < first["loss"]  # four passes over a fixed batch lower its loss
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert policy.weight_version() == history[-1]["weight_version"] == history[0]["weight_version"] + 1
    prompt = "Q: 37+48-19 A: "
    served = policy.complete(prompt, max_tokens=40, temperature=0.0, return_token_ids=True).choices[0]
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    local = model.eval().generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=tok.pad_token_id)
    assert local[0, ids.shape[1] :].tolist() == served.token_ids


def test_a_nan_reward_is_masked_and_counted_never_zero(policy, tmp_path):
    inner = InProcessReward("correct")

    def flaky(prompts, completions, **kw):
        out = inner(prompts, completions, **kw)
        return [math.nan if i % 3 == 0 else v for i, v in enumerate(out[:-1])] + [None]

    flaky.reward_id = inner.reward_id
    model, tok = load_embedded("policy")
    with inner:
        (m,) = train(GRPOConfig(steps=1, **SMALL), model, tok, policy, flaky, RunDir(tmp_path))
    assert m["reward_failed"] == 6  # i = 0, 3, 6, 9, 12 are NaN, and the last one is None
    assert m["samples"] == 16 and math.isfinite(m["loss"])


def test_a_changed_reward_id_stops_a_resumed_run(policy, reward_fn, services, tmp_path):
    model, tok = load_embedded("policy")
    train(GRPOConfig(steps=1, **SMALL), model, tok, policy, reward_fn, RunDir(tmp_path))
    with RewardClient.http(services.rm_url) as rm:
        other = rm.as_reward_fn("format")
    with pytest.raises(RewardMismatch, match="trained on reward sha256:.* now answers as sha256:"):
        train(GRPOConfig(steps=2, **SMALL), model, tok, policy, other, RunDir(tmp_path), resume=True)


def test_a_reward_server_restart_mid_run_loses_and_doubles_nothing(policy, reward_fn, services, tmp_path):
    model, tok = load_embedded("policy")
    restarted = []

    def on_step(m):
        if m["step"] == 1:  # SIGKILL rm_server and bring it back while the run goes on
            services.rm.proc.kill()
            restarted.append(time.monotonic())

    import threading

    def bring_back():
        while not restarted:
            time.sleep(0.05)
        services.rm.restart()

    helper = threading.Thread(target=bring_back)
    helper.start()
    history = train(GRPOConfig(steps=3, **SMALL), model, tok, policy, reward_fn, RunDir(tmp_path), on_step=on_step)
    helper.join()
    assert [m["step"] for m in history] == [1, 2, 3]
    assert all(m["samples"] == 16 and m["reward_failed"] == 0 for m in history)
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_resume_after_a_kill_continues_at_the_next_step(services, tmp_path):
    """`assay train grpo` killed (SIGKILL) after a checkpoint; --resume runs the rest, each step once."""
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "assay", "train", "grpo", "--run-dir", str(run), "--rm-url", services.rm_url,
            "--policy-url", services.policy_url]  # fmt: skip
    config = tmp_path / "grpo.yaml"
    config.write_text("\n".join(f"{k}: {v}" for k, v in {**SMALL, "steps": 5, "checkpoint_every": 2}.items()))
    proc = subprocess.Popen([*argv, "--config", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (run / "checkpoints" / "step-000002").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = subprocess.run([*argv, "--config", str(config), "--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000004", "step-000005"]


def test_a_policy_server_restart_mid_run_gets_the_trainers_weights_again(policy, reward_fn, services, tmp_path):
    """The restarted server serves its start-up checkpoint; the trainer pushes its own weights
    before the next rollout, so no sample comes from the wrong weights."""
    model, tok = load_embedded("policy")

    def on_step(m):
        if m["step"] == 1:
            services.policy.restart()  # SIGKILL, then the same command on the same port

    config = GRPOConfig(steps=3, **{**SMALL, "lr": 3e-3})  # big steps: the trained weights are far from the start
    pid = services.policy.proc.pid
    history = train(config, model, tok, policy, reward_fn, RunDir(tmp_path), on_step=on_step)
    assert services.policy.proc.pid != pid
    assert [m["samples"] for m in history] == [16, 16, 16]
    assert all(m["server_logprob_gap"] < 1e-3 for m in history)  # every rollout came from the trainer's weights
    assert policy.weight_version() == history[-1]["weight_version"]
