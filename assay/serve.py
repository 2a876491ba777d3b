"""What the reward and policy servers share to run: binding, uvicorn, signals, a background mode.

A server here is any object with `async start()`, `async wait()` and `async stop()`:
`serve_until_signal` runs one until SIGINT/SIGTERM and stops it cleanly (exit status 0), and
`BackgroundServer` runs one on a thread of its own for tests and benchmarks. No torch here.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import socket
import threading
from collections.abc import Awaitable, Callable
from typing import Generic, Protocol, TypeVar

import uvicorn
from fastapi.responses import JSONResponse, PlainTextResponse, Response  # at module level: routes' annotations resolve here


class Server(Protocol):
    async def start(self) -> None: ...
    async def wait(self) -> None: ...
    async def stop(self) -> None: ...


S = TypeVar("S", bound=Server)


class InsecureBinding(ValueError):
    """Binding beyond loopback with no API keys configured."""


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0 picks a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted connections only when the
    # listening socket says TCP, and without it Nagle holds each response body for the client's
    # delayed ACK (uvicorn writes headers and body separately): ~40 ms added to every request.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: `serve_until_signal` owns SIGINT/SIGTERM, so a
    stop closes the server's resources (model threads, worker processes) before the process
    exits, instead of uvicorn re-raising the signal and leaving worker processes behind."""

    def capture_signals(self):
        return contextlib.nullcontext()


class HttpListener:
    """An ASGI app served by uvicorn on a socket of its own, on the running event loop."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.port: int | None = None
        self._uvicorn: Uvicorn | None = None
        self._task: asyncio.Task | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self, app, port: int, log_level: str) -> None:
        """Bind `port` (0: a free one) and return once uvicorn accepts connections."""
        sock = bind(self.host, port)
        self.port = sock.getsockname()[1]
        cfg = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5, access_log=False)
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

    async def stop(self) -> None:
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        await self.wait()


def settle_after_loading() -> None:
    """Call once the models are loaded: move their objects out of the collector's sight, or
    full collections over ~400k long-lived objects (torch, transformers) pause the event loop
    for 100+ ms."""
    gc.collect()
    gc.freeze()


def add_ops_routes(app, health_model, is_ready: Callable[[], bool], metrics: Callable[[], bytes]) -> None:
    """`/health` (the process answers), `/ready` (503 until the models are loaded) and
    `/metrics` (Prometheus text); all three stay open without an API key."""
    @app.get("/health", response_model=health_model)
    async def health():
        return health_model(status="ok")

    @app.get("/ready", response_model=health_model, responses={503: {"model": health_model}})
    async def ready() -> Response:
        ok = is_ready()
        return JSONResponse(health_model(status="ok" if ok else "starting").model_dump(), status_code=200 if ok else 503)

    @app.get("/metrics", response_class=PlainTextResponse)  # documented as text, which it is
    async def prometheus() -> Response:
        return Response(metrics(), media_type="text/plain; version=0.0.4")


async def serve_until_signal(server: Server) -> None:
    """Start `server`, serve until SIGINT or SIGTERM (or until it ends), then stop it."""
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


def run_loop(main: Awaitable[None]) -> None:
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
