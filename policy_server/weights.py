"""Weight updates: safetensors in, checked against the served model, swapped in whole, versioned.

Two ways in, both admin-scoped, neither touching pickle:

- `POST /v1/admin/weights?model=NAME`, the body a safetensors file (a full state dict or any named
  subset), streamed. The header (8-byte length, then JSON) is read and checked first: every name
  must be one of the model's tensors, with its shape and dtype, and the data offsets must tile the
  data exactly as the format requires. Only then is the data read, straight into one buffer of
  the size the header announced: a body that is too short, too long or announces tensors the
  model does not have is refused before a byte of it lands in a parameter. The header is parsed
  here rather than by the `safetensors` package because that package needs the whole file in
  memory first, and a refusal should not wait for gigabytes.
- `POST /v1/admin/weights/load {"model", "path"}`: safetensors files on the server's own disk (a
  file, or a checkpoint directory's `*.safetensors`), read with `safetensors.safe_open`.

`WeightService.apply` then hands the tensors to the backend, which swaps them in between batches
(`GenerationBackend.load_weights`) and bumps the model's `weight_version`. Updates of one model
are serialised; `expect_version` turns a lost race between two trainers into a 409, not a
silent overwrite.
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from policy_server.backends import GenerationBackend, ParamSpec
from policy_server.serving import Conflict, InvalidRequest, PolicyService

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors package's own cap on the JSON header
# safetensors dtype codes -> torch dtype names (ParamSpec.dtype)
DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}  # fmt: skip
ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_SHOWN = 5  # problems listed in one refusal


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors header."""

    name: str
    dtype: str  # safetensors code, e.g. "F32"
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Update:
    """What one applied update did."""

    model: str
    previous_version: int
    weight_version: int
    tensors: int
    bytes: int
    seconds: float  # from the first byte read to the new version serving


# --- the header -------------------------------------------------------------------------------


def parse_header(raw: bytes) -> list[Entry]:
    """The JSON header of a safetensors file as entries, in data order; ValueError says what is wrong."""
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"the safetensors header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ValueError("the safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    entries = []
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            if dtype not in ITEM_BYTES or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise ValueError
            if not (isinstance(begin, int) and isinstance(end, int)):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"tensor {name!r} has a malformed header entry: {info!r}") from None
        entries.append(Entry(name, dtype, shape, begin, end))
    if not entries:
        raise ValueError("the safetensors file holds no tensors")
    entries.sort(key=lambda e: (e.begin, e.end))
    at = 0
    for e in entries:  # the format: tensors tile the data, in order, no gaps, no overlaps
        numel = 1
        for d in e.shape:
            numel *= d
        if e.begin != at or e.end - e.begin != numel * ITEM_BYTES[e.dtype]:
            raise ValueError(f"tensor {e.name!r}: data offsets [{e.begin}, {e.end}) do not follow the previous "
                             f"tensor (ends at {at}) or do not fit {e.dtype}{list(e.shape)}")  # fmt: skip
        at = e.end
    return entries


def check(entries: list[Entry] | list[tuple[str, str, tuple[int, ...]]], specs: Mapping[str, ParamSpec]) -> None:
    """Refuse (ValueError, naming up to five) names the model lacks, and wrong shapes or dtypes.

    `entries`: header entries, or (name, torch dtype name, shape) triples."""
    unknown, wrong = [], []
    for e in entries:
        name, dtype, shape = (e.name, DTYPES[e.dtype], e.shape) if isinstance(e, Entry) else e
        spec = specs.get(name)
        if spec is None:
            unknown.append(name)
        elif tuple(shape) != spec.shape or dtype != spec.dtype:
            wrong.append(f"{name} is {dtype}{list(shape)}, the model's is {spec.dtype}{list(spec.shape)}")
    problems = []
    if unknown:
        near = ", ".join(list(specs)[:3])
        problems.append(f"{len(unknown)} tensor name(s) the model does not have: {', '.join(unknown[:_SHOWN])}"
                        f"{' ...' if len(unknown) > _SHOWN else ''} (its names look like {near})")  # fmt: skip
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) of the wrong shape or dtype: {'; '.join(wrong[:_SHOWN])}"
                        f"{' ...' if len(wrong) > _SHOWN else ''}")  # fmt: skip
    if problems:
        raise ValueError("refused, the weights are unchanged: " + "; ".join(problems))


# --- reading -----------------------------------------------------------------------------------


class _Reader:
    """Exact-size reads from an async stream of byte chunks."""

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self.chunks, self.pending, self.total = chunks, b"", 0

    async def read_into(self, buffer: memoryview, what: str) -> None:
        filled = 0
        while filled < len(buffer):
            if not self.pending:
                self.pending = await anext(self.chunks, b"")
                if not self.pending:
                    raise ValueError(f"the body ended inside the {what}: {filled} of {len(buffer)} bytes")
            take = min(len(self.pending), len(buffer) - filled)
            buffer[filled : filled + take] = self.pending[:take]
            self.pending, filled = self.pending[take:], filled + take
        self.total += filled

    async def read(self, size: int, what: str) -> bytes:
        out = bytearray(size)
        await self.read_into(memoryview(out), what)
        return bytes(out)

    async def at_end(self) -> bool:
        while not self.pending:
            self.pending = await anext(self.chunks, b"")
            if not self.pending:
                return True
        return False


