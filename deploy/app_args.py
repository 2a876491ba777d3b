"""The Ray Serve applications' arguments: how many replicas and what each holds, and the service's own config.

`serve run assay.deploy.ray_serve:rm_app spec=rewards.yaml num_replicas=2` hands the builder a flat
mapping of `key=value` strings (or typed values from a Serve config file's `args:`). Its keys are of
two kinds, and every other key is refused with the list of known ones:

- `Replicas`' fields: the replica count or the autoscaling bounds, and the resources of each replica;
- the service's `ServerConfig` fields, by the names of `assay rm serve`'s / `assay policy serve`'s
  flags with underscores (`max_items=64`, `api_key=...`, `model_workers=false`), flattened as the
  command line flattens them (`assay.cli_options`), so one name means one thing everywhere. A
  repeatable flag takes several values separated by whitespace. `host` is the address of Serve's
  proxy (it decides the allowed Host names, and whether keys are required); what Serve does in the
  replicas' place (`SERVES`: ports, TLS, connection bounds, logging) is refused, saying so.

Values are converted and checked by pydantic against the dataclasses' own types, then by the
dataclasses' own `__post_init__` checks (the keyless public bind among them), so a bad value is a
ValueError that names the key. Nothing here imports Ray.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydantic import TypeAdapter, ValidationError

from assay.base.connections import BaseServerConfig
from assay.cli_options import options
from assay.policy_server.config import ServerConfig as PolicyConfig
from assay.rm_server.config import ServerConfig as RewardConfig

C = TypeVar("C", bound=BaseServerConfig)


@dataclass(frozen=True)
class Replicas:
    """How many replicas of one service run, and what each one is given (Serve's deployment options)."""

    num_replicas: int = field(
        default=1, metadata={"help": "replicas (a fixed count; with --max-replicas, the count autoscaling starts at)"}
    )
    min_replicas: int = field(default=1, metadata={"help": "autoscaling: the fewest replicas (with --max-replicas)"})
    max_replicas: int | None = field(
        default=None,
        metadata={"help": "autoscaling: the most replicas; set, Serve scales on ongoing requests per replica"},
    )
    target_ongoing_requests: float = field(
        default=2.0, metadata={"help": "autoscaling: the ongoing requests per replica Serve scales towards"}
    )
    upscale_delay_s: float = field(
        default=30.0, metadata={"help": "autoscaling: seconds the load must stay high before a replica is added"}
    )
    downscale_delay_s: float = field(
        default=600.0, metadata={"help": "autoscaling: seconds the load must stay low before a replica is removed"}
    )
    look_back_period_s: float = field(
        default=30.0, metadata={"help": "autoscaling: the window (seconds) the ongoing requests are averaged over"}
    )
    metrics_interval_s: float = field(
        default=10.0,
        metadata={
            "help": "autoscaling: how often (seconds) the request counts reach Serve's controller (Ray 2.60 "
            "warns that environment variables will replace it; it is still the setting Serve reads)"
        },
    )
    num_cpus: float = field(
        default=1.0, metadata={"help": "CPUs reserved per replica (its torch threads, unless set, follow it)"}
    )
    num_gpus: float = field(default=0.0, metadata={"help": "GPUs per replica (fractions share one GPU)"})
    max_ongoing_requests: int = field(
        default=64,
        metadata={
            "help": "requests one replica holds at once; beyond it the proxy queues them (the service batches "
            "what it holds, so keep it above one request's worth of batching)"
        },
    )

    def __post_init__(self) -> None:
        if self.num_replicas < 1 or self.min_replicas < 0:
            raise ValueError(f"num_replicas must be at least 1 and min_replicas at least 0, not {self}")
        if self.max_replicas is not None and not self.min_replicas <= self.num_replicas <= self.max_replicas:
            raise ValueError(
                f"autoscaling needs min_replicas <= num_replicas <= max_replicas, not "
                f"{self.min_replicas} <= {self.num_replicas} <= {self.max_replicas}"
            )
        if self.num_cpus < 0 or self.num_gpus < 0 or self.max_ongoing_requests < 1:
            raise ValueError("num_cpus and num_gpus must not be negative, max_ongoing_requests at least 1")
        if not self.look_back_period_s > 0 or not self.metrics_interval_s > 0:
            raise ValueError("look_back_period_s and metrics_interval_s must be positive")
        if not self.target_ongoing_requests > 0:
            raise ValueError(f"target_ongoing_requests must be positive, not {self.target_ongoing_requests}")

    def deployment_options(self) -> dict[str, Any]:
        """Serve's `Deployment.options(...)` for these replicas."""
        opts: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "max_ongoing_requests": self.max_ongoing_requests,
        }
        if self.max_replicas is None:
            return {**opts, "num_replicas": self.num_replicas}
        autoscaling = {
            "min_replicas": self.min_replicas,
            "initial_replicas": self.num_replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
            "look_back_period_s": self.look_back_period_s,
            "metrics_interval_s": self.metrics_interval_s,
        }
        return {**opts, "autoscaling_config": autoscaling}

    @property
    def torch_threads(self) -> int:
        """Torch threads a replica's models get by default: the CPUs it reserved, at least one."""
        return max(1, int(self.num_cpus))


