"""Where a server listens and how clients' HTTP connections are bounded: the settings and the checks
on them, light to import (the CLIs derive their options from `Connections` and refuse a keyless
public bind before the server stack loads). What enforces the bounds is `assay.base.http_bounds`
and `assay.base.serve`.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import ClassVar, Literal


class InsecureBinding(ValueError):
    """Binding beyond loopback with no API keys configured."""


def is_loopback(host: str) -> bool:
    """Whether a server bound to `host` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Connections:
    """The bounds on clients' HTTP connections, and the drain on shutdown."""

    max_connections: int = field(
        default=1024, metadata={"help": "HTTP connections open at once; past it a new one is answered 503 and closed"}
    )
    header_timeout_s: float = field(
        default=10.0,
        metadata={
            "flag": "header-timeout",
            "help": "seconds for a request's headers to arrive (from connect, or a kept-alive connection's next byte)",
        },
    )
    body_timeout_s: float = field(
        default=120.0,
        metadata={
            "flag": "body-timeout",
            "help": "seconds for a request's body to arrive after its headers (else 408); uploads included",
        },
    )
    idle_timeout_s: float = field(
        default=5.0,
        metadata={"flag": "idle-timeout", "help": "keep-alive: seconds an idle connection is kept after a response"},
    )
    drain_timeout_s: float = field(
        default=30.0,
        metadata={
            "flag": "drain-timeout",
            "help": "on SIGTERM: seconds "
            "in-flight requests may take to finish; what still runs then gets a retryable 503",
        },
    )

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, not {self.max_connections}")
        for name in ("header_timeout_s", "body_timeout_s", "idle_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)}")
        if not self.drain_timeout_s >= 0:
            raise ValueError(f"drain_timeout_s must not be negative, not {self.drain_timeout_s}")


LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
LogLevel = Literal["critical", "error", "warning", "info", "debug"]  # a choice on the command line
LOG_FORMATS = ("text", "json")


@dataclass(frozen=True, kw_only=True)
class BaseServerConfig:
    """What every server's config holds, named alike in both services: where it listens, who may
    call it, the connection bounds and the log level. A service's config adds its own fields and
    says which scope a bare key gets and which environment variable its command line reads keys from.
    """

    key_scope: ClassVar[str]  # a key's scope in the refusal's advice: `--api-key KEY:<scope>`
    keys_env_var: ClassVar[str]  # where the command line reads more keys from
    env_prefix: ClassVar[str]  # of the variables the command line reads options from: `ASSAY_RM` (ASSAY_RM_PORT)

    host: str = field(default="127.0.0.1", metadata={"help": "address to bind; beyond loopback API keys are required"})
    port: int = field(default=8000, metadata={"help": "HTTP port (0 picks a free one)"})
    grpc_port: int | None = field(default=None, metadata={"help": "gRPC port (0 picks a free one; none: no gRPC)"})
    api_keys: tuple[str, ...] = field(
        default=(), metadata={"flag": "api-key", "env": False, "help": "KEY:scope[,scope]; repeatable"}
    )
    allowed_hosts: tuple[str, ...] = field(
        default=(),
        metadata={
            "flag": "allowed-host",
            "help": "a Host name clients "
            "reach this server by (e.g. api.example.com, *.example.com); repeatable. Others are refused (DNS "
            "rebinding); default: loopback names on a loopback bind, any beyond it",
        },
    )
    connections: Connections = field(default_factory=Connections, metadata={"help": "Connections"})
    log_level: LogLevel = field(default="warning", metadata={"help": "server log level"})
    log_format: Literal["text", "json"] = field(
        default="text",
        metadata={
            "help": "text, or json: every log record one JSON object per line (time, level, logger, message, "
            "request_id, and an access line's fields)"
        },
    )
    access_log: bool = field(
        default=True,
        metadata={
            "help": "one line per HTTP request and gRPC call (method, path, status, ms, request id, client, bytes, "
            "model or reward), at level info"
        },
    )

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be a port number 0-65535 (0 picks a free one), not {self.port}")
        if self.grpc_port is not None and not 0 <= self.grpc_port <= 65535:
            raise ValueError(
                f"grpc_port must be a port number 0-65535 (0 picks a free one), or None for no gRPC "
                f"(--grpc-port none), not {self.grpc_port}"
            )
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"unknown log level {self.log_level!r}: use one of {', '.join(LOG_LEVELS)}")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"unknown log format {self.log_format!r}: use one of {', '.join(LOG_FORMATS)}")
        if not is_loopback(self.host) and not self.api_keys:
            raise InsecureBinding(
                f"refusing to serve on {self.host} without API keys: pass --api-key KEY:{self.key_scope} "
                f"(or set {self.keys_env_var}), or bind 127.0.0.1"
            )
