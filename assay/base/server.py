"""One service's listeners, HTTP and gRPC on one event loop: the runtime both servers share.

`ServiceServer` is what `RewardServer` and `PolicyServer` are, less what differs between them:
a subclass builds its serving layer (`service`) in `__init__` and says how to make its FastAPI
app (`create_app`), how to start its gRPC server (`start_grpc`), how it answers the runtime's own
refusals (`error_reply`: 503 while draining or over the connection cap, 500 for a bug) and, when
it holds more than its service, what to close after it (`close`). From those this class:

- refuses to bind beyond loopback without API keys (`keys_for`);
- binds HTTP (health answers at once, /ready once the models are loaded), then gRPC when the
  config has a `grpc_port` (a failed gRPC start closes HTTP again), then starts the service;
  both over TLS when the config has a certificate and key (`self.tls`, which `start_grpc` passes on);
- on `stop` drains both listeners side by side (`assay.base.serve.drain`), then closes.

Each service's config subclasses `assay.base.connections.BaseServerConfig`, the fields the runtime reads.
"""

from __future__ import annotations

import functools
import logging
from abc import ABC, abstractmethod
from typing import Protocol

import grpc
from fastapi import FastAPI
from fastapi.responses import Response

from assay.base import grpc_serve
from assay.base.auth import ApiKeys
from assay.base.connections import BaseServerConfig
from assay.base.http_guard import allowed_hosts
from assay.base.serve import HttpListener, drain, settle_after_loading

log = logging.getLogger(__name__)


class Service(Protocol):
    """What the runtime needs of a serving layer: `ready` once loaded, `start` loads, `close` frees."""

    @property
    def ready(self) -> bool: ...

    async def start(self) -> None: ...
    async def close(self) -> None: ...


class ServiceServer(ABC):
    """A service's HTTP and gRPC listeners over its serving layer; subclasses fill in the hooks below."""

    service: Service
    name = "service"  # for the log: "reward service ready on ..."

    def __init__(self, config: BaseServerConfig, keys: ApiKeys) -> None:
        self.config, self.keys = config, keys
        self.hosts = allowed_hosts(config.host, config.allowed_hosts)  # the Host names HTTP answers
        self.tls = (config.tls_cert, config.tls_key) if config.tls_cert and config.tls_key else None
        self.http = HttpListener(config.host, self.tls)
        self.grpc_port: int | None = None
        self._grpc: grpc.aio.Server | None = None

    # --- what each service says ----------------------------------------------------------

    @abstractmethod
    def create_app(self) -> FastAPI:
        """The service's HTTP app (its routes, its error handlers, the guards)."""

    @abstractmethod
    async def start_grpc(self, port: int) -> tuple[grpc.aio.Server, int]:
        """Start the gRPC server on `port` (`config.grpc_port`; 0 picks one); returns it and its bound port."""

    @abstractmethod
    def error_reply(self, status: int, message: str) -> Response:
        """This protocol's answer for the runtime's own refusals (503 retryable, 500)."""

    async def close(self) -> None:
        """After the drain: free what the server holds (the service's models, by default)."""
        await self.service.close()

    # --- the runtime ---------------------------------------------------------------------

    @property
    def http_url(self) -> str:
        return self.http.url

    @property
    def grpc_target(self) -> str:
        return f"{self.config.host}:{self.grpc_port}"

    async def start(self) -> None:
        """Bind both ports (health answers at once, /ready once the models are loaded)."""
        cfg = self.config
        await self.http.start(self.create_app(), cfg.port, cfg.log_level, self.error_reply, cfg.connections)
        if cfg.grpc_port is not None:
            try:
                self._grpc, self.grpc_port = await self.start_grpc(cfg.grpc_port)
            except BaseException:
                await self.http.stop()
                raise
        await self.service.start()
        settle_after_loading()
        log.info("%s ready on %s (gRPC %s)", self.name, self.http_url, self.grpc_port)

    async def wait(self) -> None:
        """Until uvicorn exits (`stop`)."""
        await self.http.wait()

    async def stop(self) -> None:
        """Drain (see `assay.base.serve`), then close."""
        grpc_server = self._grpc
        stop_grpc = functools.partial(grpc_serve.stop, grpc_server) if grpc_server is not None else None
        await drain(self.http, stop_grpc, self.config.connections.drain_timeout_s)
        await self.close()
