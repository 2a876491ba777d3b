"""What the reward and policy servers share to run: binding, uvicorn, signals, drain, a background mode.

A server here is any object with `async start()`, `async wait()` and `async stop()`:
`serve_until_signal` runs one until SIGINT/SIGTERM and stops it cleanly (exit status 0), and
`BackgroundServer` runs one on a thread of its own for tests and benchmarks. No torch here.

Shutdown drains (`drain`): on SIGTERM `/ready` answers 503 at once and new requests get the
service's typed, retryable 503 (with Retry-After) while the listener stays open; requests in
flight may finish for up to the drain timeout, and whatever is still running then is cancelled
and answered with that same 503 (a response already streaming is closed). gRPC does the same
through grpc.aio's own `stop(grace)`: new calls are refused and calls cut off get UNAVAILABLE.
Nothing is ever answered with uvicorn's bare text/plain 500.

The HTTP edge's last layer (`Gate`) also catches what escapes the app: it logs one line (see
`assay.base.logs` for the traceback, once per site) and answers 500 in the service's shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import gc
import logging
import signal
import socket
import threading
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import uvicorn
from fastapi.responses import (
    JSONResponse,
    PlainTextResponse,
    Response,
)  # at module level: routes' annotations resolve here
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from assay.base.access import RequestLog
from assay.base.connections import Connections
from assay.base.http_bounds import BodyTimeout, GuardedHttp, raw_response
from assay.base.logs import quiet_tracebacks

log = logging.getLogger("assay.base.serve")

ErrorReply = Callable[[int, str], Response]
"""The service's error answer for a status and message, in its protocol's shape (503: with Retry-After)."""


class Server(Protocol):
    async def start(self) -> None: ...
    async def wait(self) -> None: ...
    async def stop(self) -> None: ...


S = TypeVar("S", bound=Server)


class PortInUse(OSError):
    """The port to serve on is taken; the message is one sentence naming it."""

    def __init__(self, protocol: str, host: str, port: int) -> None:
        super().__init__(
            errno.EADDRINUSE,
            f"the {protocol} port {port} on {host} is already in use "
            "(another server on it?); stop that one or pick another port",
        )
        self.port = port

    def __str__(self) -> str:
        return self.strerror or super().__str__()  # always set above; typeshed types it optional


def _tcp_socket(host: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted connections only when the
    # listening socket says TCP, and without it Nagle holds each response body for the client's
    # delayed ACK (uvicorn writes headers and body separately): ~40 ms added to every request.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    # SO_REUSEADDR lets a restart bind while the last run's connections sit in TIME_WAIT; on
    # Linux it never lets two sockets listen on one port (that takes SO_REUSEPORT, never set)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    return sock


def bind(host: str, port: int, protocol: str = "HTTP") -> socket.socket:
    """A listening TCP socket (port 0 picks a free one); PortInUse when the port is taken."""
    sock = _tcp_socket(host)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(protocol, host, port) from None
        raise
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def check_port_free(host: str, port: int, protocol: str) -> None:
    """PortInUse when `port` is taken, for servers that bind it themselves (grpc): a clear sentence
    before their own, vaguer error."""
    if port != 0:
        bind(host, port, protocol).close()


class Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: `serve_until_signal` owns SIGINT/SIGTERM, so a
    stop closes the server's resources (model threads, worker processes) before the process
    exits, instead of uvicorn re-raising the signal and leaving worker processes behind."""

    def capture_signals(self):
        return contextlib.nullcontext()


