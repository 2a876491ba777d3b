"""The servers' shared runtime (assay.base.serve, assay.base.grpc_serve, assay.base.logs) against the real reward
server on loopback: busy ports, malformed gRPC messages, what an unexpected error answers and logs.

Timing bounds (timeouts, the drain) are the reliability suite's (tests/reliability)."""

from __future__ import annotations

import asyncio
import io
import logging
import socket
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest
from fastapi import FastAPI

from assay.base.connections import Connections
from assay.base.logs import OneTracebackPerSite
from assay.base.serve import BackgroundServer, HttpListener, PortInUse
from assay.rm_server.config import ServerConfig
from assay.rm_server.protocol import ErrorResponse, ErrorType
from assay.rm_server.server import BackgroundServer as RewardBackgroundServer
from assay.rm_server.server import RewardServer, error_reply
from tests.helpers import wait_for

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def server(rules_spec):
    with RewardBackgroundServer(ServerConfig(spec=rules_spec, port=0, grpc_port=0)) as s:
        yield s


# --- ports -----------------------------------------------------------------------------------


def test_a_taken_grpc_port_fails_the_start_with_a_sentence_naming_it(server, rules_spec):
    # grpc's default SO_REUSEPORT let a second server bind the port and take half the calls
    second = RewardServer(ServerConfig(spec=rules_spec, port=0, grpc_port=server.grpc_port))
    with (
        pytest.raises(PortInUse, match=f"gRPC port {server.grpc_port} on 127.0.0.1 is already in use"),
        BackgroundServer(lambda: second),
    ):
        pass


def test_a_taken_http_port_fails_the_start_with_a_sentence_naming_it(server, rules_spec):
    port = int(server.http_url.rsplit(":", 1)[1])
    with (
        pytest.raises(PortInUse, match=f"HTTP port {port} on 127.0.0.1 is already in use"),
        RewardBackgroundServer(ServerConfig(spec=rules_spec, port=port, grpc_port=None)),
    ):
        pass


def test_the_http_socket_never_shares_its_port(server):
    # SO_REUSEADDR (kept, for restarts over TIME_WAIT) must not let a second listener in
    port = int(server.http_url.rsplit(":", 1)[1])
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        with pytest.raises(OSError):
            s.bind(("127.0.0.1", port))


# --- malformed gRPC messages -----------------------------------------------------------------


