"""Run the reward service: HTTP (uvicorn) and gRPC on one event loop, over one RewardService.

`RewardServer` is what `assay rm serve` and `python -m rm_server` run; `BackgroundServer` runs
the same thing on a thread of its own, for tests and benchmarks in one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn

from rm_server.auth import ApiKeys, is_loopback
from rm_server.http_api import create_app
from rm_server.rewards import build_rewards
from rm_server.serving import Limits, RewardService
from rm_server.spec import load_spec

log = logging.getLogger("rm_server")


@dataclass(frozen=True)
class ServerConfig:
    spec: Path | None = None  # None: the embedded arithmetic world's rewards
    host: str = "127.0.0.1"
    port: int = 8000  # 0 picks a free port
    grpc_port: int | None = 50051  # None: no gRPC; 0 picks a free port
    api_keys: tuple[str, ...] = ()  # KEY:scope[,scope]; ASSAY_API_KEYS adds more
    limits: Limits = field(default_factory=Limits)
    log_level: str = "warning"


class InsecureBinding(ValueError):
    pass


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: `serve` below owns SIGINT/SIGTERM, so that a
    stop closes the rewards (model threads, the math-verify process pool) before the process
    exits, instead of uvicorn re-raising the signal and leaving worker processes behind."""

    def capture_signals(self):
        return contextlib.nullcontext()


def _bind(host: str, port: int) -> socket.socket:
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


class RewardServer:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.keys = ApiKeys.from_env(config.api_keys)
        if not is_loopback(config.host) and not self.keys:
            raise InsecureBinding(
                f"refusing to serve on {config.host} without API keys: pass --api-key KEY:score "
                "(or set ASSAY_API_KEYS), or bind 127.0.0.1"
            )
        spec = load_spec(config.spec)
        self.service = RewardService(build_rewards(spec), config.limits)
        self.http_port: int | None = None
        self.grpc_port: int | None = None
        self._uvicorn: uvicorn.Server | None = None
        self._http_task: asyncio.Task | None = None
        self._grpc = None

    @property
    def http_url(self) -> str:
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        return f"http://{host}:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"{self.config.host}:{self.grpc_port}"

    async def start(self) -> None:
        """Bind both ports (health answers at once, /ready once the models are loaded)."""
        sock = _bind(self.config.host, self.config.port)
        self.http_port = sock.getsockname()[1]
        app = create_app(self.service, self.keys)
        cfg = uvicorn.Config(app, log_level=self.config.log_level, timeout_graceful_shutdown=5, access_log=False)
        self._uvicorn = _Uvicorn(cfg)
        self._http_task = asyncio.create_task(self._uvicorn.serve(sockets=[sock]))
        if self.config.grpc_port is not None:
            from rm_server.grpc_api import start_grpc_server

            self._grpc, self.grpc_port = await start_grpc_server(
                self.service, self.keys, self.config.host, self.config.grpc_port, self.config.limits
            )
        while not self._uvicorn.started:
            if self._http_task.done():
                await self._http_task  # raises what stopped it
            await asyncio.sleep(0.01)
        await self.service.start()
        # The models and tokenizers are loaded: move their objects out of the collector's sight,
        # or full collections over ~400k long-lived objects pause the event loop for 100+ ms.
        gc.collect()
        gc.freeze()
        log.info("reward service ready on %s (gRPC %s)", self.http_url, self.grpc_port)

    async def wait(self) -> None:
        """Until uvicorn exits (SIGINT/SIGTERM in the main thread, or `stop`)."""
        if self._http_task is not None:
            await self._http_task

    async def stop(self) -> None:
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        if self._grpc is not None:
            await self._grpc.stop(grace=2)
        if self._http_task is not None:
            await self._http_task
        await self.service.close()


async def serve(config: ServerConfig) -> None:
    """Serve until SIGINT or SIGTERM, then stop cleanly (exit status 0)."""
    server = RewardServer(config)
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


class BackgroundServer:
    """A RewardServer on its own thread and event loop: `with BackgroundServer(cfg) as s: s.http_url`."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.server: RewardServer | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rm-server", daemon=True)

    def __enter__(self) -> RewardServer:
        self._thread.start()
        self.server = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=120)
        return self.server

    async def _start(self) -> RewardServer:
        server = RewardServer(self.config)
        await server.start()
        return server

    def __exit__(self, *exc) -> None:
        if self.server is not None:
            asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop).result(timeout=60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
