"""The reward service's settings: what `assay rm serve` takes, light to import (no torch, no fastapi).

The command line derives its options, their defaults and help from these dataclasses
(`assay.cli_options`); `RewardServer` reads them. Each validates on construction and says
what to change; nothing here reads a file or the environment.
"""

from __future__ import annotations

import os
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


@dataclass(frozen=True)
class ModelRuntime:
    """Where model rewards run their forward passes, and on how many torch threads.

    In a worker process per model reward (the default), the forward pass never waits for the
    event loop's GIL, nor the loop for the forward; `--no-model-workers` keeps them on a thread of
    the server process (the vLLM backend always runs there: its engine has processes of its own).
    Threads are set, not left to torch: its default (every core) beside the event loop made single
    requests 0.2-0.9 s where one thread took 15-140 ms on a 2-core machine."""

    model_workers: bool = field(
        default=True,
        metadata={
            "help": "run each model reward (transformers backend) in a worker process of its own, so that "
            "HTTP and gRPC handling never stall its forward passes; --no-model-workers: on a thread of this process"
        },
    )
    torch_threads: int | None = field(
        default=None,
        metadata={
            "help": "torch intra-op threads of each model worker (with --no-model-workers: of this process). "
            "Default: the cores this process may use less one, for the event loop and the tokenizer, shared "
            "among the model rewards, at least 1. More threads than cores left idle spin against each other"
        },
    )

    def __post_init__(self) -> None:
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"torch_threads must be at least 1, not {self.torch_threads}")

    def threads(self, models: int) -> int:
        """Torch threads for each of `models` model rewards that compute at once."""
        if self.torch_threads is not None:
            return self.torch_threads
        return max(1, (len(os.sched_getaffinity(0)) - 1) // max(1, models))


@dataclass(frozen=True, kw_only=True)
class ServerConfig(BaseServerConfig):
    """`assay rm serve`: a reward spec served over HTTP and gRPC."""

    key_scope = "score"
    keys_env_var = "ASSAY_API_KEYS"
    env_prefix = "ASSAY_RM"

    spec: Path | None = field(
        default=None, metadata={"help": "reward spec YAML (default: the embedded arithmetic world's rewards)"}
    )
    port: int = field(default=8000, metadata={"help": "HTTP port (0 picks a free one)"})
    grpc_port: int | None = field(default=50051, metadata={"help": "gRPC port (0 picks a free one; none: no gRPC)"})
    api_keys: tuple[str, ...] = field(
        default=(),
        metadata={
            "flag": "api-key",
            "env": False,  # the keys variable adds to the flags' keys: the command line reads it itself
            "help": "KEY:scope[,scope] (scopes: "
            "score, admin); repeatable. ASSAY_API_KEYS (space-separated) adds more and is the safer way: a command "
            "line is visible to every user of the machine",
        },
    )
    limits: Limits = field(default_factory=Limits, metadata={"help": "Limits per request"})
    models: ModelRuntime = field(default_factory=ModelRuntime, metadata={"help": "Model rewards"})
