"""`assay deploy ray`: both services (or one) as Ray Serve applications, on a local Ray or a cluster's.

    assay deploy ray                               # rm at 127.0.0.1:8000/rm, policy at 127.0.0.1:8000/policy
    assay deploy ray --only rm --rm-arg spec=rewards.yaml --rm-arg num_replicas=2
    assay deploy ray --address auto --host 0.0.0.0     # join a running cluster; keys then required

Secure by default: Ray's token authentication is turned on (`RAY_AUTH_MODE=token`: a local Ray
generates its token; joining a cluster takes the cluster's from `RAY_AUTH_TOKEN` or ~/.ray/auth_token).
It is what guards Ray's own ports (GCS, raylet, workers), which Ray binds on every interface and has no
option to keep on loopback; a local Ray's dashboard is off (`--dashboard`: on 127.0.0.1 only), and Serve's
proxy listens on 127.0.0.1 unless `--host` says otherwise, where both services then refuse to start
without API keys, as `assay rm serve` does. The applications' arguments are `serve run`'s
(`--rm-arg key=value`, `--policy-arg key=value`; `assay.deploy.app_args`) and are all checked before
Ray starts. The command prints the URLs, blocks until SIGINT or SIGTERM, then deletes the
applications and, if it started Ray, shuts Serve and Ray down.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from typing import Any, Literal

import typer
from rich.console import Console

from assay.cli_options import build, config_options
from assay.server_cli import refuse

deploy_app = typer.Typer(help="Run the services beyond one machine.", no_args_is_help=True)
console = Console(soft_wrap=True)


@dataclass(frozen=True)
class RayDeploy:
    """`assay deploy ray`: where Ray and Serve's proxy run, and which applications with which arguments."""

    env_prefix = "ASSAY_DEPLOY"

    address: str | None = field(
        default=None,
        metadata={"help": "a running Ray cluster to join (`auto`, or HOST:PORT); default: start a local Ray"},
    )
    host: str = field(
        default="127.0.0.1",
        metadata={"help": "the address Serve's HTTP proxy binds; beyond loopback both services require API keys"},
    )
    port: int = field(default=8000, metadata={"help": "the port of Serve's HTTP proxy"})
    only: Literal["both", "rm", "policy"] = field(default="both", metadata={"help": "deploy one service only"})
    rm_args: tuple[str, ...] = field(
        default=(),
        metadata={
            "flag": "rm-arg",
            "help": "KEY=VALUE for the reward app, as `serve run assay.deploy.ray_serve:rm_app KEY=VALUE` takes it "
            "(spec=, num_replicas=, max_replicas=, num_cpus=, num_gpus=, any `assay rm serve` option); repeatable",
        },
    )
    policy_args: tuple[str, ...] = field(
        default=(),
        metadata={
            "flag": "policy-arg",
            "help": "KEY=VALUE for the policy app (model=, num_replicas=, ..., any `assay policy serve` option; "
            "rm_url defaults to the reward app on this proxy); repeatable",
        },
    )
    num_cpus: int | None = field(default=None, metadata={"help": "a local Ray's CPUs (default: the machine's)"})
    num_gpus: int | None = field(default=None, metadata={"help": "a local Ray's GPUs (default: those it finds)"})
    dashboard: bool = field(
        default=False, metadata={"help": "a local Ray's dashboard, on 127.0.0.1 only (reach it over SSH forwarding)"}
    )
    ray_auth: bool = field(
        default=True,
        metadata={"help": "Ray's token authentication (RAY_AUTH_MODE=token); --no-ray-auth leaves the environment's"},
    )

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port must be a port number 1-65535, not {self.port}")

    @property
    def url(self) -> str:
        return f"http://{'127.0.0.1' if self.host in ('0.0.0.0', '::') else self.host}:{self.port}"


def _pairs(flag: str, given: tuple[str, ...]) -> dict[str, str]:
    pairs = {}
    for arg in given:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise ValueError(f"--{flag} {arg!r}: expected KEY=VALUE")
        pairs[key.strip()] = value
    return pairs


def app_args(deploy: RayDeploy) -> dict[str, dict[str, Any]]:
    """Each application's arguments, `host` the proxy's, the policy's `rm_url` the reward app's (when both run)."""
    apps: dict[str, dict[str, Any]] = {}
    if deploy.only in ("both", "rm"):
        apps["rm"] = {"host": deploy.host, **_pairs("rm-arg", deploy.rm_args)}
    if deploy.only in ("both", "policy"):
        own = {"rm_url": f"{deploy.url}/rm"} if deploy.only == "both" else {}
        apps["policy"] = {"host": deploy.host, **own, **_pairs("policy-arg", deploy.policy_args)}
    return apps


@deploy_app.command("ray")
@config_options(RayDeploy, env_prefix=RayDeploy.env_prefix)
def ray_cmd(given: dict) -> None:
    """Deploy the services on Ray Serve (a local Ray, its proxy on loopback, by default) and serve until interrupted."""
    from assay.deploy.app_args import policy_args, rm_args

    try:
        deploy = build(RayDeploy, given)
        parsed = {"rm": rm_args, "policy": policy_args}
        checked = {name: parsed[name](args) for name, args in app_args(deploy).items()}  # before Ray starts
    except (ValueError, OSError) as exc:
        refuse(exc)
    if deploy.ray_auth:
        os.environ["RAY_AUTH_MODE"] = "token"  # before Ray is imported: it reads the mode once
    import ray
    from ray import serve

    from assay.deploy.ray_serve import build_policy_app, build_rm_app

    builders = {"rm": build_rm_app, "policy": build_policy_app}
    local = deploy.address is None
    if local:
        ray.init(
            num_cpus=deploy.num_cpus,
            num_gpus=deploy.num_gpus,
            include_dashboard=deploy.dashboard,
            dashboard_host="127.0.0.1",
        )
    else:
        ray.init(address=deploy.address)
    # SIGTERM ends the command as Ctrl-C does: the applications are deleted, a local Ray shut down
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    failed: RuntimeError | None = None
    try:
        serve.start(http_options={"host": deploy.host, "port": deploy.port})
        for name, (config, replicas) in checked.items():
            serve.run(builders[name](config, replicas), name=name, route_prefix=f"/{name}")  # type: ignore[operator]
            console.print(f"{name}: {deploy.url}/{name}", highlight=False)
        console.print("serving; Ctrl-C stops", highlight=False)
        signal.pause()
    except KeyboardInterrupt:
        pass
    except RuntimeError as exc:  # serve.run's: an application whose replicas failed to start, with their error
        failed = exc
    finally:
        for name in checked:
            serve.delete(name)
        if local:
            serve.shutdown()
            ray.shutdown()
    if failed is not None:
        refuse(failed)
