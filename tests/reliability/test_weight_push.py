"""SIGKILL of the policy server in the middle of a weight push, with greedy generations running.

The server is a real subprocess (`python -m assay.policy_server`); `assay.services.Service.restart` starts
it again on the same port, as a supervisor would. A trainer pushes full weight sets with
`expect_version`, alternating two of them so that a version's parity says which set it serves, and
the push in flight is cut off by SIGKILL once part of its body is sent. What must hold:

- the push gets a typed error at once, never a hang: `Unavailable`, marked not retryable because
  the client cannot know whether the update landed (the caller must look at `weight_version`);
- every generation either succeeds or gets a typed error, and every reply is exactly what the
  weights of the version it reports produce: no reply mixes two versions, before or after the kill;
- the restarted server serves its checkpoint again at `weight_version` 0. Pushed weights live in
  the server's memory only, so a trainer must push again after a restart: its next push with the
  `expect_version` it knew gets `Conflict`, which is the signal, and a push against version 0 then
  brings the server back to the trainer's weights.

Bounded: two server starts (about 25 s each on a loaded 2-core machine), a few pushes, and
generation loops capped in count and stopped at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest
import torch
from safetensors.torch import load_file

from assay.checkpoints import EMBEDDED
from assay.clients import Conflict, PolicyClient, Unavailable
from assay.clients import policy as policy_client
from assay.clients.errors import ServiceError
from assay.services import Service, free_port

pytestmark = [pytest.mark.reliability, pytest.mark.service]

PROMPT = "Q: 23+45-17 A: "
PUSH_TIMEOUT_S = 30.0  # a push's deadline: its error must come well within it
GENERATE_TIMEOUT_S = 60.0  # a generation's deadline, longer than a restart: retries may outlast it
MAX_GENERATIONS = 400  # per worker, whatever happens


@pytest.fixture
def policy(tmp_path):
    """`python -m assay.policy_server` serving the embedded policy, as a `Service` that can be restarted."""
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "assay.policy_server",
        "--model",
        str(EMBEDDED["policy"][1]),
        "--port",
        str(port),
        "--torch-threads",
        "1",
        "--log-level",
        "warning",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = tmp_path / "policy_server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    service = Service("policy_server", f"http://127.0.0.1:{port}", proc, log, argv, env)
    try:
        service.wait_ready(120)
        yield service
    finally:
        service.stop()


@dataclass
class Seen:
    """What the generation workers saw: (text, weight_version, after the restart) per choice."""

    replies: list[tuple[str, int, bool]] = field(default_factory=list)
    errors: list[ServiceError] = field(default_factory=list)
    slowest_s: float = 0.0


def generate(url: str, stop: threading.Event, restarted: threading.Event, seen: Seen) -> None:
    """Greedy completions until `stop`; any failure that is not a typed ServiceError ends the test."""
    with PolicyClient.http(url, timeout_s=GENERATE_TIMEOUT_S) as client:
        for _ in range(MAX_GENERATIONS):
            if stop.is_set():
                return
            after = restarted.is_set()
            start = time.monotonic()
            try:
                reply = client.complete([PROMPT] * 2, max_tokens=24, temperature=0.0)
                seen.replies.extend((c.text, c.weight_version, after) for c in reply.choices)
            except ServiceError as err:
                seen.errors.append(err)
                time.sleep(0.2)  # the server is down: no need to spin
            seen.slowest_s = max(seen.slowest_s, time.monotonic() - start)


def pausing_chunks(mid_push: threading.Event, resume: threading.Event):
    """`safetensors_chunks`, but once the first chunk is sent the upload waits for `resume`: the
    moment to kill the server with a push certainly in flight."""
    real = policy_client.safetensors_chunks

    def chunks(tensors, metadata=None):
        it, size = real(tensors, metadata)

        def paced():
            yield next(it)
            mid_push.set()
            resume.wait(60)
            yield from it

        return paced(), size

    return chunks


def served(seen: Seen, version: int, after_restart: bool, timeout_s: float = 30.0) -> bool:
    """Wait (bounded) until the generation load has had a reply from `version`."""
    deadline = time.monotonic() + timeout_s
    while not any(v == version and after == after_restart for _, v, after in seen.replies):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def greedy(client: PolicyClient) -> tuple[str, int]:
    choice = client.complete(PROMPT, max_tokens=24, temperature=0.0).choices[0]
    return choice.text, choice.weight_version


def test_sigkill_during_a_weight_push_loses_no_consistency_and_hangs_no_one(policy, monkeypatch):
    original = load_file(EMBEDDED["policy"][1] / "model.safetensors")  # the checkpoint the server starts from
    g = torch.Generator().manual_seed(0)
    other = {
        k: v + 0.3 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in original.items()
    }
    weights = (original, other)  # the set serving at version v is weights[v % 2]

    def push(client: PolicyClient, version: int) -> int:
        return client.update_weights(weights[(version + 1) % 2], expect_version=version).weight_version

    with PolicyClient.http(policy.url, timeout_s=PUSH_TIMEOUT_S, max_retries=2) as trainer:
        texts = {0: greedy(trainer)}
        assert push(trainer, 0) == 1
        texts[1] = greedy(trainer)
        assert texts[0][0] != texts[1][0] and texts[1][1] == 1
        by_parity = {v % 2: text for v, (text, _) in texts.items()}

        stop, restarted = threading.Event(), threading.Event()
        seen = Seen()
        with ThreadPoolExecutor(3) as pool:
            workers = [pool.submit(generate, policy.url, stop, restarted, seen) for _ in range(2)]
            try:
                version = 1
                for _ in range(4):  # pushes under load, each served to the load before the next
                    version = push(trainer, version)
                    assert served(seen, version, after_restart=False)

                # the fault: SIGKILL with the next push's body partly sent
                mid_push, resume = threading.Event(), threading.Event()
                monkeypatch.setattr(policy_client, "safetensors_chunks", pausing_chunks(mid_push, resume))
                pushing = pool.submit(push, trainer, version)
                assert mid_push.wait(PUSH_TIMEOUT_S)
                policy.proc.kill()
                policy.proc.wait()
                killed_at = time.monotonic()
                resume.set()
                with pytest.raises(Unavailable) as cut:
                    pushing.result(timeout=PUSH_TIMEOUT_S + 10)  # never a hang
                push_error_s = time.monotonic() - killed_at
                monkeypatch.undo()
                assert not cut.value.retryable  # it may have landed, for all the client knows: look first

                restart_s = time.monotonic()
                policy.restart(timeout_s=120)
                restart_s = time.monotonic() - restart_s  # SIGKILLs if needed (not here), starts again, waits ready
                restarted.set()
                # a restart serves the checkpoint at version 0: what was pushed is gone, and the
                # trainer's next push against the version it knew says so
                assert trainer.weight_version() == 0
                assert greedy(trainer) == texts[0]
                with pytest.raises(Conflict, match="at weight_version 0"):
                    push(trainer, version)
                version = push(trainer, 0)  # the trainer pushes its weights again
                assert greedy(trainer) == (by_parity[1], 1)
                version = push(trainer, version)
                assert greedy(trainer) == (by_parity[0], 2)
                assert served(seen, 2, after_restart=True)
            finally:
                stop.set()
                resume.set()
            for worker in workers:
                worker.result(timeout=GENERATE_TIMEOUT_S + 30)

    mixed = [(text, v) for text, v, _ in seen.replies if text != by_parity[v % 2]]
    assert mixed == []
    before = {v for _, v, after in seen.replies if not after}
    after = {v for _, v, after in seen.replies if after}
    assert {2, 3, 4, 5} <= before, before  # the load straddled the pushes before the kill
    assert 2 in after and after <= {0, 1, 2}, after  # and ran on the restarted server, from version 0
    assert all(isinstance(err, Unavailable) for err in seen.errors), seen.errors
    assert push_error_s < 10 and seen.slowest_s < GENERATE_TIMEOUT_S + 10
    print(
        f"\n{len(seen.replies)} choices checked ({len(before)} versions before the kill, {len(after)} after), "
        f"{len(seen.errors)} generations failed typed (Unavailable), push error {push_error_s:.2f}s after the "
        f"kill, restart {restart_s:.1f}s, slowest generation {seen.slowest_s:.1f}s"
    )
