"""What the reward and policy servers share to run: binding, uvicorn, signals, a background mode.

A server here is any object with `async start()`, `async wait()` and `async stop()`:
`serve_until_signal` runs one until SIGINT/SIGTERM and stops it cleanly (exit status 0), and
`BackgroundServer` runs one on a thread of its own for tests and benchmarks. No torch here.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
from collections.abc import Awaitable, Callable
from typing import Generic, Protocol, TypeVar

import uvicorn


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
