"""Hostile connections: idle, slow headers, slow bodies, too many; and a second server on a taken port.

The reward server runs in-process (BackgroundServer, rules only) with short timeouts, and raw
sockets play the client that never finishes. Promised (README, Reliability): a connection that
sends nothing, or its headers too slowly, is closed within the header timeout; a body too slow
gets 408 in the protocol's shape within the body timeout; past the connection cap a new
connection gets the typed 503 with Retry-After. The bounds asserted are generous (2x and more).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from assay.base.connections import Connections
from assay.rm_server.config import ServerConfig
from assay.rm_server.protocol import ErrorResponse, ErrorType
from assay.rm_server.server import BackgroundServer
from assay.services import free_port
from tests.helpers import wait_ready

pytestmark = [pytest.mark.reliability, pytest.mark.service]

HEADER_S, BODY_S, IDLE_S = 1.0, 2.0, 1.0
LIMITS = Connections(max_connections=8, header_timeout_s=HEADER_S, body_timeout_s=BODY_S, idle_timeout_s=IDLE_S)


@pytest.fixture(scope="module")
def server(rules_spec):
    with BackgroundServer(ServerConfig(spec=rules_spec, port=0, grpc_port=None, connections=LIMITS)) as s:
        yield s


def _connect(server) -> socket.socket:
    host, port = server.http_url.removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=30)


def _closed_within(sock: socket.socket, bound_s: float) -> tuple[float, bytes]:
    """Seconds until the server closes `sock` (reading what it sent), failing past `bound_s`."""
    start, received = time.monotonic(), b""
    sock.settimeout(bound_s)
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except TimeoutError:
        pytest.fail(f"the server kept the connection open for {bound_s}s")
    except ConnectionResetError:
        pass
    return time.monotonic() - start, received


def _json_body(raw: bytes) -> bytes:
    return raw.split(b"\r\n\r\n", 1)[1]


def test_a_connection_that_sends_nothing_is_closed_within_the_header_timeout(server):
    with _connect(server) as sock:
        took, received = _closed_within(sock, 10 * HEADER_S)
    assert received == b"" and took >= HEADER_S * 0.5


def test_headers_sent_a_byte_at_a_time_are_cut_off_at_the_header_timeout(server):
    request = b"POST /v1/score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    with _connect(server) as sock:
        start = time.monotonic()
        for byte in request:  # one byte every 0.2 s: a slowloris never finishing its headers
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            if time.monotonic() - start > 10 * HEADER_S:
                pytest.fail("the server kept reading headers past the header timeout")
            time.sleep(0.2)
        _, received = _closed_within(sock, 10 * HEADER_S)
    assert time.monotonic() - start < 10 * HEADER_S
    assert received.startswith(b"HTTP/1.1 408"), received


def test_a_kept_alive_connection_is_closed_when_idle(server):
    with _connect(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        _, received = _closed_within(sock, 10 * IDLE_S)
    assert received.startswith(b"HTTP/1.1 200")


def test_a_body_too_slow_gets_408_in_the_protocol_shape(server):
    head = (
        b"POST /v1/score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    )
    with _connect(server) as sock:
        sock.sendall(head + b'{"reward": "format", ')  # and then nothing more
        _, received = _closed_within(sock, 10 * BODY_S)
    assert received.startswith(b"HTTP/1.1 408"), received
    assert ErrorResponse.model_validate_json(_json_body(received)).error.type == ErrorType.invalid_request


def test_past_the_connection_cap_a_new_connection_gets_the_typed_503(server):
    held = [_connect(server) for _ in range(LIMITS.max_connections)]
    try:
        time.sleep(0.5)  # the server has accepted them all
        with _connect(server) as extra:
            _, received = _closed_within(extra, 30)
    finally:
        for sock in held:
            sock.close()
    assert received.startswith(b"HTTP/1.1 503"), received
    assert b"retry-after: 1" in received.lower()
    assert ErrorResponse.model_validate_json(_json_body(received)).error.type == ErrorType.not_ready


@pytest.mark.parametrize("taken", ["http", "grpc"])
def test_a_second_server_on_a_taken_port_exits_with_one_sentence_naming_it(rules_spec, taken):
    port, grpc_port = free_port(), free_port()
    argv = [sys.executable, "-m", "assay.rm_server", "--spec", str(rules_spec), "--log-level", "warning"]
    first = subprocess.Popen(
        [*argv, "--port", str(port), "--grpc-port", str(grpc_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_ready(first, f"http://127.0.0.1:{port}")  # both ports bound
        ports = (
            ["--port", str(free_port()), "--grpc-port", str(grpc_port)]
            if taken == "grpc"
            else ["--port", str(port), "--grpc-port", str(free_port())]
        )
        second = subprocess.run([*argv, *ports], capture_output=True, text=True, timeout=300)
    finally:
        first.terminate()
        first.wait(60)
    out = second.stdout + second.stderr
    taken_port = grpc_port if taken == "grpc" else port
    assert second.returncode == 2, out
    assert f"{'gRPC' if taken == 'grpc' else 'HTTP'} port {taken_port} on 127.0.0.1 is already in use" in out
    assert "Traceback" not in out
