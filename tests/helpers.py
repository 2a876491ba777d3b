"""Helpers the tests share: waiting for a server or a condition, an event loop on a thread for the
async servers that synchronous tests drive, and torch's thread count.

A port to bind comes from `assay.services.free_port`, as the product picks its own; fixtures live
in tests/conftest.py.
"""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import httpx


def wait_ready(proc: subprocess.Popen, url: str, timeout_s: float = 300, log: Path | None = None) -> None:
    """Poll `url`/ready until it answers 200; fail with the process's output (its pipe, or the tail
    of `log` where it writes to a file) if it exits first or is not ready within `timeout_s`.
    The default is generous: a server loading its models on a busy 2-core machine takes minutes."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, f"the server exited while starting:\n{_output(proc, log)}"
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"the server was not ready within {timeout_s:g} s:\n{_output(proc, log)}"
        time.sleep(0.2)


def _output(proc: subprocess.Popen, log: Path | None) -> str:
    if log is not None:
        return log.read_text(errors="replace")[-3000:]
    if proc.stdout is not None and proc.poll() is not None:  # reading a live process's pipe would block
        return proc.stdout.read()
    return "(output not captured)"


def wait_for(
    condition: Callable[[], object], timeout_s: float, what: str = "condition not reached", every_s: float = 0.05
) -> None:
    """Call `condition` every `every_s` until it is true; fail saying `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(every_s)


class LoopThread:
    """An asyncio event loop running on a thread of its own, for the length of a `with` block."""

    def __enter__(self) -> LoopThread:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        return self

    def run(self, coro: Coroutine[Any, Any, Any], timeout_s: float = 10) -> Any:
        """Run `coro` on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@contextmanager
def grpc_served(loop: LoopThread, start: Coroutine[Any, Any, tuple[Any, int]]) -> Iterator[grpc.Channel]:
    """A channel to the grpc.aio server that `start` starts on `loop` (it answers the server and its
    port: a service's `start_grpc_server(...)`); the server is stopped after the block."""
    server, port = loop.run(start)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        loop.run(server.stop(None))


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to `n` for the block, and restored after it."""
    import torch  # here, not at the top: the helpers serve the torch-free client tests too

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tiny_llama_config(tokenizer, **kw: Any):
    """A 2-layer, 32-wide Llama config over `tokenizer` with one label: a model the tests train in seconds."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=1,
        **kw,
    )


def tensorboard_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in a run directory's TensorBoard event files: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))  # a directory: every event file in it, in order
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def same_scalars(got: list[tuple[int, float]], logged: list[tuple[int, float]]) -> bool:
    """The same steps and, to float32's precision (what TensorBoard keeps), the same values."""
    import pytest

    steps, values = [s for s, _ in logged], [v for _, v in logged]
    return [s for s, _ in got] == steps and [v for _, v in got] == pytest.approx(values, rel=1e-6)


@contextmanager
def one_device_per_op() -> Iterator[None]:
    """Fail any torch operation in the block whose tensor arguments lie on two devices, naming the
    operation: what CUDA raises for a tensor left on the CPU, checked here with the model on `meta`
    (whose kernels do not check devices themselves). A 0-dim CPU tensor mixes freely, as torch allows
    on every device; creating tensors on the CPU and copying them over (`.to(device)`) is fine."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class OneDevice(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            devices = {
                t.device
                for t in tree_leaves((args, kwargs))
                if isinstance(t, torch.Tensor) and not (t.device.type == "cpu" and t.dim() == 0)
            }
            assert len(devices) <= 1, f"{func} mixes devices: {sorted(map(str, devices))}"
            return func(*args, **kwargs)

    with OneDevice():
        yield
