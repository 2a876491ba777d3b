"""SIGTERM with requests in flight: every request completes or gets a retryable, typed error.

Each service runs as a real subprocess (`python -m assay.rm_server`, `python -m assay.policy_server`, as a
user starts it). Some 30 requests are put in flight, then SIGTERM. Promised (README, Reliability):
`/ready` turns 503 at once; a request sent during the drain gets 503 in the protocol's error
shape with Retry-After; requests in flight finish within `--drain-timeout`, and those cut off
at its end get that same 503 (gRPC: UNAVAILABLE); never a bare 500; the process exits 0 within
the drain time and a margin. Raw httpx and grpc here, not the clients: they would retry.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import httpx
import pytest

from assay.policy_server.protocol import CompletionResponse
from assay.policy_server.protocol import ErrorResponse as PolicyError
from assay.proto.reward.v1 import reward_pb2 as pb
from assay.proto.reward.v1 import reward_pb2_grpc
from assay.rm_server.protocol import ErrorResponse as RewardError
from assay.rm_server.protocol import ErrorType, ScoreResponse
from assay.services import free_port
from tests.helpers import wait_ready

pytestmark = [pytest.mark.reliability, pytest.mark.service]

EXIT_MARGIN_S = 30.0  # after the drain: closing the models, on a loaded 2-core machine
ITEM = {"prompt": "Q: 23+45-17 A: ", "response": "23+45=68 68-17=51 #### 51"}


class Proc:
    """A service started as a user starts it, its output in a file."""

    def __init__(self, module: str, args: list[str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", module, "--port", str(self.port), *args], stdout=out, stderr=subprocess.STDOUT
            )

    def wait_ready(self) -> None:
        wait_ready(self.proc, self.url, log=self.log)

    def terminate(self) -> float:
        """SIGTERM; the monotonic time it was sent."""
        self.proc.send_signal(signal.SIGTERM)
        return time.monotonic()

    def exit_after(self, sent: float, bound_s: float) -> tuple[int, float]:
        """The exit status and the seconds from SIGTERM to exit (killed past `bound_s`: a failure)."""
        try:
            status = self.proc.wait(timeout=max(1.0, bound_s - (time.monotonic() - sent)))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"did not exit within {bound_s:g}s of SIGTERM:\n{self.log.read_text()[-3000:]}")
        return status, time.monotonic() - sent

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


async def _post(client: httpx.AsyncClient, url: str, body: dict) -> httpx.Response | Exception:
    try:
        return await client.post(url, json=body, timeout=300)
    except httpx.HTTPError as exc:
        return exc


async def _stream(
    client: httpx.AsyncClient, url: str, body: dict, started: asyncio.Event
) -> httpx.Response | Exception:
    """A streamed request, read to its end (a stream broken off raises); `started` is set once it answers."""
    try:
        async with client.stream("POST", url, json={**body, "stream": True}, timeout=300) as r:
            started.set()
            await r.aread()
            return r
    except httpx.HTTPError as exc:
        return exc


def _stream_outcome(answer: httpx.Response | Exception) -> str:
    """A stream's: 'ok' (to [DONE]), 'cut' (a last error event, the typed 503, then [DONE]), or as `_outcome`."""
    if isinstance(answer, Exception) or answer.status_code != 200:
        return _outcome(answer, CompletionResponse, PolicyError, _typed_policy_503)
    *chunks, done = answer.text.removesuffix("\n\n").split("\n\n")
    if done != "data: [DONE]":
        return f"stream ended without [DONE]: {answer.text[-200:]}"
    if '"error"' not in chunks[-1]:
        return "ok"
    error = PolicyError.model_validate_json(chunks[-1].removeprefix("data: ")).error
    return "cut" if (error.type, error.code) == ("server_error", "shutting_down") else f"error event {error}"


