"""Run the reward service: HTTP (uvicorn) and gRPC on one event loop, over one RewardService.

`RewardServer` is what `assay rm serve` and `python -m assay.rm_server` run; `BackgroundServer` runs
the same thing on a thread of its own, for tests and benchmarks in one process. The connection
bounds and the drain on shutdown are `assay.serve`'s; `error_reply` gives them this protocol's
error body (503 `not_ready` with Retry-After, while draining or over the connection cap).
"""

from __future__ import annotations

import logging

from fastapi.responses import JSONResponse

from assay import serve as runtime
from assay.connections import InsecureBinding, is_loopback
from assay.http_guard import allowed_hosts
from assay.serve import HttpListener, serve_until_signal, settle_after_loading
from assay.rm_server.auth import ApiKeys
from assay.rm_server.config import ServerConfig
from assay.rm_server.http_api import create_app
from assay.rm_server.protocol import ErrorInfo, ErrorResponse, ErrorType
from assay.rm_server.rewards import build_rewards
from assay.rm_server.serving import RewardService
from assay.rm_server.spec import load_spec

log = logging.getLogger("rm_server")
RETRY_AFTER_S = 1  # what a refused client is told while the server drains or is full


def error_reply(status: int, message: str) -> JSONResponse:
    """This protocol's answer for the runtime's own refusals (503 retryable, 500)."""
    kind = {503: ErrorType.not_ready, 500: ErrorType.internal}.get(status, ErrorType.invalid_request)
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    body = ErrorResponse(error=ErrorInfo(type=kind, message=message))
    return JSONResponse(body.model_dump(mode="json"), status_code=status, headers=headers)


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
        await self.http.start(app, self.config.port, self.config.log_level, error_reply, self.config.connections)
        if self.config.grpc_port is not None:
            from assay.rm_server.grpc_api import start_grpc_server

            try:
                self._grpc, self.grpc_port = await start_grpc_server(
                    self.service, self.keys, self.config.host, self.config.grpc_port, self.config.limits
                )
            except BaseException:
                await self.http.stop()
                raise
        await self.service.start()
        settle_after_loading()
        log.info("reward service ready on %s (gRPC %s)", self.http_url, self.grpc_port)

    async def wait(self) -> None:
        """Until uvicorn exits (`stop`)."""
        await self.http.wait()

    async def stop(self) -> None:
        """Drain (see `assay.serve`), then close the rewards."""
        await runtime.drain(self.http, self._grpc, self.config.connections.drain_timeout_s)
        await self.service.close()


async def serve(config: ServerConfig) -> None:
    """Serve until SIGINT or SIGTERM, then stop cleanly (exit status 0)."""
    await serve_until_signal(RewardServer(config))


class BackgroundServer(runtime.BackgroundServer[RewardServer]):
    """A RewardServer on its own thread and event loop: `with BackgroundServer(cfg) as s: s.http_url`."""

    def __init__(self, config: ServerConfig) -> None:
        super().__init__(lambda: RewardServer(config), name="rm-server")
        self.config = config
