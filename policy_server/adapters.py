"""LoRA adapter pushes: a trainer's adapter merged into the served weights, versioned like any update.

`POST /v1/admin/adapter?model=NAME` (admin scope, HTTP only, as weight uploads are) takes a
safetensors body holding, for each adapted linear layer of the served model, its two LoRA factors
under peft's saved-adapter names without the `base_model.model.` prefix:

    model.layers.0.self_attn.q_proj.lora_A.weight   [r, in]
    model.layers.0.self_attn.q_proj.lora_B.weight   [out, r]

and in the header's `__metadata__` `lora_alpha`, `r` and optionally `fan_in_fan_out` ("true" for
GPT-2's Conv1D layers, whose weights are stored [in, out]). The server serves

    W = W_base + (lora_alpha / r) * B @ A           (transposed when fan_in_fan_out)

for every adapted weight, W_base being that weight as of start-up or the last full update that sent
it: a copy of each adapted base weight is taken (on the CPU) at the first adapter push that targets
it, and dropped when a full update sends that weight again (`WeightService.bases`). So a push
replaces the previous adapter, never stacks on it: a layer the previous adapter adapted and this
one does not goes back to its base. The merged tensors go through the backend's `load_weights`, the
path of full updates: swapped in between batches, all at once, one new `weight_version`.

Everything is checked from the header before a byte of data is read, and refused with a 400 that
changes nothing: a name that is not `<a linear weight of the model minus .weight>.lora_A|B.weight`,
a factor without its pair, a rank other than the metadata's `r`, or shapes that do not multiply to
the layer's. `expect_version` and a target `version` give the same 409s as a full update. The vLLM backend takes adapter
pushes too: its `load_weights` takes any named subset of the state dict, and the merged tensors are one.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from assay.policy_server.backends import ParamSpec
from assay.policy_server.errors import InvalidRequest
from assay.policy_server.weights import DTYPES, Change, Entry, Update, WeightService, read_checked

FACTORS = (".lora_A.weight", ".lora_B.weight")
_SHOWN = 5  # names listed in one refusal


@dataclass(frozen=True)
class Adapter:
    """A checked adapter header: what each factor pair adapts, and the scale of B @ A."""

    targets: dict[str, str]  # weight name -> the factors' common prefix (the layer's module name)
    scale: float  # lora_alpha / r
    fan_in_fan_out: bool


def plan(raw: bytes, entries: list[Entry], specs: Mapping[str, ParamSpec]) -> Adapter:
    """Check an adapter's header against the served model; ValueError names what is wrong."""
    alpha, r, fan_in_fan_out = _metadata(raw)
    factors: dict[str, dict[str, tuple[int, ...]]] = {}
    strays = []
    for e in entries:
        suffix = next((s for s in FACTORS if e.name.endswith(s)), None)
        prefix = e.name.removesuffix(suffix) if suffix else ""
        spec = specs.get(prefix + ".weight")
        if suffix is None or spec is None or len(spec.shape) != 2 or not DTYPES[e.dtype].startswith(("float", "bf")):
            strays.append(e.name)
        else:
            factors.setdefault(prefix, {})[suffix] = e.shape
    if strays:
        raise ValueError(
            f"{len(strays)} tensor(s) that are not floating-point LoRA factors (<module>.lora_A.weight, "
            f"<module>.lora_B.weight) of a linear weight of the model: {', '.join(strays[:_SHOWN])}"
            f"{' ...' if len(strays) > _SHOWN else ''}"
        )
    wrong = []
    for prefix, pair in factors.items():
        out, inp = specs[prefix + ".weight"].shape
        if fan_in_fan_out:
            out, inp = inp, out
        a, b = pair.get(FACTORS[0]), pair.get(FACTORS[1])
        if a is None or b is None:
            wrong.append(f"{prefix} has lora_{'B' if a is None else 'A'} without lora_{'A' if a is None else 'B'}")
        elif a != (r, inp) or b != (out, r):
            wrong.append(f"{prefix}: A is {list(a)} and B {list(b)}, the layer needs A [{r}, {inp}] and B [{out}, {r}]")
    if wrong:
        raise ValueError(
            f"{len(wrong)} layer(s) whose factors do not fit (r = {r}): {'; '.join(wrong[:_SHOWN])}"
            f"{' ...' if len(wrong) > _SHOWN else ''}"
        )
    return Adapter({p + ".weight": p for p in factors}, alpha / r, fan_in_fan_out)


