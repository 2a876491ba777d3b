"""SIGKILL under load and mid-training: rm_server, policy_server during a weight push, the trainer.

Both services run as subprocesses on loopback (`assay.services.LocalServices`; `Service.restart`
SIGKILLs and starts the same command on the same port). The clients retry until their call's
deadline, so a killed service that comes back within it costs the callers only the wait: no item
lost, duplicated or wrong, no sample lost or scored twice, no weight push applied twice, no
training step applied twice. Each test prints its figures (requests, faults, items lost).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from assay.checkpoints import load_embedded
from assay.clients import PolicyClient, RewardClient
from assay.clients import policy as policy_module
from assay.rm_server.local import LocalTransport
from assay.services import LocalServices
from assay.trainer.grpo import GRPOConfig, train
from assay.trainer.rundir import RunDir
from tests.reliability import loadgen

pytestmark = [pytest.mark.reliability, pytest.mark.e2e]

DOWN_S = 5.0  # how long a killed service stays down before it starts again (then it loads its models)
TINY = dict(prompts_per_step=2, group_size=4, max_tokens=32, lr=1e-4, checkpoint_every=1)  # 8 samples a step
REWARDS = ("correct", "orm", "format")
SERVICE_TIMEOUT_S = 300.0  # every call's deadline, as the trainer's: a restart takes 10-50 s on a busy machine


@pytest.fixture(scope="module")
def services():
    with LocalServices.start(rm_grpc=True) as svc:
        yield svc


@pytest.fixture
def policy(services, one_torch_thread):
    with PolicyClient.http(services.policy_url, timeout_s=SERVICE_TIMEOUT_S) as client:
        yield client


def in_background(fn) -> threading.Thread:
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    return thread


def test_sigkill_of_rm_server_mid_load_loses_nothing(services):
    """Two HTTP and two gRPC clients score while rm_server is SIGKILLed, stays down, and reloads."""
    pool = loadgen.items()
    with RewardClient.http(services.rm_url, timeout_s=120) as rm:
        expected = loadgen.expected_scores(rm, pool, REWARDS)
    tally, stop = loadgen.Tally(), threading.Event()
    workers = [
        lambda i=i, t=t: loadgen.score_worker(
            loadgen.reward_client(services, t, SERVICE_TIMEOUT_S),
            f"{t}{i}",
            REWARDS,
            pool,
            expected,
            tally,
            stop,
            max_requests=2_000,
            timeout_s=SERVICE_TIMEOUT_S,
        )
        for i, t in enumerate(["http", "http", "grpc", "grpc"])
    ]
    threads = loadgen.run_threads(workers)
    time.sleep(3.0)
    pid, start = services.rm.proc.pid, time.monotonic()
    services.rm.restart(down_s=DOWN_S)  # SIGKILL with requests in flight
    outage = time.monotonic() - start
    after = tally.requests
    end = time.monotonic() + 60
    while tally.requests < after + 8 and time.monotonic() < end:  # load goes on against the new process
        time.sleep(0.1)
    stop.set()
    loadgen.join(threads, 180)
    print(
        f"\nrm_server SIGKILL mid-load (1 fault, {outage:.1f}s until ready again; 2 HTTP + 2 gRPC clients): "
        f"{tally.summary()}"
    )
    assert services.rm.proc.pid != pid and tally.requests >= after + 8
    assert (tally.lost, tally.duplicated, tally.wrong) == (0, 0, 0), tally.errors[:5]


def test_sigkill_of_rm_server_mid_training_loses_and_doubles_no_sample(services, policy, tmp_path):
    """rm_server is killed just as the trainer asks it for step 2's rewards, and stays down for
    DOWN_S seconds before reloading (longer than the four retries clients used to make). Every
    sample of every step is scored, once, with the score the same reward gives in-process."""
    with RewardClient.http(services.rm_url, timeout_s=SERVICE_TIMEOUT_S) as rm:
        remote = rm.as_reward_fn("correct")
        calls, restarts = [], []

        def reward(prompts, completions, **kw):
            if len(calls) == 1:  # step 2: the call meets a dead server
                services.rm.proc.kill()
                services.rm.proc.wait()
                restarts.append(in_background(lambda: services.rm.restart(down_s=DOWN_S)))
            out = remote(prompts, completions, **kw)
            calls.append((list(prompts), list(completions), list(kw["reference"]), out))
            return out

        reward.reward_id = remote.reward_id
        model, tok = load_embedded("policy")
        pid = services.rm.proc.pid
        history = train(GRPOConfig(steps=3, **TINY), model, tok, policy, reward, RunDir(tmp_path))
        restarts[0].join(180)
    with RewardClient(LocalTransport(rewards=["correct"]), timeout_s=SERVICE_TIMEOUT_S) as rm:
        local = rm.as_reward_fn("correct")
        wrong = sum(out != local(p, c, reference=r) for p, c, r, out in calls)
    samples = sum(m["samples"] for m in history)
    print(
        f"\nrm_server SIGKILL mid-training (1 fault, down {DOWN_S:g}s): {len(history)} steps, {samples} samples, "
        f"{sum(m['reward_failed'] for m in history)} rewards failed, {wrong} reward calls differing from in-process"
    )
    assert services.rm.proc.pid != pid
    assert [m["step"] for m in history] == [1, 2, 3] and len(calls) == 3
    assert all(m["samples"] == 8 and m["reward_failed"] == 0 for m in history)
    assert wrong == 0
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_sigkill_of_policy_server_during_a_weight_push_applies_it_once(services, policy, tmp_path, monkeypatch):
    """The policy server is SIGKILLed halfway through the upload of step 2's weights. The client
    does not resend a push whose answer was lost; the trainer waits for the server's version: the
    restarted server (at its start-up checkpoint, version 0) then gets the trainer's weights exactly
    once, under the version the cut push named, and every later rollout comes from them."""
    chunks_of, update_of = policy_module.safetensors_chunks, policy.update_weights
    pushes, attempts, restarts = [], [], []  # the version each push names; the push each upload belongs to

    def counting_update(tensors, **kw):
        pushes.append(kw["version"])
        return update_of(tensors, **kw)

    def killing_chunks(tensors, metadata=None):
        attempts.append(len(pushes))
        chunks, size = chunks_of(tensors, metadata)
        if len(pushes) != 3 or attempts.count(3) != 1:
            return chunks, size  # only push 3 is cut (1: the run's first sync, 2: step 1's, 3: step 2's)

        def cut():
            yield next(chunks)
            services.policy.proc.kill()  # the server has part of the body
            services.policy.proc.wait()
            restarts.append(in_background(lambda: services.policy.restart(down_s=DOWN_S)))
            yield from chunks

        return cut(), size

    monkeypatch.setattr(policy, "update_weights", counting_update)
    monkeypatch.setattr(policy_module, "safetensors_chunks", killing_chunks)
    with RewardClient.http(services.rm_url, timeout_s=SERVICE_TIMEOUT_S) as rm:
        model, tok = load_embedded("policy")
        pid = services.policy.proc.pid
        history = train(GRPOConfig(steps=3, **TINY), model, tok, policy, rm.as_reward_fn("correct"), RunDir(tmp_path))
    restarts[0].join(180)
    versions = [m["weight_version"] for m in history]
    print(
        f"\npolicy_server SIGKILL during a weight push (1 fault, down {DOWN_S:g}s): {len(history)} steps, "
        f"{len(pushes)} pushes (of versions {pushes}), weight versions per step {versions}, "
        f"{sum(m['samples'] for m in history)} samples, {sum(m['stale_dropped'] for m in history)} stale dropped"
    )
    assert services.policy.proc.pid != pid
    # the cut push was not resent blindly: the trainer read the restarted server's version (0) and pushed
    # the same version once more, which the server took directly
    assert attempts.count(3) == 1 and len(pushes) == 5 and pushes[3] == pushes[2]
    assert [m["samples"] for m in history] == [8, 8, 8]
    assert all(m["server_logprob_gap"] < 1e-3 for m in history)  # every rollout from the trainer's weights
    # step 2's weights landed once, under the version the cut push named, and step 3's next
    assert versions[1:] == [pushes[2], pushes[2] + 1] == pushes[3:] and policy.weight_version() == pushes[4]


def test_sigkill_of_the_trainer_resumes_without_applying_a_step_twice(services, tmp_path):
    """`assay train grpo` is SIGKILLed after step 3 (its weights already pushed, its checkpoint not
    yet written); `--resume` redoes step 3 from the step-2 checkpoint. Every step is logged once,
    the optimizer has stepped exactly once per step, and every rollout came from the trainer's
    own weights, although the server held the killed run's step 3 when the resumed run began."""
    run = tmp_path / "run"
    argv = [
        sys.executable,
        "-m",
        "assay",
        "train",
        "grpo",
        "--run-dir",
        str(run),
        "--rm-url",
        services.rm_url,
        "--policy-url",
        services.policy_url,
    ]
    config = tmp_path / "grpo.yaml"
    config.write_text("\n".join(f"{k}: {v}" for k, v in {**TINY, "steps": 5, "checkpoint_every": 2}.items()))
    proc = subprocess.Popen([*argv, "--config", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not any(m["step"] == 3 for m in RunDir(run).metrics()):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before step 3"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = [m["step"] for m in RunDir(run).metrics()]
    latest = RunDir(run).latest().name
    done = subprocess.run([*argv, "--config", str(config), "--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    metrics = RunDir(run).metrics()
    optimizer = torch.load(run / "checkpoints" / "step-000005" / "policy.optimizer.pt", weights_only=True)
    adam_steps = {int(s["step"]) for s in optimizer["state"].values()}
    print(
        f"\ntrainer SIGKILL after step {killed_at[-1]} (1 fault, checkpoint {latest}): resumed, steps logged "
        f"{[m['step'] for m in metrics]}, optimizer steps {adam_steps}, weight versions "
        f"{[m['weight_version'] for m in metrics]}"
    )
    assert latest == "step-000002"  # killed between two checkpoints
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5]
    assert adam_steps == {5}  # one optimisation step per training step, none twice
    assert all(m["server_logprob_gap"] < 1e-3 for m in metrics)
    resumed = [m["weight_version"] for m in metrics[2:]]
    assert resumed == list(range(resumed[0], resumed[0] + 3))  # one push per step after the resume
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000004", "step-000005"]
