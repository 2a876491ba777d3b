"""What the reward and policy servers' gRPC edges share: auth and error mapping, health, reflection.

Each service brings its own pieces: its full service name, a check of the `authorization`
metadata (its keys, its scope) and `describe`, its one mapping from an exception to a `Failure`.
From those, `start_server` runs a grpc.aio server on the current event loop with:

- `AuthAndErrors` on every method of that service (health and reflection stay open): the call's
  request id is sent in the initial metadata and set for its log records (`assay.base.access`),
  its access line written when it ends; the key is checked first; a failure becomes its status
  code with its message as details, an `error-type` trailer (the service's error type, as in its
  HTTP error body), an `error-code` trailer when the service has a finer code, and `retry-after`
  in seconds when a retry can work;
- grpc.health.v1 following the service's readiness ("" and the service: NOT_SERVING until
  the models are loaded);
- reflection, listing the service, health and reflection.

A request whose bytes do not parse as the method's message gets INVALID_ARGUMENT (grpc.aio would
answer UNKNOWN and log a traceback): the deserialiser is wrapped so that it hands the handler a
`Malformed` marker instead of raising, and the wrapped handler refuses it. The server never
shares its port: SO_REUSEPORT (grpc's default, which let a second server bind the same port and
take half the calls) is off, and a taken port fails the start with `PortInUse`.

A client that cancels, or whose deadline passes, has its handler task cancelled by grpc.aio; the
CancelledError runs through the handler like any cancellation, so work it awaits is dropped.

At shutdown, `stop` refuses new calls and lets running ones finish for the drain timeout; the calls
still running then are cut off by `AuthAndErrors` itself with UNAVAILABLE, which clients retry.
(grpc.aio's own end of grace cancels them, and under load its clients see CANCELLED, which says
nothing about whether a retry can work.)
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pydantic import ValidationError

from assay.base.access import GrpcCall
from assay.base.serve import PortInUse, check_port_free

log = logging.getLogger("assay.grpc")
CUT_OFF_S = 5.0  # after the drain timeout: for the calls cut off to send their UNAVAILABLE
SHUTTING_DOWN = "the server is shutting down and cut this call off at its drain timeout; retry"


@dataclass(frozen=True)
class Failure:
    """What a client is told about a failed call."""

    status: grpc.StatusCode
    type: str  # the service's error type
    message: str
    retry_after_s: float | None = None  # when a retry can succeed (overloaded)
    code: str | None = None  # a finer, stable code, where the service has one

    def trailers(self) -> tuple[tuple[str, str], ...]:
        # `retry-after` is in seconds like the HTTP header (fractions allowed here)
        trailing: tuple[tuple[str, str], ...] = (("error-type", self.type),)
        if self.code is not None:
            trailing += (("error-code", self.code),)
        if self.retry_after_s is not None:
            trailing += (("retry-after", f"{self.retry_after_s:.3f}"),)
        return trailing


def invalid_argument(exc: ValidationError, error_type: str) -> Failure:
    """A request that breaks the protocol's rules: INVALID_ARGUMENT listing the problems (ten at most)."""
    problems = [f"{'.'.join(str(p) for p in e['loc']) or 'request'}: {e['msg']}" for e in exc.errors()[:10]]
    return Failure(grpc.StatusCode.INVALID_ARGUMENT, error_type, "invalid request: " + "; ".join(problems))


def internal(exc: Exception, error_type: str) -> Failure:
    """A bug: INTERNAL with a short message; the traceback goes to the log (once per site, see
    `assay.base.logs`), never to the client."""
    log.error("unexpected error in a gRPC call", exc_info=exc)
    message = f"internal error ({type(exc).__name__}); the server log has the details"
    return Failure(grpc.StatusCode.INTERNAL, error_type, message)


@dataclass(frozen=True)
class Malformed:
    """What the wrapped deserialiser hands on for bytes that are not the method's message."""

    problem: str


class MalformedMessage(Exception):
    """A request message that did not parse; `describe` functions map it to INVALID_ARGUMENT."""


def malformed(exc: MalformedMessage, error_type: str) -> Failure:
    return Failure(grpc.StatusCode.INVALID_ARGUMENT, error_type, str(exc))