def _metadata(raw: bytes) -> tuple[float, int, bool]:
    """(lora_alpha, r, fan_in_fan_out) from the header's `__metadata__` (safetensors: string values)."""
    meta = json.loads(raw).get("__metadata__") or {}
    try:
        alpha, r = float(meta["lora_alpha"]), int(meta["r"])
        fan_in_fan_out = {"true": True, "false": False}[str(meta.get("fan_in_fan_out", "false")).lower()]
        if not (alpha > 0 and r > 0):
            raise ValueError
    except (KeyError, ValueError, TypeError):
        raise ValueError(
            "the adapter's safetensors __metadata__ must carry lora_alpha (> 0) and r (an integer > 0), and "
            f"fan_in_fan_out may be true or false; it has {meta!r}"
        ) from None
    return alpha, r, fan_in_fan_out


def merge(adapter: Adapter, factors: Mapping[str, Any], bases: Mapping[str, Any]) -> dict[str, Any]:
    """The weights to serve: every weight in `bases` with this adapter's delta (none where it adapts
    nothing), in the base's dtype. The delta is peft's own, `(B @ A) * scale`, computed in float32,
    so a float32 model gets exactly the weights `merge_and_unload` gives the trainer."""
    import torch

    merged = {}
    with torch.no_grad():
        for name, base in bases.items():
            prefix = adapter.targets.get(name)
            if prefix is None:
                merged[name] = base
                continue
            delta = (factors[prefix + FACTORS[1]].float() @ factors[prefix + FACTORS[0]].float()) * adapter.scale
            merged[name] = (base.float() + (delta.T if adapter.fan_in_fan_out else delta)).to(base.dtype)
    return merged


class AdapterService:
    """Adapter pushes over a `WeightService`: its locks, versions, bases and swap."""

    def __init__(self, weights: WeightService) -> None:
        self.weights = weights

    async def from_stream(
        self, model: str, chunks: AsyncIterator[bytes], expect_version: int | None, version: int | None = None
    ) -> Update:
        weights = self.weights
        backend = weights.service.backend(model)
        async with weights.lock(model):
            start = time.perf_counter()
            weights.check_version(model, backend, expect_version, version)
            specs = backend.parameter_specs()
            checked: list[Adapter] = []
            try:
                factors, size = await read_checked(
                    chunks, lambda raw, entries: checked.append(plan(raw, entries, specs))
                )
            except ValueError as exc:
                raise InvalidRequest(str(exc), code="invalid_adapter") from None
            (adapter,) = checked
            update = await self.apply(model, adapter, factors, size, start, version)
            await weights.published(Change(model, update.weight_version, factors, adapter))
            return update

    async def apply(
        self, model: str, adapter: Adapter, factors: Mapping[str, Any], size: int, start: float, version: int | None
    ) -> Update:
        """Merge a checked adapter into the model's bases and swap the result in as `version` (None:
        current + 1). The caller holds the model's lock."""
        weights = self.weights
        backend = weights.service.backend(model)
        bases = weights.bases.setdefault(model, {})
        missing = [name for name in adapter.targets if name not in bases]
        bases.update(await asyncio.to_thread(backend.read_weights, missing))
        tensors = await asyncio.to_thread(merge, adapter, factors, bases)
        return await weights.apply(model, backend, tensors, size, start, merged=True, version=version)
