"""Run the policy service: HTTP (uvicorn) and, with a grpc_port, gRPC on one event loop, over one PolicyService.

`PolicyServer` is what `assay policy serve` and `python -m assay.policy_server` run; `BackgroundServer`
runs the same on a thread of its own, for tests and benchmarks in one process. The socket,
uvicorn, signal handling, connection bounds and drain are `assay.base.serve`'s; `error_reply` gives
them OpenAI's error shape (503 `server_error`, code `not_ready`, with Retry-After).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path

import grpc
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from assay.base import serve as runtime
from assay.base.auth import ApiKeys
from assay.base.serve import serve_until_signal
from assay.base.server import ServiceServer
from assay.clients.reward import RewardClient
from assay.policy_server.backends import GenerationBackend
from assay.policy_server.backends.hf import HFBackend
from assay.policy_server.config import ServerConfig
from assay.policy_server.http_api import SCOPES, create_app
from assay.policy_server.metrics import Metrics
from assay.policy_server.protocol import ErrorInfo, ErrorResponse
from assay.policy_server.rm_check import RewardServiceCheck
from assay.policy_server.serving import PolicyService
from assay.policy_server.serving_search import SearchService
from assay.policy_server.weight_paths import weight_roots
from assay.policy_server.weights import WeightService

RETRY_AFTER_S = 1  # what a refused client is told while the server drains or is full


def error_reply(status: int, message: str) -> JSONResponse:
    """OpenAI's error shape for the runtime's own refusals (503 retryable, 500)."""
    code = {503: "not_ready", 500: "internal"}.get(status)
    kind = "server_error" if status >= 500 else "invalid_request_error"
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    body = ErrorResponse(error=ErrorInfo(message=message, type=kind, code=code))
    return JSONResponse(body.model_dump(mode="json"), status_code=status, headers=headers)


def embedded_models() -> dict[str, Path]:
    """The default: the embedded policy, and the verifier that rm_server's judge reward asks."""
    from assay.checkpoints import EMBEDDED

    return {"policy": EMBEDDED["policy"][1], "verifier": EMBEDDED["verifier"][1]}


def load_backend(config: ServerConfig, name: str, path: Path, metrics: Metrics) -> GenerationBackend:
    """One served model on the configured backend, reporting to `metrics`."""
    finished = functools.partial(metrics.on_finished, name)
    if config.backend == "vllm":
        from assay.policy_server.backends.vllm import VllmBackend

        return VllmBackend(
            name,
            path,
            max_sequences=config.batching.max_queue,
            gpu_memory_utilization=config.gpu_memory_utilization,
            on_finished=finished,
            device=config.device,
            dtype=config.dtype,
        )
    return HFBackend.load(
        name,
        path,
        config.batching,
        on_batch=functools.partial(metrics.on_batch, name),
        on_finished=finished,
        device=config.device,
        dtype=config.dtype,
        attn_implementation=config.attn_implementation,
    )


class PolicyServer(ServiceServer):
    name = "policy service"
    service: PolicyService

    def __init__(self, config: ServerConfig, backends: Mapping[str, GenerationBackend] | None = None) -> None:
        """`backends`: models built by the caller, served in place of `config.models` (a program that
        embeds the server with a backend of its own; the tests' scripted double)."""
        super().__init__(config, ApiKeys.from_env(config.api_keys, env_var=config.keys_env_var, scopes=SCOPES))
        self.config: ServerConfig = config
        self.weight_roots = weight_roots(config.weights_dirs)  # a missing one fails before the models load
        # before the models load, so that a taken port or a malformed --rm-url fails at once
        runtime.check_port_free(config.host, config.port, "HTTP")
        if config.grpc_port is not None:
            runtime.check_port_free(config.host, config.grpc_port, "gRPC")
        rewards = RewardClient.http(
            config.rm_url, api_key=config.rm_api_key, timeout_s=config.rm_timeout_s, max_retries=config.rm_max_retries
        )
        metrics = Metrics()
        if backends is None:
            backends = {
                name: load_backend(config, name, path, metrics)
                for name, path in (config.models or embedded_models()).items()
            }
        self.service = PolicyService(dict(backends), config.limits, metrics)
        self.weights = WeightService(self.service, self.weight_roots)  # its `publish` hook: deploy/weight_sync.py
        self.searches = SearchService(self.service, rewards, config.rm_url)
        self.rm_check = RewardServiceCheck(config.rm_url, config.rm_api_key, config.rm_check_interval_s)

    def create_app(self) -> FastAPI:
        def dependencies() -> dict[str, str]:  # /ready's view of the services this one calls
            return {"rm": self.rm_check.state}

        return create_app(
            self.service, self.keys, self.searches, self.weight_roots, self.hosts, dependencies, self.weights
        )

    async def start(self) -> None:
        """Ask the reward service once (a warning when it does not answer, see `rm_check`), then start."""
        await self.rm_check.start()
        try:
            await super().start()
        except BaseException:
            await self.rm_check.close()
            raise

    async def start_grpc(self, port: int) -> tuple[grpc.aio.Server, int]:
        from assay.policy_server.grpc_api import start_grpc_server

        cfg = self.config
        return await start_grpc_server(self.service, self.keys, cfg.host, port, cfg.limits, self.tls)

    def error_reply(self, status: int, message: str) -> JSONResponse:
        return error_reply(status, message)

    async def close(self) -> None:
        """The models, then the search threads and the rm_server clients."""
        await self.service.close()
        self.searches.close()
        await self.rm_check.close()


async def serve(config: ServerConfig) -> None:
    """Serve until SIGINT or SIGTERM, then stop cleanly (exit status 0)."""
    await serve_until_signal(PolicyServer(config))


class BackgroundServer(runtime.BackgroundServer[PolicyServer]):
    """A PolicyServer on its own thread and event loop: `with BackgroundServer(cfg) as s: s.http_url`."""

    def __init__(self, config: ServerConfig, backends: Mapping[str, GenerationBackend] | None = None) -> None:
        super().__init__(lambda: PolicyServer(config, backends), name="policy-server")
        self.config = config
