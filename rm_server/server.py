"""Run the reward service: HTTP (uvicorn) and gRPC on one event loop, over one RewardService.

`RewardServer` is what `assay rm serve` and `python -m assay.rm_server` run; `BackgroundServer` runs
the same thing on a thread of its own, for tests and benchmarks in one process. Binding, the
connection bounds, the start order and the drain on shutdown are the base's (`assay.base.server`,
`assay.base.serve`); this module says what is the reward service's: its app, its gRPC server, and
`error_reply`, this protocol's error body for the runtime's refusals (503 `not_ready` with
Retry-After, while draining or over the connection cap).
"""

from __future__ import annotations

import grpc
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from assay.base import serve as runtime
from assay.base.auth import SCOPES, ApiKeys
from assay.base.serve import serve_until_signal
from assay.base.server import ServiceServer
from assay.rm_server.config import ServerConfig
from assay.rm_server.http_api import create_app
from assay.rm_server.protocol import ErrorInfo, ErrorResponse, ErrorType
from assay.rm_server.rewards import build_rewards
from assay.rm_server.serving import RewardService
from assay.rm_server.spec import load_spec

RETRY_AFTER_S = 1  # what a refused client is told while the server drains or is full


def error_reply(status: int, message: str) -> JSONResponse:
    """This protocol's answer for the runtime's own refusals (503 retryable, 500)."""
    kind = {503: ErrorType.not_ready, 500: ErrorType.internal}.get(status, ErrorType.invalid_request)
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    body = ErrorResponse(error=ErrorInfo(type=kind, message=message))
    return JSONResponse(body.model_dump(mode="json"), status_code=status, headers=headers)


class RewardServer(ServiceServer):
    name = "reward service"
    service: RewardService

    def __init__(self, config: ServerConfig) -> None:
        super().__init__(config, ApiKeys.from_env(config.api_keys, env_var=config.keys_env_var, scopes=SCOPES))
        self.config: ServerConfig = config
        self.service = RewardService(build_rewards(load_spec(config.spec), runtime=config.models), config.limits)

    def create_app(self) -> FastAPI:
        return create_app(self.service, self.keys, self.hosts)

    async def start_grpc(self, port: int) -> tuple[grpc.aio.Server, int]:
        from assay.rm_server.grpc_api import start_grpc_server

        cfg = self.config
        return await start_grpc_server(self.service, self.keys, cfg.host, port, cfg.limits, self.tls)

    def error_reply(self, status: int, message: str) -> JSONResponse:
        return error_reply(status, message)


async def serve(config: ServerConfig) -> None:
    """Serve until SIGINT or SIGTERM, then stop cleanly (exit status 0)."""
    if not config.models.model_workers:  # the models compute in this process: its threads are theirs
        import torch

        torch.set_num_threads(config.models.threads(1))
    await serve_until_signal(RewardServer(config))


class BackgroundServer(runtime.BackgroundServer[RewardServer]):
    """A RewardServer on its own thread and event loop: `with BackgroundServer(cfg) as s: s.http_url`."""

    def __init__(self, config: ServerConfig) -> None:
        super().__init__(lambda: RewardServer(config), name="rm-server")
        self.config = config
