"""Weight updates: safetensors in, checked against the served model, swapped in whole, versioned.

Two ways in, both admin-scoped, neither touching pickle:

- `POST /v1/admin/weights?model=NAME`, the body a safetensors file (a full state dict or any named
  subset), streamed. The header (8-byte length, then JSON) is read and checked first: every name
  must be one of the model's tensors, with its shape and dtype, and the data offsets must tile the
  data exactly as the format requires. A float tensor may differ from its parameter in width
  (float32 into a bfloat16 model, or the reverse): it is cast to the parameter's dtype as it is
  copied in, and lands on the model's device (`copy_` does both). Integer and bool tensors must
  match their parameter's dtype exactly, and no float goes into one of them. Only then is the data
  read, straight into one buffer of the size the header announced: a body that is too short, too
  long or announces tensors the model does not have is refused before a byte of it lands in a
  parameter. The header is parsed
  here rather than by the `safetensors` package because that package needs the whole file in
  memory first, and a refusal should not wait for gigabytes.
- `POST /v1/admin/weights/load {"model", "path"}`: safetensors files on the server's own disk (a
  file, or a checkpoint directory's `*.safetensors`), confined to the directories the operator
  names with `--weights-dir` (none: the route answers 403); `weight_paths` says how. Every path
  refused gets the same 400, whatever the reason; the real one goes to the server log. A file that
  passes is read like an upload, not with the `safetensors` package (whose open blocks on a FIFO
  and holds the GIL meanwhile, freezing the server): the header is checked against the file's size
  and the model before the data is read, so a truncated file, or one that is not safetensors, is a
  400 naming the problem. All of it runs on a worker thread: the event loop never touches the disk
  for this route. There is no timeout on it: a regular file's read always progresses, a thread
  cannot be stopped anyway, and the caller's deadline bounds its own wait.

`WeightService.apply` then hands the tensors to the backend, which swaps them in between batches
(`GenerationBackend.load_weights`) and bumps the model's `weight_version`. Updates of one model
are serialised; `expect_version` turns a lost race between two trainers into a 409, not a
silent overwrite.

A push may name the version it makes (`version=V`): the model then serves it as V rather than
current + 1, and V must be above the current version (else 409 `version_conflict`, whose message
says the current one; at V already means a push of V landed). Target versions let several replicas
serve one update under one number, and let a replica that restarted at 0 take V directly. Under Ray
Serve, `WeightService.publish` is the hook through which every other replica applies the same
`Change` (`assay.deploy.weight_sync`); without it an update is this server's alone.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from assay.policy_server.backends import GenerationBackend, ParamSpec
from assay.policy_server.errors import Conflict, InvalidRequest, PermissionDenied
from assay.policy_server.serving import PolicyService
from assay.policy_server.weight_paths import SUFFIX, PathRefused, locate, open_regular

log = logging.getLogger("policy_server")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors package's own cap on the JSON header
# safetensors dtype codes -> torch dtype names (ParamSpec.dtype)
DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
# A float tensor may update a float parameter of another width: it is cast to the parameter's dtype
# (a float32 trainer pushing into a bf16 server). An integer or bool tensor must match exactly.
FLOATS = frozenset({"float64", "float32", "float16", "bfloat16"})
ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_SHOWN = 5  # problems listed in one refusal
# One answer for every path refused, whatever the reason: it must not tell what exists on the disk.
PATH_REFUSED = (
    "refused: `path` must name a regular .safetensors file, or a directory holding some, inside a "
    "directory this server loads weights from (its --weights-dir), relative to it; the server log "
    "says why this one was refused"
)
NO_WEIGHTS_DIR = (
    "loading weights from the server's disk is off: the operator must start the server with "
    "--weights-dir DIR (repeatable) to allow it; POST /v1/admin/weights takes them uploaded"
)


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors header."""

    name: str
    dtype: str  # safetensors code, e.g. "F32"
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Change:
    """An applied update as another replica applies it: the tensors as read (a state dict subset, or
    an adapter's factors with its checked header, `adapters.Adapter`), under the version it made."""

    model: str
    version: int
    tensors: dict[str, Any]
    adapter: Any = None  # adapters.Adapter for an adapter push (adapters imports this module)


Publish = Callable[[Change], Awaitable[None]]


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
            raise ValueError(
                f"tensor {e.name!r}: data offsets [{e.begin}, {e.end}) do not follow the previous "
                f"tensor (ends at {at}) or do not fit {e.dtype}{list(e.shape)}"
            )
        at = e.end
    return entries


