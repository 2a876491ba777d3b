"""Both services as Ray Serve deployments: replicas of the same serving layer behind the same HTTP API.

    serve run assay.deploy.ray_serve:rm_app spec=rewards.yaml num_replicas=2
    serve run assay.deploy.ray_serve:policy_app model=ckpt/policy max_replicas=4 num_gpus=1

Each replica of `RewardDeployment` / `PolicyDeployment` builds its service exactly as `assay rm serve` /
`assay policy serve` does (`RewardServer`, `PolicyServer`: the spec or checkpoints, the keys, the allowed
Host names), loads its models in its (async) constructor, and only then serves that service's own FastAPI
app (`create_app`) as its ingress: Serve routes to a replica once its constructor has returned, so a
replica takes traffic only with its models loaded, and `check_health` keeps asking the service. The
routes, guards, error bodies and `/metrics` are the service's own; Serve's proxy takes uvicorn's place,
so the connection bounds and the drain of `assay.base.serve` are Serve's (`max_ongoing_requests`, its
graceful shutdown). Every response names the replica that made it (`X-Assay-Replica`).

rm_server's model rewards keep their worker processes (`--no-model-workers` turns them off as on the
command line): Ray isolates and restarts a replica, but inside it the forward passes would still share the
event loop's GIL, which is what the workers are for; they exit with their replica (the forkserver's workers
watch their parent). Torch threads follow the CPUs a replica reserved (`num_cpus`), not the node's cores.

gRPC is out of scope under Ray (Serve's gRPC proxy takes its own servicers, not a `grpc.aio` server per
replica); run `assay rm serve` for gRPC. The arguments the builders take are `app_args.parse_args`'.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ray import serve
from ray.serve import Application
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from assay.deploy.app_args import Replicas, policy_args, rm_args
from assay.deploy.weight_sync import WeightSync
from assay.policy_server.config import ServerConfig as PolicyConfig
from assay.rm_server.config import ServerConfig as RewardConfig

REPLICA_HEADER = "X-Assay-Replica"


class ReplicaHeader:
    """ASGI middleware: every HTTP response carries `X-Assay-Replica: <Serve's replica id>`."""

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app, self.header = app, (REPLICA_HEADER.lower().encode(), replica.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def named(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), self.header]}
            await send(message)

        await self.app(scope, receive, named)


def _replica_id() -> str:
    return serve.get_replica_context().replica_id.unique_id


def _set_torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


class _Replica:
    """What both deployments' replicas do alike: serve their server's app, named, and say whether it is ready."""

    server: Any  # RewardServer or PolicyServer, built in the deployment's constructor

    def __serve_build_asgi_app__(self) -> Any:
        app = self.server.create_app()
        app.add_middleware(ReplicaHeader, replica=_replica_id())
        return app

    def check_health(self) -> None:
        if not self.server.service.ready:
            raise RuntimeError(f"the {self.server.name} is not ready")


@serve.deployment(health_check_period_s=5, graceful_shutdown_timeout_s=30)
@serve.ingress()
class RewardDeployment(_Replica):
    """One replica of the reward service: `RewardServer`'s serving layer and app, no listener of its own."""

    async def __init__(self, config: RewardConfig, torch_threads: int) -> None:  # type: ignore[misc]  # Serve awaits it
        from assay.rm_server.server import RewardServer

        if not config.models.model_workers:  # the models compute in this process: its threads are theirs
            _set_torch_threads(torch_threads)
        self.server = RewardServer(config)
        await self.server.service.start()  # the models load before Serve routes here

    async def __del__(self) -> None:
        if hasattr(self, "server"):  # not when the constructor failed
            await self.server.close()
        await super().__del__()  # type: ignore[misc]  # Serve's ingress wrapper: the app's lifespan shutdown


@serve.deployment(health_check_period_s=5, graceful_shutdown_timeout_s=30)
@serve.ingress()
class PolicyDeployment(_Replica):
    """One replica of the policy service: `PolicyServer`'s serving layer, searches and app, no listener."""

    async def __init__(self, config: PolicyConfig, torch_threads: int) -> None:  # type: ignore[misc]  # Serve awaits it
        from assay.policy_server.server import PolicyServer

        _set_torch_threads(torch_threads)
        self.server = PolicyServer(config)
        await self.server.rm_check.start()
        await self.server.service.start()
        # at the published weight versions before Serve routes here; every later push shared (weight_sync.py)
        self.sync = await WeightSync.join(self.server.weights, serve.get_replica_context().app_name, _replica_id())

    async def __del__(self) -> None:
        if hasattr(self, "sync"):
            await self.sync.close()
        if hasattr(self, "server"):
            await self.server.close()
        await super().__del__()  # type: ignore[misc]


def _replica_config(config: Any) -> Any:
    """What a replica serves with: no port or gRPC of its own (Serve's proxy listens); `host` stays,
    as the proxy's address, for the allowed Host names and the keys a public bind needs."""
    return dataclasses.replace(config, port=0, grpc_port=None)


def build_rm_app(config: RewardConfig, replicas: Replicas | None = None) -> Application:
    """The reward service's Serve application: `serve.run(build_rm_app(cfg, Replicas(num_replicas=2)))`."""
    replicas = replicas or Replicas()
    # the decorators made the class a Serve `Deployment`; mypy reads the class
    deployment = RewardDeployment.options(**replicas.deployment_options())  # type: ignore[attr-defined]
    return deployment.bind(_replica_config(config), replicas.torch_threads)


def build_policy_app(config: PolicyConfig, replicas: Replicas | None = None) -> Application:
    """The policy service's Serve application (each replica loads `config.models`, or the embedded ones)."""
    replicas = replicas or Replicas()
    deployment = PolicyDeployment.options(**replicas.deployment_options())  # type: ignore[attr-defined]
    return deployment.bind(_replica_config(config), replicas.torch_threads)


def rm_app(args: Mapping[str, Any]) -> Application:
    """`serve run assay.deploy.ray_serve:rm_app [key=value ...]`: `assay rm serve`'s options by their flag
    names with underscores, and `Replicas`' (see `app_args`)."""
    return build_rm_app(*rm_args(args))


def policy_app(args: Mapping[str, Any]) -> Application:
    """`serve run assay.deploy.ray_serve:policy_app [model=DIR] [model_name=NAME] [key=value ...]`."""
    return build_policy_app(*policy_args(args))
