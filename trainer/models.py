"""The trainer's models on a device, in mixed precision: loading, preparing, autocast, sizes, out of memory.

A run's models go through three stages, kept apart so that LoRA (`trainer.lora`) slots in between:

    load_policy / checkpoints.load_model    float32 weights on the CPU, the configured attention
    prepare(model, hardware)                moved to `hardware.device`, float32 kept (the master weights),
                                            gradient checkpointing on when asked; idempotent
    (LoRA wraps the prepared model)         then the optimizer is built over what trains

Mixed precision here is torch autocast over float32 weights (what `Hardware.dtype` names is the compute
dtype): the forward and the loss run under `Precision.autocast()`, so matrix products run in bfloat16
or float16 while the weights, their gradients and AdamW's two moments stay float32, and every log-prob
and loss is computed from logits upcast to float32. float16 also needs a loss scale, since its small
gradients underflow: `Precision.step` scales the loss with torch.amp.GradScaler, unscales before
clipping, and skips a step whose gradients overflowed (the scale then halves). bfloat16 has float32's
range and needs none.

The frozen reference (`reference`) keeps float32 weights and runs under the same autocast as the policy,
so at the start it computes exactly the policy's log-probs and the KL starts at 0. A reference stored in
bfloat16 takes half the memory (2 bytes a parameter instead of 4, next to the policy's 16 for weights,
gradient and AdamW) but differs from the float32 policy under autocast wherever autocast leaves an op in
float32 (embeddings, norms, the residual stream), which gives a KL that is not 0 before the first update
and a gradient towards rounding noise. With LoRA the reference is the base model itself and costs nothing.

`sizes` says what a run holds before it starts (weights, gradients, optimizer state; activations depend
on the batch and are not counted). `out_of_memory` turns an out-of-memory error inside a training step
into `OutOfMemory`, one paragraph saying which step ran out, doing what, and what to lower.
"""

from __future__ import annotations

import copy
import gc
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, TypeVar

import torch

from assay.checkpoints import EMBEDDED, load_model
from assay.model_sizes import human_bytes, is_out_of_memory, model_size
from assay.trainer.config import Hardware

M = TypeVar("M", bound=torch.nn.Module)


def load_policy(path: str | Path | None, hardware: Hardware):
    """(model, tokenizer): the causal LM at `path` (None: the embedded policy), float32, on the CPU,
    with `hardware`'s attention implementation (a CheckpointError names one the model or machine lacks)."""
    path = EMBEDDED["policy"][1] if path is None else path
    attn = None if hardware.attn_implementation == "auto" else hardware.attn_implementation
    return load_model(path, "causal_lm", dtype="float32", attn_implementation=attn)


def prepare(model: M, hardware: Hardware) -> M:
    """`model` in place, for training: float32 master weights on `hardware.device`, `hardware`'s
    attention implementation, gradient checkpointing when asked, train mode. Calling it again
    changes nothing. ValueError for an attention implementation the model or the machine lacks."""
    wanted = hardware.attn_implementation
    hf: Any = model  # a transformers model (or peft's wrapper of one): its own methods below
    config = getattr(model, "config", None)
    if wanted != "auto" and config is not None and config._attn_implementation != wanted:
        try:  # a model loaded without it (the critic, a reward model to train)
            hf.set_attn_implementation(wanted)
        except (ValueError, ImportError) as exc:
            raise ValueError(f"--attn-implementation {wanted}: {str(exc).strip().splitlines()[0]}") from None
    model.to(device=hardware.device, dtype=torch.float32)
    if hardware.gradient_checkpointing:
        # non-reentrant: the variant torch recommends, which also works when the inputs need no grad
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def reference(model: M) -> M:
    """A frozen copy of the prepared `model`, on its device and in its float32 (module docstring)."""
    return copy.deepcopy(model).eval().requires_grad_(False)


def device_of(model: torch.nn.Module) -> torch.device:
    """Where `model`'s weights are: every tensor a step builds for it goes there."""
    return next(model.parameters()).device


def cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s state dict on the CPU (what a weight push sends; a no-op copy for a CPU model)."""
    return {name: t.detach().cpu() for name, t in model.state_dict().items()}


class Precision:
    """A run's compute dtype: `autocast()` for the forward and the loss, `step` for the update."""

    def __init__(self, hardware: Hardware) -> None:
        self.device_type = torch.device(hardware.device).type
        self.dtype = None if hardware.dtype == "float32" else getattr(torch, hardware.dtype)
        self.scaler = torch.amp.GradScaler(self.device_type) if hardware.dtype == "float16" else None

    def autocast(self) -> AbstractContextManager:
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def step(self, loss: torch.Tensor, *groups: tuple[torch.optim.Optimizer, float]) -> list[float]:
        """Backward `loss`, clip each optimizer's parameters to its max norm, step them all; the
        gradient norms before clipping (inf where float16 gradients overflowed: then no step is taken)."""
        for optimizer, _ in groups:
            optimizer.zero_grad(set_to_none=True)
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()
        norms = []
        for optimizer, max_norm in groups:
            if self.scaler is not None:
                self.scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            params = [p for group in optimizer.param_groups for p in group["params"]]
            norms.append(float(torch.nn.utils.clip_grad_norm_(params, max_norm)))
        for optimizer, _ in groups:
            if self.scaler is None:
                optimizer.step()
            else:
                self.scaler.step(optimizer)
        if self.scaler is not None:
            self.scaler.update()
        return norms


# --- sizes ---------------------------------------------------------------------------------------


def sizes(
    modules: Mapping[str, torch.nn.Module], hardware: Hardware, trained: Sequence[str] = ("policy",)
) -> list[str]:
    """Lines saying what a run holds before its first step: each module's weights (`assay.model_sizes`),
    the gradients and AdamW state of the `trained` modules' parameters that require a gradient (a LoRA
    run: the adapter's), and the total. AdamW allocates its two moments, each in the parameter's dtype,
    at the first step, so they are counted from the parameters, not read from its still empty state."""
    lines, total = [], 0
    seen: set[int] = set()
    for name, module in modules.items():
        fresh = [t for t in [*module.parameters(), *module.buffers()] if id(t) not in seen]
        seen.update(id(t) for t in fresh)
        total += sum(t.numel() * t.element_size() for t in fresh)  # a tensor two modules share counts once
        lines.append(f"{name}: {model_size(module).describe()}")
    for name in trained:
        grads = sum(p.numel() * p.element_size() for p in modules[name].parameters() if p.requires_grad)
        moments = 2 * grads  # exp_avg and exp_avg_sq
        total += grads + moments
        lines.append(f"{name}: gradients {human_bytes(grads)}, optimizer state {human_bytes(moments)} (AdamW)")
    compute = "float32" if hardware.dtype == "float32" else f"{hardware.dtype} autocast over float32 weights"
    checkpointing = ", gradient checkpointing" if hardware.gradient_checkpointing else ""
    lines.append(
        f"total {human_bytes(total)} on {hardware.device} before activations; compute {compute}{checkpointing}"
    )
    return lines


# --- out of memory -------------------------------------------------------------------------------


class OutOfMemory(RuntimeError):
    """A training step ran out of device (or host) memory; the message says where and what to lower."""


@contextmanager
def out_of_memory(where: str, lower: Sequence[str], hardware: Hardware, *, resumable: bool = True) -> Iterator[None]:
    """Run the block; an out-of-memory error in it becomes `OutOfMemory` naming `where` (the step and
    what it was doing) and what to lower. The device's cached blocks are released first, so the
    process can stop cleanly (services shut down; a `resumable` run's directory is left for --resume)."""
    try:
        yield
    except RuntimeError as exc:  # torch.OutOfMemoryError is one
        if not is_out_of_memory(exc):
            raise
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        options = [*lower]
        if not hardware.gradient_checkpointing:
            options.append("turn on --gradient-checkpointing (activations recomputed in the backward pass)")
        options.append("train a LoRA adapter instead of every weight (--lora-r 16)")
        if hardware.dtype == "float32":
            options.append("compute in --dtype bfloat16")
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OutOfMemory(
            f"out of memory on {hardware.device} in {where} ({first}). Lower what one step holds: "
            + "; or ".join(options)
            + "."
            + (" The run directory keeps its last checkpoint: continue with --resume." if resumable else "")
        ) from exc
