"""Deadlines and cancellation: work stops when the caller gives up.

A hostile request (answers that keep sympy busy past math-verify's own limit, again and again)
gets typed `timeout` errors at its deadline, and the work it leaves behind neither delays the
next caller nor holds up a shutdown. Model items whose request gave up leave the queue unrun.
The bounds are generous (a loaded 2-core machine); the defect they catch is tens of seconds.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest

from assay.checkpoints import ARITH_DIR
from assay.proto.reward.v1 import reward_pb2_grpc
from assay.rm_server import grpc_convert as convert
from assay.rm_server.config import ServerConfig
from assay.rm_server.protocol import ErrorType, ScoreRequest, ScoreResponse
from assay.rm_server.server import BackgroundServer
from assay.services import free_port
from tests.helpers import wait_ready

pytestmark = [pytest.mark.reliability, pytest.mark.service]

# sympy spends far longer than math-verify's 5 s alarm on 9^(9^9) against 1, once per comparison
# it tries: about 5-10 s an item, so 24 of them on the 2 workers are a minute of work.
HOSTILE = [{"id": str(k), "prompt": "p", "response": "$9^{9^{9}}$", "reference": "1"} for k in range(24)]
NORMAL = [{"id": "n", "prompt": "p", "response": "$\\frac{1}{2}$", "reference": "0.5"}]
SPEC = (
    "rewards:\n"
    "  correct: {type: rule.math_equal, timeout_s: 5}\n"
    f"  orm: {{type: model.outcome, path: {ARITH_DIR / 'orm'}, max_wait_ms: 1}}\n"
)


def post(url: str, reward: str, items: list[dict], **extra) -> tuple[ScoreResponse, float]:
    start = time.monotonic()
    r = httpx.post(f"{url}/v1/score", json={"reward": reward, "items": items, **extra}, timeout=120)
    assert r.status_code == 200, r.text
    return ScoreResponse.model_validate_json(r.content), time.monotonic() - start


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    path = tmp_path_factory.mktemp("spec") / "rewards.yaml"
    path.write_text(SPEC)
    return path


@pytest.fixture(scope="module")
def server(spec):
    with BackgroundServer(ServerConfig(spec=spec, port=0, grpc_port=0)) as s:
        yield s


def test_a_hostile_math_request_stops_at_its_deadline_and_delays_nobody(server):
    hostile, took = post(server.http_url, "correct", HOSTILE, timeout_s=3)
    assert [(x.score, x.error and x.error.type) for x in hostile.results] == [(None, ErrorType.timeout)] * 24
    assert took < 15
    normal, took = post(server.http_url, "correct", NORMAL)
    assert normal.results[0].score == 1.0
    assert took < 10  # was 35 s and more: the abandoned items kept both workers busy


def test_a_caller_that_hangs_up_stops_its_math_work(server):
    # The client gives up after 2 s; its request had allowed itself 120 s.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{server.http_url}/v1/score", json={"reward": "correct", "items": HOSTILE, "timeout_s": 120}, timeout=2
        )
    normal, took = post(server.http_url, "correct", NORMAL)
    assert normal.results[0].score == 1.0
    assert took < 15


def test_a_grpc_caller_that_cancels_stops_its_math_work(server):
    request = ScoreRequest(reward="correct", items=HOSTILE, timeout_s=120)
    with grpc.insecure_channel(server.grpc_target) as channel:
        call = reward_pb2_grpc.RewardServiceStub(channel).Score.future(convert.score_request_to_proto(request))
        time.sleep(2)  # the hostile items are running by now
        call.cancel()
    normal, took = post(server.http_url, "correct", NORMAL)
    assert normal.results[0].score == 1.0
    assert took < 15


class HeldModel:
    """Wraps the ORM backend so the test can hold the model worker busy (a gate, not a fake model)."""

    def __init__(self, backend) -> None:
        self.inner, self.gate, self.calls = backend, threading.Event(), []
        self.num_labels = backend.num_labels

    def pooled(self, batch):
        self.calls.append(len(batch))
        self.gate.wait(60)
        return self.inner.pooled(batch)

    def per_token(self, batch):
        return self.inner.per_token(batch)

    @property
    def ready(self):
        return self.inner.ready

    def close(self):
        self.inner.close()


def test_model_items_whose_caller_gave_up_leave_the_queue_unrun(server):
    reward = server.service.rewards["orm"]
    held = reward.backend = HeldModel(reward.backend)
    try:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(post, server.http_url, "orm", [{"id": "a", "prompt": "Q: 1+1 A: ", "response": "2"}])
            end = time.monotonic() + 30
            while not held.calls:
                assert time.monotonic() < end, "the first batch never started"
                time.sleep(0.01)
            items = [{"id": str(k), "prompt": "Q: 1+1 A: ", "response": str(k)} for k in range(8)]
            late, _ = post(server.http_url, "orm", items, timeout_s=0.5)
            assert [x.error.type for x in late.results] == [ErrorType.timeout] * 8
            assert reward.queue_depth() == 0
            with pytest.raises(httpx.ReadTimeout):  # a caller that hangs up, with 120 s left on its deadline
                httpx.post(
                    f"{server.http_url}/v1/score", json={"reward": "orm", "items": items, "timeout_s": 120}, timeout=1
                )
            end = time.monotonic() + 10
            while reward.queue_depth():
                assert time.monotonic() < end, "the items of a caller that hung up stayed queued"
                time.sleep(0.05)
            held.gate.set()
            assert first.result()[0].results[0].score is not None
        assert held.calls == [1]  # the abandoned items were never computed
    finally:
        held.gate.set()
        reward.backend = held.inner


def test_sigterm_with_hostile_work_running_exits_promptly(spec):
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "assay.rm_server",
            "--spec",
            str(spec),
            "--port",
            str(port),
            "--grpc-port",
            "none",
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url)
        post(url, "correct", HOSTILE, timeout_s=3)  # leaves its items behind, on old code
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        took = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, proc.stdout.read()
    assert took < 15  # was 81 s: closing the pool waited for every abandoned item