async def read_stream(chunks: AsyncIterator[bytes], specs: Mapping[str, ParamSpec]) -> tuple[dict[str, Any], int]:
    """A streamed safetensors body -> (name -> tensor, bytes read), checked before the data is read."""
    import torch

    reader = _Reader(chunks)
    (size,) = struct.unpack("<Q", await reader.read(8, "header length"))
    if size > MAX_HEADER_BYTES:
        raise ValueError(f"the safetensors header claims {size} bytes, more than {MAX_HEADER_BYTES}: not a safetensors file?")
    entries = parse_header(await reader.read(size, "header"))
    check(entries, specs)
    data = bytearray(entries[-1].end)
    await reader.read_into(memoryview(data), "tensor data")
    if not await reader.at_end():
        raise ValueError(f"the body goes on after the {len(data)} bytes of tensor data its header announces")
    tensors = {}
    for e in entries:
        dtype = getattr(torch, DTYPES[e.dtype])
        count = (e.end - e.begin) // ITEM_BYTES[e.dtype]
        flat = torch.frombuffer(data, dtype=dtype, count=count, offset=e.begin) if count else torch.empty(0, dtype=dtype)
        tensors[e.name] = flat.reshape(e.shape)
    return tensors, reader.total


def safetensors_files(path: Path) -> list[Path]:
    """A .safetensors file, or every one in a checkpoint directory (sharded checkpoints included)."""
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if files:
            return files
        raise ValueError(f"{path} holds no .safetensors file")
    raise ValueError(f"{path} does not exist on the server")


def read_files(path: Path, specs: Mapping[str, ParamSpec]) -> tuple[dict[str, Any], int]:
    """Safetensors files on this machine's disk -> (name -> tensor, bytes), checked before loading."""
    from safetensors import SafetensorError, safe_open

    files = safetensors_files(path)
    try:
        handles = [safe_open(str(f), framework="pt") for f in files]
        declared = []
        for h in handles:
            for name in h.keys():
                piece = h.get_slice(name)
                declared.append((name, DTYPES.get(piece.get_dtype(), piece.get_dtype()), tuple(piece.get_shape())))
        check(declared, specs)
        tensors = {name: h.get_tensor(name) for h in handles for name in h.keys()}
    except SafetensorError as exc:
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from None
    return tensors, sum(t.numel() * t.element_size() for t in tensors.values())


# --- applying ----------------------------------------------------------------------------------


class WeightService:
    """Admin weight updates over a `PolicyService`'s backends."""

    def __init__(self, service: PolicyService) -> None:
        self.service = service
        self._locks: dict[str, asyncio.Lock] = {}

    async def from_stream(self, model: str, chunks: AsyncIterator[bytes], expect_version: int | None) -> Update:
        backend = self.service.backend(model)
        async with self._lock(model):
            start = time.perf_counter()
            self._check_version(model, backend, expect_version)
            try:
                tensors, size = await read_stream(chunks, backend.parameter_specs())
            except ValueError as exc:
                raise InvalidRequest(str(exc), code="invalid_weights") from None
            return await self._apply(model, backend, tensors, size, start)

    async def from_path(self, model: str, path: str, expect_version: int | None) -> Update:
        backend = self.service.backend(model)
        async with self._lock(model):
            start = time.perf_counter()
            self._check_version(model, backend, expect_version)
            try:
                tensors, size = await asyncio.to_thread(read_files, Path(path), backend.parameter_specs())
            except ValueError as exc:
                raise InvalidRequest(str(exc), param="path", code="invalid_weights") from None
            return await self._apply(model, backend, tensors, size, start)

    def _lock(self, model: str) -> asyncio.Lock:
        return self._locks.setdefault(model, asyncio.Lock())

    @staticmethod
    def _check_version(model: str, backend: GenerationBackend, expect_version: int | None) -> None:
        if expect_version is not None and expect_version != backend.weight_version:
            raise Conflict(f"model {model!r} is at weight_version {backend.weight_version}, not the expected "
                           f"{expect_version}: another update landed first", code="version_mismatch")  # fmt: skip

    async def _apply(self, model: str, backend: GenerationBackend, tensors: dict, size: int, start: float) -> Update:
        previous = backend.weight_version
        try:
            version = await backend.load_weights(tensors)
        except ValueError as exc:  # a backend's own refusal (e.g. tied tensors given different values)
            raise InvalidRequest(f"refused, the weights are unchanged: {exc}", code="invalid_weights") from None
        seconds = time.perf_counter() - start
        self.service.metrics.on_weights(model, version, size, seconds)
        return Update(model, previous, version, len(tensors), size, seconds)
