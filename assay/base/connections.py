"""Where a server listens and how clients' HTTP connections are bounded: the settings and the checks
on them, light to import (the CLIs derive their options from `Connections` and refuse a keyless
public bind before the server stack loads). What enforces the bounds is `assay.base.http_bounds`
and `assay.base.serve`.

TLS (`--tls-cert`, `--tls-key`) covers both listeners, HTTPS and gRPC, with one certificate. It
is encryption and the server's identity, not the client's: a bind beyond loopback still needs
API keys. `check_tls` loads the pair once at start (the command line calls it before the server
stack is imported), so a missing file or a key that is not the certificate's is one sentence.
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass, field
from pathlib import Path
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
    tls_cert: Path | None = field(
        default=None,
        metadata={
            "help": "PEM certificate (chain) to serve HTTPS and gRPC over TLS with, beside --tls-key; "
            "TLS is not authentication: beyond loopback API keys are still required"
        },
    )
    tls_key: Path | None = field(default=None, metadata={"help": "PEM private key of --tls-cert"})
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
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both --tls-cert and --tls-key (a certificate and its private key), or neither")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"unknown log level {self.log_level!r}: use one of {', '.join(LOG_LEVELS)}")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"unknown log format {self.log_format!r}: use one of {', '.join(LOG_FORMATS)}")
        if not is_loopback(self.host) and not self.api_keys:
            raise InsecureBinding(
                f"refusing to serve on {self.host} without API keys: pass --api-key KEY:{self.key_scope} "
                f"(or set {self.keys_env_var}), or bind 127.0.0.1"
            )


def check_tls(config: BaseServerConfig) -> None:
    """ValueError, in one sentence, unless `config`'s certificate and key (if any) load as a pair."""
    if config.tls_cert is None or config.tls_key is None:
        return
    for flag, path in (("--tls-cert", config.tls_cert), ("--tls-key", config.tls_key)):
        if not path.is_file():
            raise ValueError(f"{flag} {path}: no such file.")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(config.tls_cert, config.tls_key, password=_encrypted)
    except ssl.SSLError as exc:
        raise ValueError(
            f"--tls-cert {config.tls_cert} and --tls-key {config.tls_key} do not load as a PEM certificate and its "
            f"private key ({exc.reason or exc})."
        ) from None


def _encrypted() -> bytes:
    # called by OpenSSL only for an encrypted key, which would otherwise prompt on the terminal
    raise ValueError("--tls-key is encrypted; serve with an unencrypted key file (readable by this user only).")