class Gate:
    """ASGI middleware, the HTTP edge's last layer: the drain, and errors that escape the app.

    While serving it keeps the tasks of the requests in flight (uvicorn runs each request in a
    task of its own), so that the drain can cut them off. Once `draining`, new requests get
    `reply(503, ...)` and `/ready` 503; `/health` and `/metrics` stay open. At the drain's end
    what still runs is cancelled, and each one whose response has not started is answered with
    that 503."""

    OPEN = ("/health", "/metrics")

    def __init__(self, app: ASGIApp, reply: ErrorReply) -> None:
        self.app, self.reply = app, reply
        self.draining = False
        self._running: set[asyncio.Task] = set()
        self._cut: set[asyncio.Task] = set()  # cancelled by the drain, not by anyone else
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def in_flight(self) -> int:
        return len(self._running)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.OPEN:
            return await self.app(scope, receive, send)
        if self.draining:
            return await self._refuse(scope, receive, send)
        task = asyncio.current_task()
        assert task is not None  # an ASGI call runs in a task
        self._running.add(task)
        self._idle.clear()
        status: int | None = None  # the response's, once started

        async def watched(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except asyncio.CancelledError:
            if task not in self._cut:
                raise
            task.uncancel()  # the drain's cancellation ends here, answered
            if status is None:
                await self._refuse(scope, receive, send)
        except Exception as exc:  # the one place an escaped error is logged and answered
            if status == 500:
                return  # answered by the app's error handler, which logged it (Starlette re-raises after)
            log.error("unexpected error on %s %s", scope["method"], scope["path"], exc_info=exc)
            if status is None:
                await _bug_reply(self.reply, exc)(scope, receive, send)
        finally:
            self._running.discard(task)
            self._cut.discard(task)
            if not self._running:
                self._idle.set()

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] == "/ready":
            return await JSONResponse({"status": "stopping"}, status_code=503)(scope, receive, send)
        await self.reply(503, "the server is shutting down; retry (another replica, or this one once restarted)")(
            scope, receive, send
        )

    async def drain(self, timeout_s: float) -> None:
        """Refuse new requests and wait up to `timeout_s` for those in flight; then cut them off."""
        self.draining = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        if self._running:
            log.warning("drain: %d request(s) still running after %gs, answered 503", self.in_flight, timeout_s)
        for task in self._running:
            self._cut.add(task)
            task.cancel()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):  # the refusals are small: this is only a bound
                await self._idle.wait()


def _bug_reply(reply: ErrorReply, exc: Exception) -> Response:
    return reply(500, f"internal error ({type(exc).__name__}); the server log has the details")


class HttpListener:
    """An ASGI app served by uvicorn on a socket of its own, on the running event loop.

    With `tls` (the certificate and key files) it serves HTTPS: uvicorn wraps the same socket and
    the same `GuardedHttp` protocol, which sees the connection once its TLS handshake is done, so
    the connection cap and the header timeout count from there; the handshake itself is bounded by
    asyncio's (60 s)."""

    def __init__(self, host: str, tls: tuple[Path, Path] | None = None) -> None:
        self.host, self.tls = host, tls
        self.port: int | None = None
        self.gate: Gate | None = None
        self._uvicorn: Uvicorn | None = None
        self._task: asyncio.Task | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    async def start(self, app, port: int, log_level: str, reply: ErrorReply, limits: Connections) -> None:
        """Bind `port` (0: a free one) and return once uvicorn accepts connections.

        `reply` gives the service's error answers (the drain's and the connection cap's 503, 500)."""
        sock = bind(self.host, port)
        self.port = sock.getsockname()[1]
        if isinstance(app, Starlette) and Exception not in app.exception_handlers:
            # else Starlette answers a bug with its text/plain 500 before the Gate can
            async def on_bug(request, exc: Exception) -> Response:
                log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
                return _bug_reply(reply, exc)

            app.add_exception_handler(Exception, on_bug)
        self.gate = Gate(BodyTimeout(app, limits.body_timeout_s), reply)
        full = reply(503, f"this server has {limits.max_connections} connections open, its limit; retry shortly")
        http = functools.partial(GuardedHttp, limits=limits, refusal=raw_response(full))
        cert, key = self.tls or (None, None)
        cfg = uvicorn.Config(
            RequestLog(self.gate),  # outermost: every answer carries its request id, the gate's own included
            http=http,  # type: ignore[arg-type]  # uvicorn calls it as a protocol factory; its stub wants a class
            log_level=log_level,
            access_log=False,  # RequestLog writes the access lines
            log_config=None,  # uvicorn's records go to the root logger's handler (assay.base.logs), as JSON too
            timeout_keep_alive=limits.idle_timeout_s,  # type: ignore[arg-type]  # a float works (call_later); typed int
            # the drain has answered every request before uvicorn stops: this only bounds the rest
            timeout_graceful_shutdown=5,
            ssl_certfile=cert,
            ssl_keyfile=key,
        )
        self._uvicorn = Uvicorn(cfg)
        self._task = asyncio.create_task(self._uvicorn.serve(sockets=[sock]))
        while not self._uvicorn.started:
            if self._task.done():
                await self._task  # raises what stopped it
            await asyncio.sleep(0.01)

    async def wait(self) -> None:
        """Until uvicorn exits (`stop`)."""
        if self._task is not None:
            await self._task

    async def drain(self, timeout_s: float) -> None:
        """See `Gate.drain`; the listener stays open (answering 503) until `stop`."""
        if self.gate is not None:
            await self.gate.drain(timeout_s)

    async def stop(self) -> None:
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        await self.wait()


