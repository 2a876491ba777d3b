"""Model workers (`rm_server.backends.worker`): each model reward's forward passes in a process of its own.

Real worker processes on the embedded checkpoints, and real faults: a worker SIGKILLed while
clients score, the server itself stopped or SIGKILLed with its workers running.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from assay.arith.world import eval_problems
from assay.checkpoints import ARITH_DIR, CheckpointError
from assay.clients import RewardClient
from assay.rm_server.backends import OutOfMemory, worker
from assay.rm_server.backends.hf import TransformersBackend
from assay.rm_server.backends.worker import WorkerBackend
from assay.rm_server.config import ModelRuntime, ServerConfig
from assay.rm_server.local import LocalTransport
from assay.rm_server.protocol import ErrorResponse, ErrorType, ScoreResponse
from assay.rm_server.server import BackgroundServer
from assay.services import free_port
from tests.helpers import torch_threads, wait_for, wait_ready

pytestmark = pytest.mark.service

SPEC = f"""
rewards:
  orm:     {{type: model.outcome, path: {ARITH_DIR / "orm"}, activation: sigmoid}}
  prm:     {{type: model.process, path: {ARITH_DIR / "prm"}, steps: arith, aggregate: min}}
  correct: {{type: rule.math_equal, answer_pattern: "####\\\\s*(-?\\\\d+)\\\\s*$"}}
"""
PROBLEMS = eval_problems(12)


def items(n: int = 12) -> list[dict]:
    return [{"id": f"i{k}", "prompt": p.prompt, "response": p.solution} for k, p in enumerate(PROBLEMS[:n])]


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("workers") / "rewards.yaml"
    path.write_text(SPEC)
    return path


@pytest.fixture(scope="module")
def served(spec):
    """The service with two torch threads in each model worker."""
    with BackgroundServer(ServerConfig(spec=spec, port=0, grpc_port=None, models=ModelRuntime(torch_threads=2))) as s:
        yield s


def running(pid: int) -> bool:
    """Whether a process exists and is not a zombie (an exited child nobody has reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def descendants(pid: int) -> set[int]:
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError):
            continue
    found, todo = set(), [pid]
    while todo:
        pid = todo.pop()
        kids = [p for p, parent in parents.items() if parent == pid]
        found.update(kids)
        todo.extend(kids)
    return found


# --- the backend ------------------------------------------------------------------------------


def test_a_worker_computes_bit_for_bit_what_the_backend_in_this_process_does():
    tokenizer = TransformersBackend(ARITH_DIR / "orm", "outcome").tokenizer
    batch = tokenizer([p.prompt + p.solution[: 5 + 3 * k] for k, p in enumerate(PROBLEMS[:6])])["input_ids"]
    assert len({len(ids) for ids in batch}) > 1  # padded rows too
    with torch_threads(1):
        for name, kind in (("orm", "outcome"), ("prm", "process")):
            here = TransformersBackend(ARITH_DIR / name, kind)
            worker = WorkerBackend("transformers", ARITH_DIR / name, kind, label=name, torch_threads=1)
            try:
                assert worker.pid != os.getpid() and worker.torch_threads == 1
                assert (worker.num_labels, worker.max_positions) == (here.num_labels, here.max_positions)
                pairs = list(zip(here.per_token(batch), worker.per_token(batch), strict=True))
                if kind == "outcome":
                    pairs += list(zip(here.pooled(batch), worker.pooled(batch), strict=True))
                for a, b in pairs:
                    assert a.dtype == b.dtype == np.float32 and np.array_equal(a, b)
            finally:
                worker.close()
            assert not running(worker.pid)


def test_a_load_that_fails_in_the_worker_is_raised_here_as_itself(tmp_path):
    for f in (ARITH_DIR / "orm").iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, tmp_path / f.name)
    with pytest.raises(CheckpointError, match="no safetensors weights found"):
        WorkerBackend("transformers", tmp_path, "outcome", label="orm", torch_threads=1)


# --- the service ------------------------------------------------------------------------------


def test_torch_threads_reach_each_model_worker(served):
    for name in ("orm", "prm"):
        backend = served.service.rewards[name].backend
        assert isinstance(backend, WorkerBackend)
        assert backend.pid != os.getpid() and running(backend.pid)
        assert backend.torch_threads == 2  # torch.get_num_threads() in the worker, after loading


def test_served_scores_are_the_in_process_rewards(served, spec):
    with (
        torch_threads(2),
        RewardClient(LocalTransport(spec, rewards=["orm", "prm"]), timeout_s=120) as local,
        RewardClient.http(served.http_url, timeout_s=120) as remote,
    ):
        for reward, granularity in (("orm", "outcome"), ("orm", "tokens"), ("prm", "steps")):
            here = local.score(reward, items(), granularity=granularity).results
            there = remote.score(reward, items(), granularity=granularity).results
            assert [r.model_dump() for r in there] == [r.model_dump() for r in here]
            assert all(r.error is None for r in there)


