"""The reward service's settings: what `assay rm serve` takes, light to import (no torch, no fastapi).

The command line derives its options, their defaults and help from these dataclasses
(`assay.cli_options`); `RewardServer` reads them. Each validates on construction and says
what to change; nothing here reads a file or the environment.
"""

from __future__ import annotations

import math
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


# The end-of-sequence and padding tokens of the common tokenizer families (GPT-2/Qwen, ChatML, Llama 2
# and 3, Mistral, Gemma, Phi-3), and the beginnings of sequence that a decoded query may start with.
STRIP_TOKENS = (
    "<|endoftext|>",
    "<|im_end|>",
    "</s>",
    "<pad>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|finetune_right_pad_id|>",
    "<eos>",
    "<end_of_turn>",
    "<|end|>",
    "<s>",
    "<|begin_of_text|>",
    "<bos>",
)


@dataclass(frozen=True)
class Compat:
    """The peers' reward protocols (`rm_server/compat.py`): how their requests map onto rewards."""

    openrlhf_strip_tokens: tuple[str, ...] = field(
        default=STRIP_TOKENS,
        metadata={
            "flag": "openrlhf-strip-token",
            "help": "special token removed from the ends of an OpenRLHF query (its policy's pad, end and start "
            "of sequence: the query is decoded with them); repeatable, replaces the default list "
            "(a request's `?strip=` replaces it for that request)",
        },
    )
    openrlhf_failed_reward: float | None = field(
        default=None,
        metadata={
            "help": "the reward an OpenRLHF call gets for an item that failed (flagged 1 in extra_logs' "
            "assay_failed); none (the default): the whole call fails, 503 with Retry-After (400 for an "
            "item that cannot be scored), and OpenRLHF's client retries it",
        },
    )

    def __post_init__(self) -> None:
        if any(not t for t in self.openrlhf_strip_tokens):
            raise ValueError("openrlhf_strip_tokens: an empty token would strip nothing; remove it")
        if self.openrlhf_failed_reward is not None and not math.isfinite(self.openrlhf_failed_reward):
            raise ValueError(f"openrlhf_failed_reward must be a finite number, not {self.openrlhf_failed_reward}")


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
    compat: Compat = field(default_factory=Compat, metadata={"help": "Peers' reward protocols"})