REPLICA_KEYS = {f.name for f in dataclasses.fields(Replicas)}
# What Serve does in a replica's place: its proxy listens (HTTP only; gRPC is out of scope under Ray), bounds
# the connections and drains on shutdown, and its logging configures the replicas' logs.
SERVES = ("port", "grpc_port", "tls_cert", "tls_key", "connections", "log_level", "log_format", "access_log")


def parse_args(cls: type[C], args: Mapping[str, Any]) -> tuple[C, Replicas]:
    """The service's config and its replicas from a builder's flat `args`. The keys in the service's
    environment variable (`ASSAY_API_KEYS`, `ASSAY_POLICY_API_KEYS`) are added to `api_key`'s, and a field
    with a variable of its own (`ASSAY_RM_API_KEY`) is read from it unless given, as the command line does."""
    by_name = {o.name: o for o in options(cls, exclude=SERVES)}
    unknown = sorted(set(args) - REPLICA_KEYS - set(by_name))
    serves = sorted(name for name in unknown if name in {o.name for o in options(cls)})
    if serves:
        raise ValueError(
            f"{', '.join(serves)}: Serve's to set under Ray, not a replica's (its proxy listens for every replica: "
            "`serve run` takes its http_options from a config file, `assay deploy ray` has --host and --port)"
        )
    if unknown:
        known = ", ".join(sorted(REPLICA_KEYS | set(by_name)))
        raise ValueError(f"unknown argument(s) {', '.join(unknown)}; known: {known}")
    nested: dict[str, Any] = {}
    for name, value in args.items():
        if name in REPLICA_KEYS:
            continue
        path = by_name[name].path
        if isinstance(value, str) and str(by_name[name].parameter.annotation).startswith("list["):
            value = value.split()  # a repeatable flag: whitespace-separated, as its environment variable
        elif isinstance(value, str) and value.lower() == "none":
            value = None  # `grpc_port=none`, as on the command line
        _put(nested, path, value)
    keys = (*os.environ.get(cls.keys_env_var, "").split(), *nested.get("api_keys", ()))
    if keys:
        nested["api_keys"] = keys
    # A field with a variable of its own (the policy's key at rm_server: ASSAY_RM_API_KEY) is read from it when
    # the args leave it out, as the command line reads it: a secret has no place in a Serve config file.
    for name, o in by_name.items():
        own = o.parameter.default.envvar
        if name not in args and own and os.environ.get(own):
            _put(nested, o.path, os.environ[own])
    replicas = {name: value for name, value in args.items() if name in REPLICA_KEYS}
    return _validate(cls, nested), _validate(Replicas, replicas)


def rm_args(args: Mapping[str, Any]) -> tuple[RewardConfig, Replicas]:
    """`rm_app`'s arguments; a spec that cannot serve is refused here, not in every replica."""
    from assay.rm_server.spec import check_devices, load_spec

    config, replicas = parse_args(RewardConfig, args)
    check_devices(load_spec(config.spec))
    return config, replicas


def policy_args(args: Mapping[str, Any]) -> tuple[PolicyConfig, Replicas]:
    """`policy_app`'s arguments: `assay policy serve`'s, with its `model=DIR` and `model_name=NAME`."""
    args = dict(args)
    model, name = args.pop("model", None), args.pop("model_name", "policy")
    config, replicas = parse_args(PolicyConfig, args)
    if model is None:
        return config, replicas
    if not Path(model).is_dir():
        raise ValueError(f"model={model}: no such checkpoint directory")
    return dataclasses.replace(config, models={str(name): Path(model)}), replicas


def _validate(cls: type[Any], values: Mapping[str, Any]) -> Any:
    try:
        return TypeAdapter(cls).validate_python(dict(values))
    except ValidationError as exc:
        problems = []
        for e in exc.errors()[:10]:
            where = ".".join(str(p) for p in e["loc"])
            problems.append(f"{where}: {e['msg']}" if where else e["msg"])
        raise ValueError(f"bad {cls.__name__} argument(s): " + "; ".join(problems)) from None


def _put(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value