@pytest.mark.parametrize("method", ["Score", "Compare", "ListRewards"])
def test_bytes_that_are_not_the_request_message_get_invalid_argument(server, method):
    with grpc.insecure_channel(server.grpc_target) as channel:
        call = channel.unary_unary(f"/assay.reward.v1.RewardService/{method}")  # raw bytes in and out
        with pytest.raises(grpc.RpcError) as err:
            call(b"\xff\xff\xff\xff not a protobuf", timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert "does not parse" in err.value.details()
    assert ("error-type", ErrorType.invalid_request.value) in err.value.trailing_metadata()


def test_a_malformed_message_in_a_stream_gets_invalid_argument(server):
    with grpc.insecure_channel(server.grpc_target) as channel:
        call = channel.stream_stream("/assay.reward.v1.RewardService/ScoreStream")
        with pytest.raises(grpc.RpcError) as err:
            list(call(iter([b"\xff\xff\xff\xff"]), timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()


@pytest.mark.unit
def test_the_policy_service_refuses_malformed_bytes_the_same_way():
    from assay.base.grpc_serve import MalformedMessage
    from assay.policy_server.grpc_api import describe

    failure = describe(MalformedMessage("the request message does not parse"))
    assert failure.status == grpc.StatusCode.INVALID_ARGUMENT and failure.type == "invalid_request_error"


# --- unexpected errors: the service's shape, one log line ------------------------------------


class _Faulty:
    """A server whose one route raises (what any bug in a route looks like to the runtime) and
    whose other route waits until released (work in flight)."""

    def __init__(self) -> None:
        self.http = HttpListener("127.0.0.1")
        self.release = asyncio.Event()

    async def start(self) -> None:
        app = FastAPI()

        @app.get("/boom")
        async def boom():
            raise ZeroDivisionError("the bug's own message")

        @app.get("/health")
        async def health():
            return {"status": "ok"}

        @app.get("/slow")
        async def slow():
            await self.release.wait()
            return {"done": True}

        await self.http.start(app, 0, "warning", error_reply, Connections())

    async def wait(self) -> None:
        await self.http.wait()

    async def stop(self) -> None:
        await self.http.stop()


@pytest.fixture
def log_lines():
    """The root logger's output with the runtime's traceback filter, as the CLIs set it up."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(OneTracebackPerSite())
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield out
    finally:
        root.removeHandler(handler)


def test_an_unexpected_error_answers_500_in_the_protocol_shape_and_logs_one_line(log_lines):
    with BackgroundServer(_Faulty) as faulty, httpx.Client(base_url=faulty.http.url, timeout=30) as client:
        answers = [client.get("/boom") for _ in range(20)]
    for r in answers:
        assert r.status_code == 500 and r.headers["content-type"] == "application/json"
        assert ErrorResponse.model_validate_json(r.content).error.type == ErrorType.internal
    log = log_lines.getvalue()
    assert log.count("Traceback") == 1, log  # the first time only
    assert log.count("ZeroDivisionError: the bug's own message") == 20  # every time, on its line
    # each repeat is one line: 20 requests' log stays a few KB, not 20 tracebacks of ~11 KB
    assert len(log) < 10_000, len(log)


@pytest.mark.unit
def test_a_traceback_is_logged_once_per_site_and_kept_at_debug():
    out = io.StringIO()
    logger = logging.getLogger("test.one-traceback")
    handler = logging.StreamHandler(out)
    handler.addFilter(OneTracebackPerSite())
    logger.addHandler(handler)
    logger.propagate = False
    try:
        for site in ("a", "a", "b", "a"):
            try:
                raise ValueError(f"from {site}") if site == "a" else KeyError(site)
            except Exception:
                logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    text = out.getvalue()
    assert text.count("Traceback") == 2  # one per site
    assert text.count("failed [ValueError: from a; traceback logged before]") == 2


# --- the drain -------------------------------------------------------------------------------


def test_the_drain_refuses_new_work_and_cuts_off_what_runs_with_the_typed_503():
    background = BackgroundServer(_Faulty)
    with (
        background as faulty,
        httpx.Client(base_url=faulty.http.url, timeout=60) as client,
        ThreadPoolExecutor(4) as pool,
    ):
        running = [pool.submit(client.get, "/slow") for _ in range(3)]
        wait_for(lambda: faulty.http.gate.in_flight == 3, 60)
        # no time to finish (0 s): all three are cut off at once
        asyncio.run_coroutine_threadsafe(faulty.http.drain(0), background._loop).result(timeout=60)
        answers = [r.result(timeout=60) for r in running]
        late, ready, health = client.get("/slow"), client.get("/ready"), client.get("/health")
    for r in [*answers, late]:
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        assert ErrorResponse.model_validate_json(r.content).error.type == ErrorType.not_ready
    assert ready.status_code == 503 and ready.json() == {"status": "stopping"}
    assert health.status_code == 200  # the process still answers


def test_the_drain_lets_what_runs_finish_within_its_time():
    background = BackgroundServer(_Faulty)
    with (
        background as faulty,
        httpx.Client(base_url=faulty.http.url, timeout=60) as client,
        ThreadPoolExecutor(4) as pool,
    ):
        running = [pool.submit(client.get, "/slow") for _ in range(3)]
        wait_for(lambda: faulty.http.gate.in_flight == 3, 60)
        draining = asyncio.run_coroutine_threadsafe(faulty.http.drain(600), background._loop)
        wait_for(lambda: faulty.http.gate.draining, 60)
        late = client.get("/slow")
        background._loop.call_soon_threadsafe(faulty.release.set)
        answers = [r.result(timeout=60) for r in running]
        draining.result(timeout=60)
    assert [r.json() for r in answers] == [{"done": True}] * 3
    assert late.status_code == 503
