"""Test doubles: scripted stand-ins for the reward service's Score call, over HTTP and gRPC.

They exist to test what the real server will not do on demand: fail with 503 twice and then
answer, ask for a 1 s wait with 429, answer too slowly, or send back ids it was not sent. Each
answers `POST /v1/score` (HTTP) or `RewardService/Score` (gRPC) from a script, one step per
request, in order:

    Fail(...)              the status (with Retry-After / `retry-after` metadata when it says)
    Slow(seconds)          sleep, then answer like `echo`
    a function             ScoreRequest -> ScoreResponse, the reply to send

Every request is recorded, parsed with the protocol models, with its arrival time, so that
tests can check what a client sent and resent.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc

from assay.proto.reward.v1 import reward_pb2_grpc
from assay.rm_server import grpc_convert
from assay.rm_server.protocol import ErrorInfo, ErrorResponse, ErrorType, ItemResult, ScoreRequest, ScoreResponse


@dataclass(frozen=True)
class Fail:
    http_status: int
    grpc_code: grpc.StatusCode
    type: ErrorType
    retry_after: int | None = None


@dataclass(frozen=True)
class Slow:
    seconds: float


UNAVAILABLE = Fail(503, grpc.StatusCode.UNAVAILABLE, ErrorType.not_ready)
OVERLOADED = Fail(429, grpc.StatusCode.RESOURCE_EXHAUSTED, ErrorType.overloaded, retry_after=1)
INVALID = Fail(400, grpc.StatusCode.INVALID_ARGUMENT, ErrorType.invalid_request)
INTERNAL = Fail(500, grpc.StatusCode.INTERNAL, ErrorType.internal)


def echo(req: ScoreRequest) -> ScoreResponse:
    """Score = len(response): a value tied to its item, so a shifted result would show."""
    results = [ItemResult(id=i.id, score=float(len(i.response))) for i in req.items]
    return ScoreResponse(reward=req.reward, reward_id="sha256:double", results=results)


def reversed_echo(req: ScoreRequest) -> ScoreResponse:
    reply = echo(req)
    return reply.model_copy(update={"results": reply.results[::-1]})


def wrong_id(req: ScoreRequest) -> ScoreResponse:
    reply = echo(req)
    return reply.model_copy(update={"results": [reply.results[0].model_copy(update={"id": "x"}), *reply.results[1:]]})


def duplicate_id(req: ScoreRequest) -> ScoreResponse:
    reply = echo(req)
    return reply.model_copy(update={"results": [reply.results[0], reply.results[0], *reply.results[2:]]})


def missing_id(req: ScoreRequest) -> ScoreResponse:
    reply = echo(req)
    return reply.model_copy(update={"results": reply.results[:-1]})


Step = Fail | Slow | Callable[[ScoreRequest], ScoreResponse]
EXHAUSTED = Fail(500, grpc.StatusCode.INTERNAL, ErrorType.internal)


@dataclass
class Scripted:
    steps: list[Step]
    address: str = ""
    requests: list[ScoreRequest] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # time.monotonic() at each arrival
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, req: ScoreRequest) -> Fail | ScoreResponse:
        with self._lock:
            self.requests.append(req)
            self.times.append(time.monotonic())
            step = self.steps.pop(0) if self.steps else EXHAUSTED
        if isinstance(step, Fail):
            return step
        if isinstance(step, Slow):
            time.sleep(step.seconds)
            return echo(req)
        return step(req)


@contextmanager
def scripted_http(steps: list[Step]) -> Iterator[Scripted]:
    script = Scripted(list(steps))

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            answer = script.answer(ScoreRequest.model_validate_json(body))
            headers = {}
            if isinstance(answer, Fail):
                info = ErrorInfo(type=answer.type, message=f"double: {answer.type.value}")
                status, payload = answer.http_status, ErrorResponse(error=info).model_dump_json()
                if answer.retry_after is not None:
                    headers["Retry-After"] = str(answer.retry_after)
            else:
                status, payload = 200, answer.model_dump_json()
            self.send_response(status)
            for k, v in {"Content-Type": "application/json", **headers}.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload.encode())

        def log_message(self, *args) -> None:
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request, client_address) -> None:
            pass  # a client that gave up on a Slow step closed its end; that is the point

    server = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    script.address = f"http://127.0.0.1:{server.server_port}"
    try:
        yield script
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def scripted_grpc(steps: list[Step]) -> Iterator[Scripted]:
    script = Scripted(list(steps))

    class Servicer(reward_pb2_grpc.RewardServiceServicer):
        def Score(self, request, context):
            answer = script.answer(grpc_convert.score_request_from_proto(request))
            if isinstance(answer, Fail):
                if answer.retry_after is not None:
                    context.set_trailing_metadata((("retry-after", str(answer.retry_after)),))
                context.abort(answer.grpc_code, f"double: {answer.type.value}")
            return grpc_convert.score_response_to_proto(answer)

    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    reward_pb2_grpc.add_RewardServiceServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    script.address = f"127.0.0.1:{port}"
    try:
        yield script
    finally:
        server.stop(grace=None)