def check(entries: list[Entry] | list[tuple[str, str, tuple[int, ...]]], specs: Mapping[str, ParamSpec]) -> None:
    """Refuse (ValueError, naming up to five) names the model lacks, and wrong shapes or dtypes (a
    float tensor of another float dtype is not wrong: it is cast, see the module docstring).

    `entries`: header entries, or (name, torch dtype name, shape) triples."""
    unknown, wrong = [], []
    for e in entries:
        name, dtype, shape = (e.name, DTYPES[e.dtype], e.shape) if isinstance(e, Entry) else e
        spec = specs.get(name)
        if spec is None:
            unknown.append(name)
        elif tuple(shape) != spec.shape or not (dtype == spec.dtype or {dtype, spec.dtype} <= FLOATS):
            wrong.append(f"{name} is {dtype}{list(shape)}, the model's is {spec.dtype}{list(spec.shape)}")
    problems = []
    if unknown:
        near = ", ".join(list(specs)[:3])
        problems.append(
            f"{len(unknown)} tensor name(s) the model does not have: {', '.join(unknown[:_SHOWN])}"
            f"{' ...' if len(unknown) > _SHOWN else ''} (its names look like {near})"
        )
    if wrong:
        problems.append(
            f"{len(wrong)} tensor(s) of the wrong shape or dtype: {'; '.join(wrong[:_SHOWN])}"
            f"{' ...' if len(wrong) > _SHOWN else ''}"
        )
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
    return await read_checked(chunks, lambda raw, entries: check(entries, specs))


async def read_checked(
    chunks: AsyncIterator[bytes], check_header: Callable[[bytes, list[Entry]], None]
) -> tuple[dict[str, Any], int]:
    """A streamed safetensors body -> (name -> tensor, bytes read); `check_header(raw JSON header,
    entries)` refuses it (ValueError) before the data is read."""
    reader = _Reader(chunks)
    (size,) = struct.unpack("<Q", await reader.read(8, "header length"))
    if size > MAX_HEADER_BYTES:
        raise ValueError(
            f"the safetensors header claims {size} bytes, more than {MAX_HEADER_BYTES}: not a safetensors file?"
        )
    raw = await reader.read(size, "header")
    entries = parse_header(raw)
    check_header(raw, entries)
    data = bytearray(entries[-1].end)
    await reader.read_into(memoryview(data), "tensor data")
    if not await reader.at_end():
        raise ValueError(f"the body goes on after the {len(data)} bytes of tensor data its header announces")
    return _tensors(entries, data), reader.total


def _tensors(entries: list[Entry], data: bytearray) -> dict[str, Any]:
    """Views into `data`, the tensor data that `entries` describe (no copy)."""
    import torch

    tensors = {}
    for e in entries:
        dtype = getattr(torch, DTYPES[e.dtype])
        count = (e.end - e.begin) // ITEM_BYTES[e.dtype]
        flat = (
            torch.frombuffer(data, dtype=dtype, count=count, offset=e.begin) if count else torch.empty(0, dtype=dtype)
        )
        tensors[e.name] = flat.reshape(e.shape)
    return tensors


# --- the server's disk ---------------------------------------------------------------------------


def _read_exactly(file: Any, buffer: memoryview, what: str) -> None:
    filled = 0
    while filled < len(buffer):
        got = file.readinto(buffer[filled:])
        if not got:
            raise ValueError(f"{what} ended after {filled} of {len(buffer)} bytes: truncated while being read?")
        filled += got


def _header(file: Any, size: int, shown: str) -> list[Entry]:
    """The checked header of one open safetensors file of `size` bytes; ValueError says what is wrong."""
    if size < 8:
        raise ValueError(f"{shown} is {size} bytes: too short to be a safetensors file")
    length = bytearray(8)
    _read_exactly(file, memoryview(length), shown)
    (n,) = struct.unpack("<Q", length)
    if n > min(MAX_HEADER_BYTES, size - 8):
        raise ValueError(f"{shown}: its header claims {n} bytes, and the file is {size}: not a safetensors file?")
    raw = bytearray(n)
    _read_exactly(file, memoryview(raw), shown)
    entries = parse_header(bytes(raw))
    if 8 + n + entries[-1].end != size:
        raise ValueError(
            f"{shown} is {size} bytes, its header announces {8 + n + entries[-1].end}: "
            "truncated, or not a safetensors file"
        )
    return entries


def read_files(roots: Sequence[Path], requested: str, specs: Mapping[str, ParamSpec]) -> tuple[dict[str, Any], int]:
    """The safetensors `requested` under `roots` -> (name -> tensor, bytes), every header checked
    against the files' sizes and the model before any data is read. Blocking: run it on a thread.

    PathRefused: the path is not allowed (say only PATH_REFUSED to the client); ValueError: the
    files are not weights this model can take (the message names the problem)."""
    files = locate(roots, requested)
    if len(files) > len(specs):  # each file holds at least one of the model's tensors, once
        raise ValueError(f"{requested} holds {len(files)} {SUFFIX} files, more than the model's {len(specs)} tensors")
    with ExitStack() as stack:
        opened = []
        for found in files:
            try:
                file, size = open_regular(found)
            except OSError as exc:
                raise PathRefused(f"{found.path} cannot be opened: {exc}") from None
            stack.enter_context(file)
            shown = requested if len(files) == 1 else f"{requested.rstrip('/')}/{found.name}"
            opened.append((file, shown, _header(file, size, shown)))
        declared = [e for _, _, entries in opened for e in entries]
        twice = sorted(name for name, count in Counter(e.name for e in declared).items() if count > 1)
        if twice:
            raise ValueError(f"tensors in more than one file: {', '.join(twice[:_SHOWN])}")
        check(declared, specs)
        tensors, total = {}, 0
        for file, shown, entries in opened:
            data = bytearray(entries[-1].end)
            _read_exactly(file, memoryview(data), shown)
            tensors.update(_tensors(entries, data))
            total += len(data)
    return tensors, total


