"""Run the policy service: HTTP (uvicorn) and, with a grpc_port, gRPC on one event loop, over one PolicyService.

`PolicyServer` is what `assay policy serve` and `python -m assay.policy_server` run; `BackgroundServer`
runs the same on a thread of its own, for tests and benchmarks in one process. The socket,
uvicorn, signal handling, connection bounds and drain are `assay.serve`'s; `error_reply` gives
them OpenAI's error shape (503 `server_error`, code `not_ready`, with Retry-After).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from fastapi.responses import JSONResponse

from assay.clients.reward import RewardClient
from assay.policy_server.backends import GenerationBackend
from assay.policy_server.backends.hf import HFBackend
from assay.policy_server.config import ServerConfig
from assay.policy_server.http_api import SCOPES, create_app
from assay.policy_server.protocol import ErrorInfo, ErrorResponse
from assay.policy_server.serving import Metrics, PolicyService
from assay.policy_server.serving_search import SearchService
from assay.policy_server.weight_paths import weight_roots
from assay import serve as runtime
from assay.connections import InsecureBinding, is_loopback
from assay.http_guard import allowed_hosts
from assay.serve import HttpListener, serve_until_signal, settle_after_loading
from assay.rm_server.auth import ApiKeys

log = logging.getLogger("policy_server")
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

        return VllmBackend(name, path, max_sequences=config.batching.max_queue,
                           gpu_memory_utilization=config.gpu_memory_utilization, on_finished=finished)  # fmt: skip
    return HFBackend.load(name, path, config.batching, on_batch=functools.partial(metrics.on_batch, name),
                          on_finished=finished)  # fmt: skip


class PolicyServer:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.keys = ApiKeys.from_env(config.api_keys, env_var=config.keys_env_var, scopes=SCOPES)
        if not is_loopback(config.host) and not self.keys:
            raise InsecureBinding(
                f"refusing to serve on {config.host} without API keys: pass --api-key KEY:generate "
                f"(or set {config.keys_env_var}), or bind 127.0.0.1"
            )
        self.weight_roots = weight_roots(config.weights_dirs)  # a missing one fails before the models load
        # before the models load, so that a taken port or a malformed --rm-url fails at once
        runtime.check_port_free(config.host, config.port, "HTTP")
        if config.grpc_port is not None:
            runtime.check_port_free(config.host, config.grpc_port, "gRPC")
        rewards = RewardClient.http(config.rm_url, api_key=config.rm_api_key, timeout_s=config.rm_timeout_s,
                                    max_retries=config.rm_max_retries)  # fmt: skip
        metrics = Metrics()
        backends = {name: load_backend(config, name, path, metrics)
                    for name, path in (config.models or embedded_models()).items()}  # fmt: skip
        self.service = PolicyService(backends, config.limits, metrics)
        self.searches = SearchService(self.service, rewards, config.rm_url)
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
        hosts = allowed_hosts(self.config.host, self.config.allowed_hosts)
        app = create_app(self.service, self.keys, self.searches, self.weight_roots, hosts)
        await self.http.start(app, self.config.port, self.config.log_level, error_reply, self.config.connections)
        if self.config.grpc_port is not None:
            from assay.policy_server.grpc_api import start_grpc_server

            try:
                self._grpc, self.grpc_port = await start_grpc_server(
                    self.service, self.keys, self.config.host, self.config.grpc_port, self.config.limits
                )
            except BaseException:
                await self.http.stop()
                raise
        await self.service.start()
        settle_after_loading()
        log.info("policy service ready on %s (gRPC %s; models: %s)", self.http_url, self.grpc_port,
                 ", ".join(self.service.backends))  # fmt: skip

    async def wait(self) -> None:
        await self.http.wait()

    async def stop(self) -> None:
        """Drain (see `assay.serve`), then close the models."""
        await runtime.drain(self.http, self._grpc, self.config.connections.drain_timeout_s)
        await self.service.close()
        self.searches.close()


async def serve(config: ServerConfig) -> None:
    """Serve until SIGINT or SIGTERM, then stop cleanly (exit status 0)."""
    await serve_until_signal(PolicyServer(config))


class BackgroundServer(runtime.BackgroundServer[PolicyServer]):
    """A PolicyServer on its own thread and event loop: `with BackgroundServer(cfg) as s: s.http_url`."""

    def __init__(self, config: ServerConfig) -> None:
        super().__init__(lambda: PolicyServer(config), name="policy-server")
        self.config = config