def _tolerant(deserialize: Callable[[bytes], object] | None) -> Callable[[bytes], object] | None:
    if deserialize is None:
        return None

    def parse(data: bytes) -> object:
        try:
            return deserialize(data)
        except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError, or others on odd bytes
            return Malformed(f"the request message does not parse ({type(exc).__name__}: {exc})")

    return parse


def _parsed(request: object) -> object:
    if isinstance(request, Malformed):
        raise MalformedMessage(request.problem)
    return request


async def _parsed_stream(requests):
    async for request in requests:
        yield _parsed(request)


def _malformed_within(exc: Exception) -> Exception:
    """A task group's error (a stream read by a task) around a malformed message is that message's."""
    if isinstance(exc, BaseExceptionGroup) and (group := exc.subgroup(MalformedMessage)) is not None:
        part: MalformedMessage | BaseExceptionGroup[MalformedMessage] = group
        while isinstance(part, BaseExceptionGroup):
            part = part.exceptions[0]
        return part
    return exc


class AuthAndErrors(grpc.aio.ServerInterceptor):
    """Checks the API key and maps exceptions to status codes for every method of one service.

    grpc.aio runs the handler after `intercept_service` returns, so a try/except around
    `continuation` would see no handler exceptions. Instead the interceptor returns the method's
    handler with its behaviour wrapped; that keeps both concerns in this one class, out of the
    servicers, and applies them to any method added to the service later without a decorator."""

    def __init__(
        self, service: str, authorize: Callable[[str | None], None], describe: Callable[[Exception], Failure]
    ) -> None:
        self.prefix, self.authorize, self.describe = f"/{service}/", authorize, describe
        self.running: set[asyncio.Task] = set()  # the calls in their handlers now
        self.calls: dict[asyncio.Task, GrpcCall] = {}  # their request ids and access lines
        self.cutting_off = False

    def cut_off(self) -> None:
        """End every call still running with UNAVAILABLE (at the drain timeout)."""
        self.cutting_off = True
        for task in self.running:
            task.cancel()

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self.prefix):
            return handler  # unknown method (UNIMPLEMENTED), health, reflection
        codec = {
            "request_deserializer": _tolerant(handler.request_deserializer),
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(self._unary(handler.unary_unary, details.method), **codec)
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(self._stream(handler.stream_stream, details.method), **codec)
        raise TypeError(f"{details.method}: only unary and bidirectional methods are wrapped")

    def _check_key(self, context: grpc.aio.ServicerContext) -> None:
        key = dict(context.invocation_metadata() or ()).get("authorization")
        self.authorize(key if isinstance(key, str) else None)  # only `-bin` metadata keys carry bytes

    def _unary(self, behaviour, method: str):
        async def call(request, context: grpc.aio.ServicerContext):
            await self._enter(context, method)
            try:
                self._check_key(context)
                return await behaviour(_parsed(request), context)
            except grpc.aio.AbortError:
                raise  # already a status
            except asyncio.CancelledError:
                await self._unless_cut_off(context)
            except Exception as exc:  # noqa: BLE001 - this is the one place errors become statuses
                await self._abort(context, exc)
            finally:
                self._leave(context)

        return call

    def _stream(self, behaviour, method: str):
        async def call(requests, context: grpc.aio.ServicerContext):
            await self._enter(context, method)
            try:
                self._check_key(context)
                async for answer in behaviour(_parsed_stream(requests), context):
                    yield answer
            except grpc.aio.AbortError:
                raise
            except asyncio.CancelledError:
                await self._unless_cut_off(context)
            except Exception as exc:  # noqa: BLE001 - this is the one place errors become statuses
                await self._abort(context, exc)
            finally:
                self._leave(context)

        return call

    async def _enter(self, context: grpc.aio.ServicerContext, method: str) -> None:
        call = await GrpcCall.begin(method, context)  # the request id: in the initial metadata, in the log context
        if self.cutting_off:  # reached its handler only now (a loaded loop): cut off as well
            call.end(grpc.StatusCode.UNAVAILABLE)
            await self._shutting_down(context)
        task = asyncio.current_task()
        if task is not None:
            self.running.add(task)
            self.calls[task] = call

    def _leave(self, context: grpc.aio.ServicerContext) -> None:
        task = asyncio.current_task()
        if task is not None:
            self.running.discard(task)
            call = self.calls.pop(task, None)
            if call is not None:  # context.code(): None while the call is OK, else the status it ends with
                cancelled = task.cancelling() > 0 and context.code() is None
                call.end(grpc.StatusCode.CANCELLED if cancelled else context.code() or grpc.StatusCode.OK)

    async def _unless_cut_off(self, context: grpc.aio.ServicerContext) -> None:
        """A cancellation: the client's own (passed on), or ours at the drain timeout (UNAVAILABLE)."""
        if not self.cutting_off:
            raise asyncio.CancelledError
        await self._shutting_down(context)

    @staticmethod
    async def _shutting_down(context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN, trailing_metadata=(("retry-after", "1.000"),))

    async def _abort(self, context: grpc.aio.ServicerContext, exc: Exception) -> None:
        failure = self.describe(_malformed_within(exc))
        await context.abort(failure.status, failure.message, trailing_metadata=failure.trailers())


class Health(health.aio.HealthServicer):
    """grpc.health.v1 over `is_ready`: "" and the service are SERVING once the models are
    loaded. Check looks at `is_ready()` itself; Watch hears of a change within 50 ms."""

    def __init__(self, service: str, is_ready: Callable[[], bool]) -> None:
        super().__init__()
        self.service, self.is_ready = service, is_ready
        self.serving: bool | None = None

    async def sync(self) -> None:
        if self.is_ready() != self.serving:
            self.serving = self.is_ready()
            status = (
                health_pb2.HealthCheckResponse.SERVING if self.serving else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            for name in ("", self.service):
                await self.set(name, status)

    async def Check(self, request: health_pb2.HealthCheckRequest, context) -> health_pb2.HealthCheckResponse:
        await self.sync()
        return await super().Check(request, context)

    async def follow(self, server: grpc.aio.Server) -> None:
        """Keep the status in step with the service until the server stops."""
        while True:
            await self.sync()
            if not await server.wait_for_termination(timeout=0.05):  # False: it terminated
                return


_background: set[asyncio.Task] = set()


_interceptors: weakref.WeakKeyDictionary[grpc.aio.Server, AuthAndErrors] = weakref.WeakKeyDictionary()


async def start_server(
    service: str,
    add_servicer: Callable[[grpc.aio.Server], None],
    interceptor: AuthAndErrors,
    is_ready: Callable[[], bool],
    host: str,
    port: int,
    max_receive_bytes: int,
    max_send_bytes: int,
    tls: tuple[Path, Path] | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Start a gRPC server (the service, health, reflection); returns it and its bound port.

    The message size caps are in bytes; -1 lifts one. With `tls` (certificate and key files, PEM)
    the port is a secure one (`grpc.ssl_server_credentials`), else plaintext. PortInUse when the
    port is taken."""
    check_port_free(host, port, "gRPC")
    server = grpc.aio.server(
        interceptors=[interceptor],
        options=[
            ("grpc.max_receive_message_length", max_receive_bytes),
            ("grpc.max_send_message_length", max_send_bytes),
            ("grpc.so_reuseport", 0),
        ],  # one server per port: a second one must fail to start
    )
    add_servicer(server)
    checks = Health(service, is_ready)
    await checks.sync()  # NOT_SERVING from the first call on, "" included
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    reflection.enable_server_reflection((service, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        if tls is None:
            bound = server.add_insecure_port(address)
        else:
            cert, key = tls
            bound = server.add_secure_port(
                address, grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
            )
    except RuntimeError:  # taken between the check and here
        raise PortInUse("gRPC", host, port) from None
    await server.start()
    task = asyncio.create_task(checks.follow(server))
    _background.add(task)
    task.add_done_callback(_background.discard)
    _interceptors[server] = interceptor
    return server, bound


async def stop(server: grpc.aio.Server, timeout_s: float) -> None:
    """Refuse new calls, let running ones finish for up to `timeout_s`, then cut off the rest with
    UNAVAILABLE (the interceptor answers them itself) and close."""
    stopping = asyncio.ensure_future(server.stop(grace=timeout_s + CUT_OFF_S))
    await asyncio.wait([stopping], timeout=timeout_s)
    if not stopping.done() and (interceptor := _interceptors.get(server)) is not None:
        interceptor.cut_off()
    await stopping