# --- applying ----------------------------------------------------------------------------------


class WeightService:
    """Admin weight updates over a `PolicyService`'s backends (LoRA adapters: `adapters.AdapterService`)."""

    def __init__(self, service: PolicyService, roots: Sequence[Path] = ()) -> None:
        self.service = service
        self.roots = tuple(roots)  # resolved (`weight_roots`); none: loading from disk is off
        self._locks: dict[str, asyncio.Lock] = {}
        # model -> name -> the weight adapters are merged into, as of start-up or the last update that
        # sent it (copied at the first adapter push that targets it; an update of that name drops it)
        self.bases: dict[str, dict[str, Any]] = {}
        # Called with every update this server applied from a request, under the model's lock, before
        # the request is answered: an error it raises is the answer (deploy/weight_sync.py, Ray Serve).
        self.publish: Publish | None = None

    async def from_stream(
        self, model: str, chunks: AsyncIterator[bytes], expect_version: int | None, version: int | None = None
    ) -> Update:
        backend = self.service.backend(model)
        async with self.lock(model):
            start = time.perf_counter()
            self.check_version(model, backend, expect_version, version)
            try:
                tensors, size = await read_stream(chunks, backend.parameter_specs())
            except ValueError as exc:
                raise InvalidRequest(str(exc), code="invalid_weights") from None
            update = await self.apply(model, backend, tensors, size, start, version=version)
            await self.published(Change(model, update.weight_version, tensors))
            return update

    async def from_path(self, model: str, path: str, expect_version: int | None, version: int | None = None) -> Update:
        if not self.roots:
            raise PermissionDenied(NO_WEIGHTS_DIR, code="weights_dir_not_configured")
        backend = self.service.backend(model)
        async with self.lock(model):
            start = time.perf_counter()
            self.check_version(model, backend, expect_version, version)
            try:  # on a thread, all of it: resolving, checking and reading never block the event loop
                tensors, size = await asyncio.to_thread(read_files, self.roots, path, backend.parameter_specs())
            except PathRefused as exc:
                log.info("weights load of %r refused: %s", path, exc)
                raise InvalidRequest(PATH_REFUSED, param="path", code="weights_path_refused") from None
            except (ValueError, OSError) as exc:  # a readable file that is not weights for this model
                log.info("weights load of %r refused: %s", path, exc)
                message = exc if isinstance(exc, ValueError) else f"{path} could not be read"
                raise InvalidRequest(
                    f"refused, the weights are unchanged: {message}", param="path", code="invalid_weights"
                ) from None
            update = await self.apply(model, backend, tensors, size, start, version=version)
            await self.published(Change(model, update.weight_version, tensors))
            return update

    def lock(self, model: str) -> asyncio.Lock:
        return self._locks.setdefault(model, asyncio.Lock())

    async def published(self, change: Change) -> None:
        if self.publish is not None:
            await self.publish(change)

    @staticmethod
    def check_version(
        model: str, backend: GenerationBackend, expect_version: int | None, version: int | None = None
    ) -> None:
        """Refuse (409) an update made against another version than `expect_version`, or one whose
        target `version` is not above the version serving now."""
        current = backend.weight_version
        if expect_version is not None and expect_version != current:
            raise Conflict(
                f"model {model!r} is at weight_version {current}, not the expected "
                f"{expect_version}: another update landed first",
                code="version_mismatch",
            )
        if version is not None and version <= current:
            landed = " (a push of this version landed)" if version == current else ""
            raise Conflict(
                f"model {model!r} is at weight_version {current}{landed}: the target version must be above it, "
                f"and {version} is not",
                param="version",
                code="version_conflict",
            )

    async def apply(
        self,
        model: str,
        backend: GenerationBackend,
        tensors: dict,
        size: int,
        start: float,
        merged: bool = False,
        version: int | None = None,
    ) -> Update:
        """Swap `tensors` in as `version` (None: current + 1); unless they are an adapter `merged` into
        the bases, they are the new bases."""
        previous = backend.weight_version
        try:
            version = await backend.load_weights(tensors, version)
        except ValueError as exc:  # a backend's own refusal (e.g. tied tensors given different values)
            raise InvalidRequest(f"refused, the weights are unchanged: {exc}", code="invalid_weights") from None
        if not merged:
            bases = self.bases.get(model, {})
            for name in tensors:
                bases.pop(name, None)
        seconds = time.perf_counter() - start
        self.service.metrics.on_weights(model, version, size, seconds)
        return Update(model, previous, version, len(tensors), size, seconds)
