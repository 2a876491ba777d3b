"""Run the reward service: HTTP (uvicorn) and gRPC on one event loop, over one RewardService.

`RewardServer` is what `assay rm serve` and `python -m rm_server` run; `BackgroundServer` runs
the same thing on a thread of its own, for tests and benchmarks in one process.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path


from assay import serve as runtime
from assay.http_guard import allowed_hosts
from assay.serve import HttpListener, InsecureBinding, serve_until_signal, settle_after_loading
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
    allowed_hosts: tuple[str, ...] = ()  # Host names answered besides loopback's (beyond loopback: none means any)
    limits: Limits = field(default_factory=Limits)
    log_level: str = "warning"


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
        self.http = HttpListener(config.host)
        self.grpc_port: int | None = None
        self._grpc = None

    @property
    def http_url(self) -> str:
        return self.http.url

    @property
    def grpc_target(self) -> str:
        return f"{self.config.host}:{self.grpc_port}"

    async def start(self) -> None:
        """Bind both ports (health answers at once, /ready once the models are loaded)."""
        app = create_app(self.service, self.keys, allowed_hosts(self.config.host, self.config.allowed_hosts))
        await self.http.start(app, self.config.port, self.config.log_level)
        if self.config.grpc_port is not None:
            from rm_server.grpc_api import start_grpc_server

            self._grpc, self.grpc_port = await start_grpc_server(
                self.service, self.keys, self.config.host, self.config.grpc_port, self.config.limits
            )
        await self.service.start()
        settle_after_loading()
        log.info("reward service ready on %s (gRPC %s)", self.http_url, self.grpc_port)

    async def wait(self) -> None:
        """Until uvicorn exits (`stop`)."""
        await self.http.wait()

    async def stop(self) -> None:
        if self._grpc is not None:
            await self._grpc.stop(grace=2)
        await self.http.stop()
        await self.service.close()


async def serve(config: ServerConfig) -> None:
    """Serve until SIGINT or SIGTERM, then stop cleanly (exit status 0)."""
    await serve_until_signal(RewardServer(config))


class BackgroundServer(runtime.BackgroundServer[RewardServer]):
    """A RewardServer on its own thread and event loop: `with BackgroundServer(cfg) as s: s.http_url`."""

    def __init__(self, config: ServerConfig) -> None:
        super().__init__(lambda: RewardServer(config), name="rm-server")
        self.config = config