def _outcome(answer: httpx.Response | Exception, ok_model, error_model, retry_type) -> str:
    """'ok', 'retry' (the typed 503), 'refused' (sent after the socket closed), or a failure's description."""
    if isinstance(answer, httpx.ConnectError):
        return "refused"
    if isinstance(answer, Exception):
        return f"transport error {answer!r}"
    if answer.status_code == 200:
        ok_model.model_validate_json(answer.content)
        return "ok"
    if answer.status_code == 503 and answer.headers.get("retry-after"):
        error = error_model.model_validate_json(answer.content).error
        if retry_type(error):
            return "retry"
    return f"{answer.status_code} {answer.headers.get('content-type')} {answer.text[:200]}"


def _typed_reward_503(error) -> bool:
    return error.type == ErrorType.not_ready


def _typed_policy_503(error) -> bool:
    return error.type == "server_error" and error.code == "not_ready"


async def _ready_status(url: str) -> int | str:
    try:
        async with httpx.AsyncClient() as client:
            return (await client.get(f"{url}/ready", timeout=10)).status_code
    except httpx.ConnectError:
        return "refused"


# --- rm_server -------------------------------------------------------------------------------


@pytest.fixture
def reward_server(tmp_path):
    started: list[Proc] = []

    def start(drain_s: float, grpc_port: int | None = None) -> Proc:
        proc = Proc(
            "assay.rm_server",
            [
                "--grpc-port",
                "none" if grpc_port is None else str(grpc_port),
                "--drain-timeout",
                str(drain_s),
                "--log-level",
                "warning",
            ],
            tmp_path / f"rm{len(started)}.log",
        )
        started.append(proc)
        proc.wait_ready()
        return proc

    yield start
    for proc in started:
        proc.kill()


def _score(n_items: int, reward: str = "prm") -> dict:
    return {"reward": reward, "items": [{"id": str(i), **ITEM} for i in range(n_items)]}


def test_rm_server_finishes_what_is_in_flight_and_refuses_new_work_typed(reward_server):
    drain_s = 120.0
    server = reward_server(drain_s)

    async def run():
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=64)) as client:
            flight = [asyncio.ensure_future(_post(client, f"{server.url}/v1/score", _score(32))) for _ in range(30)]
            await asyncio.sleep(1.0)  # all sent and read; the server works through them (2-30 s)
            sent = server.terminate()
            await asyncio.sleep(0.5)
            ready = await _ready_status(server.url)
            late = await _post(client, f"{server.url}/v1/score", _score(1, "format"))
            answers = await asyncio.gather(*flight)
            return answers, late, ready, sent

    answers, late, ready, sent = asyncio.run(run())
    status, took = server.exit_after(sent, drain_s + EXIT_MARGIN_S)
    outcomes = Counter(_outcome(a, ScoreResponse, RewardError, _typed_reward_503) for a in answers)
    assert set(outcomes) <= {"ok", "retry", "refused"}, outcomes
    assert outcomes["ok"] >= 1, outcomes  # the ones in flight finished
    assert ready in (503, "refused"), ready
    assert status == 0, server.log.read_text()[-3000:]
    assert "Traceback" not in server.log.read_text()
    late_outcome = _outcome(late, ScoreResponse, RewardError, _typed_reward_503)
    assert late_outcome in ("retry", "refused"), late_outcome
    print(f"rm_server drain: {dict(outcomes)}, late request: {late_outcome}, exit 0 {took:.1f}s after SIGTERM")


