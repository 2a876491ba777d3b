"""The reward service's settings: what `assay rm serve` takes, light to import (no torch, no fastapi).

The command line derives its options, their defaults and help from these dataclasses
(`assay.cli_options`); `RewardServer` reads them. Each validates on construction and says
what to change; nothing here reads a file or the environment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from assay.base.connections import BaseServerConfig

MIB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. The HTTP body limit is enforced before JSON parsing."""

    max_body_bytes: int = field(default=8 * MIB, metadata={"help": "request body limit in bytes (HTTP and gRPC)"})
    max_items: int = field(default=1024, metadata={"help": "items per request"})
    max_item_chars: int = field(
        default=64 * 1024, metadata={"help": "characters per item: prompt, response and reference together"}
    )
    default_timeout_s: float = field(
        default=60.0, metadata={"help": "seconds a request that sets no timeout_s may take"}
    )
    max_timeout_s: float = field(default=600.0, metadata={"help": "the longest timeout_s a request may set"})

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_items", "max_item_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if not 0 < self.default_timeout_s <= self.max_timeout_s:
            raise ValueError(
                f"default_timeout_s ({self.default_timeout_s}) must be positive and at most "
                f"max_timeout_s ({self.max_timeout_s})"
            )


@dataclass(frozen=True, kw_only=True)
class ServerConfig(BaseServerConfig):
    """`assay rm serve`: a reward spec served over HTTP and gRPC."""

    key_scope = "score"
    keys_env_var = "ASSAY_API_KEYS"

    spec: Path | None = field(
        default=None, metadata={"help": "reward spec YAML (default: the embedded arithmetic world's rewards)"}
    )
    port: int = field(default=8000, metadata={"help": "HTTP port (0 picks a free one)"})
    grpc_port: int | None = field(default=50051, metadata={"help": "gRPC port (0 picks a free one; none: no gRPC)"})
    api_keys: tuple[str, ...] = field(
        default=(),
        metadata={
            "flag": "api-key",
            "help": "KEY:scope[,scope] (scopes: "
            "score, admin); repeatable. ASSAY_API_KEYS (space-separated) adds more and is the safer way: a command "
            "line is visible to every user of the machine",
        },
    )
    limits: Limits = field(default_factory=Limits, metadata={"help": "Limits per request"})
