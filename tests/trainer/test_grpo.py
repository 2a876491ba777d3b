"""Online GRPO, short real runs against both services on loopback (subprocesses, embedded checkpoints).

SIGKILL of rm_server mid-training and of the trainer itself (resume): tests/reliability/test_kill.py."""

from __future__ import annotations

import json
import math

import pytest
import torch

from assay.checkpoints import load_embedded
from assay.clients.reward import RewardClient
from assay.rm_server.local import LocalTransport
from assay.trainer.config import Hardware
from assay.trainer.grpo import GRPOConfig, train
from assay.trainer.models import OutOfMemory
from assay.trainer.online import RewardMismatch
from assay.trainer.rundir import RunDir

pytestmark = pytest.mark.e2e

SMALL = dict(prompts_per_step=4, group_size=4, max_tokens=40, lr=1e-4, checkpoint_every=1)


def test_a_step_learns_pushes_and_the_server_serves_the_trained_weights(policy, reward_fn, tmp_path):
    model, tok = load_embedded("policy")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # lr 3e-5: four passes stay where the first-order decrease holds. At 1e-4 Adam's first, sign-sized
    # steps overshoot on a batch whose advantage sits in one group (1 of 16 samples rewarded).
    config = GRPOConfig(steps=2, mu=4, **{**SMALL, "lr": 3e-5})
    history = train(config, model, tok, policy, reward_fn, RunDir(tmp_path))
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
    rm = RewardClient(LocalTransport(rewards=["correct"]), timeout_s=300)
    inner = rm.as_reward_fn("correct")

    def flaky(prompts, completions, **kw):
        out = inner(prompts, completions, **kw)
        return [math.nan if i % 3 == 0 else v for i, v in enumerate(out[:-1])] + [None]

    flaky.reward_id = inner.reward_id
    model, tok = load_embedded("policy")
    with rm:
        (m,) = train(GRPOConfig(steps=1, **SMALL), model, tok, policy, flaky, RunDir(tmp_path))
    assert m["reward_failed"] == 6  # i = 0, 3, 6, 9, 12 are NaN, and the last one is None
    assert m["samples"] == 16 and math.isfinite(m["loss"])


def test_a_changed_reward_id_stops_a_resumed_run(policy, reward_fn, services, tmp_path):
    model, tok = load_embedded("policy")
    train(GRPOConfig(steps=1, **SMALL), model, tok, policy, reward_fn, RunDir(tmp_path))
    with RewardClient.http(services.rm_url) as rm:
        other = rm.as_reward_fn("format")
    with pytest.raises(RewardMismatch, match=r"trained on reward sha256:.* now answers as sha256:"):
        train(GRPOConfig(steps=2, **SMALL), model, tok, policy, other, RunDir(tmp_path), resume=True)


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


def test_a_bfloat16_step_with_gradient_checkpointing_pushes_float32_weights_the_server_serves(
    policy, reward_fn, tmp_path
):
    """Mixed precision trains float32 master weights: those are pushed, and the float32 server then
    answers greedily exactly as the trainer's weights do."""
    model, tok = load_embedded("policy")
    hardware = Hardware(dtype="bfloat16", gradient_checkpointing=True)
    (m,) = train(GRPOConfig(steps=1, hardware=hardware, **SMALL), model, tok, policy, reward_fn, RunDir(tmp_path))
    assert m["samples"] == 16 and math.isfinite(m["loss"]) and model.is_gradient_checkpointing
    assert all(p.dtype == torch.float32 for p in model.parameters())
    memory = json.loads((tmp_path / "config.json").read_text())["memory"]
    assert memory[-1].endswith("compute bfloat16 autocast over float32 weights, gradient checkpointing")
    prompt = "Q: 52+17-33 A: "
    served = policy.complete(prompt, max_tokens=40, temperature=0.0, return_token_ids=True).choices[0]
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    local = model.eval().generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=tok.pad_token_id)
    assert local[0, ids.shape[1] :].tolist() == served.token_ids


def test_out_of_memory_in_a_step_stops_the_run_with_what_to_lower(policy, reward_fn, tmp_path):
    """The policy's forward raises torch.OutOfMemoryError, as a CUDA allocation that fails does (a test
    double for what this CPU machine cannot run out of): the run stops with OutOfMemory after step 1's
    rollouts, before any update, the run directory as it was and the services still answering."""
    model, tok = load_embedded("policy")

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")

    model.forward = out_of_memory
    with pytest.raises(OutOfMemory) as caught:
        train(GRPOConfig(steps=2, **SMALL), model, tok, policy, reward_fn, RunDir(tmp_path))
    message = str(caught.value)
    assert "in GRPO step 1 (forward and backward over 16 samples of up to 40 tokens)" in message
    assert "--prompts-per-step (4)" in message and "--group-size (4)" in message and "--resume" in message
    assert RunDir(tmp_path).metrics() == [] and RunDir(tmp_path).latest() is None
    assert policy.weight_version() >= 0  # the policy server answers on