async def drain(http: HttpListener, stop_grpc: Callable[[float], Awaitable[None]] | None, timeout_s: float) -> None:
    """Drain HTTP and gRPC side by side for up to `timeout_s`, then close both listeners.

    `stop_grpc(timeout_s)` does the same for the gRPC server (`grpc_serve.stop`: new calls refused
    at once, the ones still running at the timeout answered UNAVAILABLE)."""
    log.info("draining for up to %gs: %d HTTP request(s) in flight", timeout_s, http.gate.in_flight if http.gate else 0)
    waits: list[Awaitable[None]] = [http.drain(timeout_s)]
    if stop_grpc is not None:
        waits.append(stop_grpc(timeout_s))
    await asyncio.gather(*waits)
    await http.stop()
    log.info("drained; listeners closed")


def settle_after_loading() -> None:
    """Call once the models are loaded: move their objects out of the collector's sight, or
    full collections over ~400k long-lived objects (torch, transformers) pause the event loop
    for 100+ ms."""
    gc.collect()
    gc.freeze()


def add_ops_routes(
    app,
    health_model,
    is_ready: Callable[[], bool],
    metrics: Callable[[str], tuple[bytes, str]],
    dependencies: Callable[[], dict[str, str]] | None = None,
) -> None:
    """`/health` (the process answers), `/ready` (503 until the models are loaded) and `/metrics`
    (`metrics(accept)`: the body and its content type, Prometheus text or OpenMetrics as the request's
    Accept header asks); all three stay open without an API key.

    `dependencies` gives the services this one calls and their state (`ok`, `degraded`), which
    `/ready` reports beside its status without changing its code: a degraded dependency takes away
    what needs it, not the rest (a 503 would take the replica out of rotation)."""

    @app.get("/health", response_model=health_model)
    async def health():
        return health_model(status="ok")

    @app.get("/ready", response_model=health_model, responses={503: {"model": health_model}})
    async def ready() -> Response:
        ok = is_ready()
        states = {"dependencies": dependencies()} if dependencies is not None else {}
        body = health_model(status="ok" if ok else "starting", **states)
        return JSONResponse(body.model_dump(exclude_none=True), status_code=200 if ok else 503)

    @app.get("/metrics", response_class=PlainTextResponse)  # documented as text, which it is
    async def prometheus(request: Request) -> Response:
        body, content_type = metrics(request.headers.get("accept", ""))
        return Response(body, headers={"content-type": content_type})


async def serve_until_signal(server: Server) -> None:
    """Start `server`, serve until SIGINT or SIGTERM (or until it ends), then stop it (its drain)."""
    quiet_tracebacks()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    await server.start()
    try:
        await asyncio.wait(
            [asyncio.ensure_future(stopping.wait()), asyncio.ensure_future(server.wait())],
            return_when=asyncio.FIRST_COMPLETED,
        )
    finally:
        await server.stop()


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop when it is installed (uvicorn[standard] brings it): about 1.5x the requests
    per core of the stock loop for these services."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


class BackgroundServer(Generic[S]):
    """A server on its own thread and event loop: `with BackgroundServer(make) as s: s.http_url`.

    `make` builds the (not yet started) server on that loop's thread."""

    def __init__(self, make: Callable[[], S], name: str = "server") -> None:
        self._make = make
        self.server: S | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)

    def __enter__(self) -> S:
        self._thread.start()
        try:
            self.server = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=120)
        except BaseException:
            self._shutdown()
            raise
        return self.server

    async def _start(self) -> S:
        server = self._make()
        await server.start()
        return server

    def __exit__(self, *exc) -> None:
        if self.server is not None:
            asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop).result(timeout=60)
        self._shutdown()

    def _shutdown(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