def test_a_worker_killed_under_load_fails_its_batch_typed_and_a_new_one_takes_over(spec):
    config = ServerConfig(spec=spec, port=0, grpc_port=None, models=ModelRuntime(torch_threads=1))
    with BackgroundServer(config) as s, RewardClient.http(s.http_url, timeout_s=60) as client:
        expected = {r.id: r.score for r in client.score("orm", items()).results}
        reward = s.service.rewards["orm"]
        first = reward.backend.pid
        replies: list[httpx.Response] = []
        not_ready_seen, stop = threading.Event(), threading.Event()

        def score() -> None:
            with httpx.Client(timeout=90) as http:
                while not stop.is_set():
                    body = {"reward": "orm", "items": items(), "timeout_s": 60}
                    replies.append(http.post(f"{s.http_url}/v1/score", json=body))

        def watch_ready() -> None:
            with httpx.Client(timeout=10) as http:
                while not stop.is_set():
                    if http.get(f"{s.http_url}/ready").status_code == 503:
                        not_ready_seen.set()
                    time.sleep(0.01)

        threads = [threading.Thread(target=score) for _ in range(3)] + [threading.Thread(target=watch_ready)]
        for t in threads:
            t.start()
        try:
            wait_for(lambda: len(replies) >= 6, 120, "no scores before the kill")
            os.kill(first, signal.SIGKILL)
            wait_for(lambda: reward.backend.restarts == 1 and reward.backend.ready, 120, "no new worker")
            settled = len(replies)
            wait_for(lambda: len(replies) >= settled + 6, 120, "no scores after the restart")
        finally:
            stop.set()
            for t in threads:
                t.join(120)
        assert not any(t.is_alive() for t in threads), "a client hung"
        assert not_ready_seen.is_set()  # /ready said 503 while the new worker loaded
        assert reward.backend.pid != first and not running(first)
        failed = 0
        for r in replies:
            if r.status_code == 503:  # a request that came while the new worker loaded: retryable
                assert ErrorResponse.model_validate_json(r.content).error.type == ErrorType.not_ready
                assert r.headers["Retry-After"]
                failed += 1
                continue
            assert r.status_code == 200
            for res in ScoreResponse.model_validate_json(r.content).results:
                if res.error is not None:  # the batch the worker died in: a typed failure, never a 0
                    assert res.error.type == ErrorType.internal and "model worker exited" in res.error.message
                    assert res.score is None
                    failed += 1
                else:
                    assert res.score == expected[res.id]
        assert failed > 0
        assert client.score("orm", items()).results[0].score == expected["i0"]


# --- no process outlives the server -----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_no_worker_outlives_the_server(spec, stop, tmp_path):
    port = free_port()
    log = tmp_path / "server.log"
    cmd = [sys.executable, "-m", "assay.rm_server", "--spec", str(spec), "--port", str(port), "--grpc-port", "none"]
    with log.open("w") as out:
        proc = subprocess.Popen([*cmd, "--torch-threads", "1"], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_ready(proc, f"http://127.0.0.1:{port}", log=log)
        workers = descendants(proc.pid)
        # the forkserver, a model worker per model reward, math-verify's pool (and multiprocessing's resource tracker)
        assert len(workers) >= 5, workers
        proc.send_signal(stop)
        assert proc.wait(60) == (0 if stop == signal.SIGTERM else -signal.SIGKILL), log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    wait_for(lambda: not any(running(p) for p in workers), 30, "worker processes outlived the server")


@pytest.mark.unit
def test_a_workers_exception_is_raised_here_as_the_reward_reads_it():
    crossed = lambda exc: worker._raised(json.loads(worker._failure(exc)[1:]))
    oom = crossed(OutOfMemory("cuda:0", 32, 2048))
    assert isinstance(oom, OutOfMemory) and (oom.device, oom.items, oom.tokens) == ("cuda:0", 32, 2048)
    assert str(oom) == str(OutOfMemory("cuda:0", 32, 2048))
    refused = crossed(CheckpointError("/m: no safetensors weights found"))
    assert type(refused) is CheckpointError and str(refused) == "/m: no safetensors weights found"
    other = crossed(KeyError("weight"))
    assert isinstance(other, worker.WorkerError) and str(other) == "KeyError: 'weight'"


# --- the settings -----------------------------------------------------------------------------


@pytest.mark.unit
def test_threads_are_set_not_left_to_torch():
    assert ModelRuntime(torch_threads=3).threads(models=2) == 3
    cores = len(os.sched_getaffinity(0))
    assert ModelRuntime().threads(models=1) == max(1, cores - 1)  # one core for the event loop
    assert ModelRuntime().threads(models=cores * 2) == 1
    with pytest.raises(ValueError, match="torch_threads must be at least 1"):
        ModelRuntime(torch_threads=0)