def test_rm_server_cuts_off_at_the_drain_timeout_with_typed_retryable_errors(reward_server):
    drain_s = 1.0
    grpc_port = free_port()
    server = reward_server(drain_s, grpc_port)

    async def grpc_score(stub) -> str:
        request = pb.ScoreRequest(reward="prm", items=[pb.ScoreItem(id=str(i), **ITEM) for i in range(64)])
        try:
            await stub.Score(request, timeout=300)
            return "ok"
        except grpc.aio.AioRpcError as exc:
            return exc.code().name

    async def run():
        async with (
            httpx.AsyncClient(limits=httpx.Limits(max_connections=64)) as client,
            grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel,
        ):
            stub = reward_pb2_grpc.RewardServiceStub(channel)
            http = [asyncio.ensure_future(_post(client, f"{server.url}/v1/score", _score(64))) for _ in range(30)]
            calls = [asyncio.ensure_future(grpc_score(stub)) for _ in range(20)]
            await asyncio.sleep(1.0)  # sent and being worked on
            sent = server.terminate()
            return await asyncio.gather(*http), await asyncio.gather(*calls), sent

    answers, codes, sent = asyncio.run(run())
    status, took = server.exit_after(sent, drain_s + EXIT_MARGIN_S)
    outcomes = Counter(_outcome(a, ScoreResponse, RewardError, _typed_reward_503) for a in answers)
    assert set(outcomes) <= {"ok", "retry", "refused"}, outcomes
    # 50 requests of 64 items (3200, under the queue of 4096) outlast 1 s of work and a 1 s drain
    assert outcomes["retry"] + Counter(codes)["UNAVAILABLE"] >= 1, outcomes
    assert set(codes) <= {"ok", "UNAVAILABLE"}, Counter(codes)
    assert status == 0, server.log.read_text()[-3000:]
    print(f"rm_server cut-off: HTTP {dict(outcomes)}, gRPC {dict(Counter(codes))}, exit 0 {took:.1f}s after SIGTERM")


# --- policy_server ---------------------------------------------------------------------------


def test_policy_server_drains_and_cuts_off_with_typed_retryable_errors(tmp_path):
    drain_s = 1.0
    server = Proc(
        "assay.policy_server",
        ["--drain-timeout", str(drain_s), "--torch-threads", "1", "--log-level", "warning"],
        tmp_path / "policy.log",
    )
    try:
        server.wait_ready()
        body = {"model": "policy", "prompt": "Q: 23+45-17 A: ", "max_tokens": 200, "n": 8, "ignore_eos": True}

        async def run():
            async with httpx.AsyncClient(limits=httpx.Limits(max_connections=64)) as client:
                # streams first, long ones (a batch of 32 sequences), one under way before the rest is sent
                started = asyncio.Event()
                long = {**body, "n": 32, "max_tokens": 240}
                url = f"{server.url}/v1/completions"
                streams = [asyncio.ensure_future(_stream(client, url, long, started)) for _ in range(2)]
                await asyncio.wait_for(started.wait(), 120)
                flight = [asyncio.ensure_future(_post(client, url, body)) for _ in range(30)]
                await asyncio.sleep(2.0)
                sent = server.terminate()
                await asyncio.sleep(0.3)
                ready = await _ready_status(server.url)
                late = await _post(client, f"{server.url}/v1/completions", body)
                return await asyncio.gather(*flight), await asyncio.gather(*streams), late, ready, sent

        answers, streamed, late, ready, sent = asyncio.run(run())
        status, took = server.exit_after(sent, drain_s + EXIT_MARGIN_S)
    finally:
        server.kill()
    outcomes = Counter(_outcome(a, CompletionResponse, PolicyError, _typed_policy_503) for a in answers)
    assert set(outcomes) <= {"ok", "retry", "refused"}, outcomes
    assert outcomes["retry"] >= 1, outcomes  # 240 sequences of 200 tokens outlast a 1 s drain
    # a stream under way when the drain ends gets a last error event and its end, never a broken response
    stream_outcomes = Counter(_stream_outcome(a) for a in streamed)
    assert set(stream_outcomes) <= {"ok", "cut", "retry"}, stream_outcomes
    assert stream_outcomes["ok"] + stream_outcomes["cut"] >= 1, stream_outcomes  # one had started before SIGTERM
    assert ready in (503, "refused"), ready
    assert _outcome(late, CompletionResponse, PolicyError, _typed_policy_503) in ("retry", "refused")
    assert status == 0, server.log.read_text()[-3000:]
    print(f"policy_server drain: {dict(outcomes)}, streams {dict(stream_outcomes)}, exit 0 {took:.1f}s after SIGTERM")
