"""How big a loaded model is: parameters, weight bytes, dtype, device, and a causal LM's KV cache per token.

Both services log one line per model at start and the trainer prints the same figures (with its optimizer
state), so that a GPU user sees before the first request what the weights take and what the batch limits
imply for the KV cache, instead of learning it from an out-of-memory error.

The KV-cache figure is the standard one for decoder-only transformers: every layer keeps one key and one
value vector per KV head per token, so bytes/token = 2 x layers x kv_heads x head_dim x element size (in the
cache's dtype, the model's). Sliding-window or hybrid caches hold less; this is the upper bound.

`is_out_of_memory` tells an allocation failure (CUDA's or the CPU allocator's) from other errors, so
that the services can answer it as "lower the batch limits" and go on serving.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


@dataclass(frozen=True)
class ModelSize:
    parameters: int  # every parameter, counted once (tied weights share storage)
    trainable: int  # those with requires_grad (a LoRA run: the adapter's)
    weight_bytes: int  # what the parameters and buffers take on their device
    dtype: str  # the parameters' dtype ("bfloat16"), or "mixed(float32,bfloat16)"
    device: str  # "cpu", "cuda:0", ...
    kv_bytes_per_token: int | None  # causal LMs: the KV cache one token takes; None for other models

    def describe(self) -> str:
        """One line for a log: `1.07M parameters, 4.1 MiB of weights in float32 on cpu, KV cache 4.0 KiB/token`."""
        weights = human_bytes(self.weight_bytes)
        text = f"{count(self.parameters)} parameters, {weights} of weights in {self.dtype} on {self.device}"
        if self.trainable not in (0, self.parameters):
            text += f" ({count(self.trainable)} trainable)"
        if self.kv_bytes_per_token is not None:
            text += f", KV cache {human_bytes(self.kv_bytes_per_token)}/token"
        return text


def model_size(model: torch.nn.Module) -> ModelSize:
    """The sizes of `model` as loaded: tensors on `meta` count their bytes too (nothing is allocated)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}  # by identity: tied weights once
    params = {id(p): p for p in model.parameters()}
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in params.values()})
    devices = sorted({str(p.device) for p in params.values()})
    config = getattr(model, "config", None)
    kv = None
    if config is not None and _is_causal_lm(model):
        element = next(iter(params.values())).element_size() if params else 4
        kv = kv_cache_bytes_per_token(config, element)
    return ModelSize(
        parameters=sum(p.numel() for p in params.values()),
        trainable=sum(p.numel() for p in params.values() if p.requires_grad),
        weight_bytes=sum(t.numel() * t.element_size() for t in tensors.values()),
        dtype=dtypes[0] if len(dtypes) == 1 else f"mixed({','.join(dtypes)})",
        device=",".join(devices) or "cpu",
        kv_bytes_per_token=kv,
    )


def kv_cache_bytes_per_token(config, element_size: int) -> int | None:
    """2 (key, value) x layers x KV heads x head dim x `element_size` bytes; None where the config does not say."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(text, "num_hidden_layers", None)
    heads = getattr(text, "num_attention_heads", None)
    if not layers or not heads:
        return None
    kv_heads = getattr(text, "num_key_value_heads", None) or heads  # grouped-query attention keeps fewer
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 2 * layers * kv_heads * head_dim * element_size


def _is_causal_lm(model: torch.nn.Module) -> bool:
    # transformers names its generating heads *ForCausalLM (and a few *ForConditionalGeneration)
    name = type(model).__name__
    return name.endswith(("ForCausalLM", "ForConditionalGeneration"))


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's out-of-memory error (CUDA's and other accelerators'), or the CPU allocator's, which is a
    plain RuntimeError saying so."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(exc)
    )


def human_bytes(n: float) -> str:
    """1536 -> "1.5 KiB"; binary units, one decimal."""
    for unit in _UNITS:
        if abs(n) < 1024 or unit == _UNITS[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def count(n: int) -> str:
    """1_070_000 -> "1.07M": parameters and tokens at a glance."""
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.3g}{suffix}"
    return str(n)
