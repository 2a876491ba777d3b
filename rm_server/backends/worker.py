"""A model reward's forward passes in a worker process of its own.

In the server process the forward pass shares one GIL with the event loop: a small model's
forward is mostly Python (the module calls around each kernel), and every request the loop
parses, tokenizes and answers waits for it, and it for them. `WorkerBackend` is a
`ScoringBackend` whose `pooled` and `per_token` send token ids to a process that holds the
model, so the server's process keeps the network, the batcher and the tokenizer, and the
worker's holds nothing but the model and its torch threads (`torch_threads`).

What crosses the pipe is bytes the two sides write themselves; nothing is pickled after the
process starts (its start arguments are the spec's own values):

    server -> worker   b"P" | b"T", 7 pad bytes, n (uint64), lengths (int64 [n]), ids (int64 [sum]):
                       a batch, pooled or per token
    worker -> server   b"R" + JSON {"num_labels", "max_positions", "torch_threads", "pid"}: loaded
                       b"K", 7 pad bytes, float32 logits: [n, labels] pooled, [sum(lengths), labels] per token
                       b"E" + JSON {"type", "message", "fields"}: the load or the call failed (the worker
                       goes on); `OutOfMemory` is raised again with its fields, as the reward reads them

Lifetime. `start` blocks until the model is loaded (a load error is raised here, as the in-process
backend raises it). A supervisor thread waits on the process; if it exits unasked (killed,
out of memory, a crash in native code), the batch it was running fails with `WorkerDied` (its
items fail `internal`: the batch may be what killed it, so it is not run again), `ready` is false
(the reward answers 503 with Retry-After, `/ready` is 503), and a new worker is started, again
and again with a growing pause while loading fails; batches already queued wait for it. The worker exits when told
(`close`), when its pipe closes, or within a second of its parent's death (even by SIGKILL), so
a killed server leaves no process behind. It ignores SIGINT, which a terminal sends the whole
process group: the server stops it when it is done draining.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import signal
import struct
import threading
import time
from multiprocessing.connection import Connection, wait
from typing import Any

import numpy as np

from assay.base.logs import configure, log_format
from assay.checkpoints import CheckpointError, load_tokenizer
from assay.rm_server import forkserver
from assay.rm_server.backends import Kind, OutOfMemory, ScoringBackend

log = logging.getLogger(__name__)

POOLED, PER_TOKEN, LOADED, OK, FAILED = b"P", b"T", b"R", b"K", b"E"
HEADER = struct.Struct("<c7xQ")  # a batch's tag and size; 8-byte aligned, as what follows it
PAD = bytes(7)  # after a reply's tag, so the logits start 8-byte aligned
CLOSE_S = 10.0  # a worker told to stop has this long before it is killed
RESTART_PAUSES_S = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)  # between failed restarts; the last repeats
RESTART_WAIT_S = 30.0  # a batch waits this long for a restarting worker before it fails
# Exceptions of the worker raised again as themselves in the server (a load's refusal reads the
# same either way); any other type becomes a WorkerError naming it.
_SAME_TYPE: dict[str, type[Exception]] = {
    "CheckpointError": CheckpointError,
    "ValueError": ValueError,
    "ImportError": ImportError,
}


class WorkerError(RuntimeError):
    """The worker raised an exception of a type not in `_SAME_TYPE` (its type and message say which)."""


class WorkerDied(RuntimeError):
    """The worker process exited while a batch ran, or before one could be sent."""


# --- in the worker ---------------------------------------------------------------------------


def _exit_with_parent() -> None:
    """A thread that ends this process when its parent (the forkserver, which exits with the
    server) is gone, whatever the process is doing."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def _failure(exc: BaseException) -> bytes:
    fields = [exc.device, exc.items, exc.tokens] if isinstance(exc, OutOfMemory) else None
    return FAILED + json.dumps({"type": type(exc).__name__, "message": str(exc), "fields": fields}).encode()


def _serve(
    conn: Connection, log_level: int, log_format: str, name: str, path: str, kind: Kind, threads: int, options: dict
) -> None:
    """The worker's main: load the model, then answer batches until told to stop or orphaned."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_parent()
    # What the backend logs (the model's size, ...) goes where the server's log goes, at its level, in its format.
    configure(log_level, log_format, tag="model worker")
    try:
        import torch

        torch.set_num_threads(threads)
        from assay.rm_server.backends import load_backend

        backend, _ = load_backend(name, path, kind, **options)
    except Exception as exc:  # noqa: BLE001 - any load failure is the server's to report
        conn.send_bytes(_failure(exc))
        return
    facts = {"num_labels": backend.num_labels, "max_positions": backend.max_positions}
    conn.send_bytes(
        LOADED + json.dumps(facts | {"torch_threads": torch.get_num_threads(), "pid": os.getpid()}).encode()
    )
    while True:
        try:
            request = conn.recv_bytes()
        except (EOFError, OSError):  # the server closed its end: stop
            break
        try:
            reply = OK + PAD + _run(backend, request)
        except Exception as exc:  # noqa: BLE001 - the batch fails, with its reason; the worker goes on
            reply = _failure(exc)
        try:
            conn.send_bytes(reply)
        except OSError:  # the server is gone
            break
    backend.close()


def _run(backend: ScoringBackend, request: bytes) -> bytes:
    """One batch: the request's token ids through the model, the logits as float32 bytes."""
    mode, n = HEADER.unpack_from(request)
    lengths = np.frombuffer(request, np.int64, n, HEADER.size)
    ids = np.frombuffer(request, np.int64, offset=HEADER.size + 8 * n).tolist()
    bounds = np.concatenate([[0], np.cumsum(lengths)]).tolist()
    batch = [ids[a:b] for a, b in itertools.pairwise(bounds)]
    out = backend.pooled(batch) if mode == POOLED else backend.per_token(batch)
    return np.concatenate([np.asarray(o, np.float32).reshape(-1) for o in out]).tobytes()


# --- in the server ---------------------------------------------------------------------------


class WorkerBackend(ScoringBackend):
    """`load_backend(name, path, kind, **options)` run in a worker process; this side keeps the tokenizer.

    `label` names the worker in logs and errors (the reward's name); `torch_threads`: the worker's
    intra-op threads."""

    def __init__(self, name: str, path, kind: Kind, *, label: str, torch_threads: int, **options: Any) -> None:
        self.tokenizer = load_tokenizer(path)  # what load_backend's backend would tokenize with
        self.label, self.torch_threads = label, torch_threads
        self._args = (name, str(path), kind, torch_threads, options)
        self._lock = threading.Lock()  # guards _proc and _conn, which a restart replaces
        self._up = threading.Event()  # a loaded worker is there to take batches
        self._closing = threading.Event()
        self._proc: Any = None  # multiprocessing's ForkServerProcess
        self._conn: Connection | None = None
        self.pid: int | None = None
        self.restarts = 0
        self._start()
        self._supervisor = threading.Thread(target=self._supervise, daemon=True, name=f"rm-worker-{label}")
        self._supervisor.start()

    @property
    def ready(self) -> bool:
        """Whether a loaded worker takes batches (false while one restarts)."""
        return self._up.is_set()

    def pooled(self, batch: list[list[int]]) -> list[np.ndarray]:
        return list(self._call(POOLED, batch).reshape(len(batch), -1))

    def per_token(self, batch: list[list[int]]) -> list[np.ndarray]:
        rows = self._call(PER_TOKEN, batch).reshape(sum(map(len, batch)), -1)
        return np.split(rows, np.cumsum([len(ids) for ids in batch])[:-1])

    def close(self) -> None:
        """Tell the worker to stop, kill it if it does not within CLOSE_S; no restart after this."""
        self._closing.set()
        self._up.clear()
        with self._lock:
            proc, conn = self._proc, self._conn
        if conn is not None:
            try:
                conn.close()  # the worker reads end-of-file and returns
            except OSError:
                pass
        if proc is not None:
            proc.join(CLOSE_S)
            if proc.is_alive():
                proc.kill()
                proc.join()
        self._supervisor.join(CLOSE_S)

    # --- the process ---------------------------------------------------------------------

    def _start(self) -> None:
        """Start a worker and wait until it has loaded the model; raise what the load raised."""
        ctx = forkserver.context()
        ours, theirs = ctx.Pipe()
        name, path, kind, threads, options = self._args
        proc = ctx.Process(
            target=_serve,
            args=(theirs, logging.getLogger().getEffectiveLevel(), log_format(), name, path, kind, threads, options),
            name=f"rm-model-{self.label}",
            daemon=True,
        )
        with self._lock:
            if self._closing.is_set():
                raise WorkerDied(f"reward {self.label!r}: the service is closing")
            self._proc, self._conn = proc, ours
            proc.start()
        theirs.close()  # the worker holds the only other end: its exit is our end-of-file
        try:
            wait([ours, proc.sentinel])
            reply = ours.recv_bytes()
        except (EOFError, OSError):
            proc.join(CLOSE_S)
            raise WorkerDied(
                f"reward {self.label!r}: the model worker exited ({_how(proc.exitcode)}) while loading {path}"
            ) from None
        if reply[:1] == FAILED:
            proc.join(CLOSE_S)
            if proc.is_alive():
                proc.kill()
            raise _raised(json.loads(reply[1:]))
        facts = json.loads(reply[1:])
        self.num_labels, self.max_positions = facts["num_labels"], facts["max_positions"]
        self.torch_threads, self.pid = facts["torch_threads"], facts["pid"]
        self._up.set()

    def _supervise(self) -> None:
        """Wait on the worker; when it exits unasked, start another (with pauses while that fails)."""
        while not self._closing.is_set():
            with self._lock:
                proc = self._proc
            wait([proc.sentinel])
            if self._closing.is_set():
                return
            self._up.clear()
            log.error(
                "reward %r: its model worker (pid %s) exited, %s; starting another",
                self.label,
                proc.pid,
                _how(proc.exitcode),
            )
            for attempt in itertools.count():
                try:
                    self._start()
                    break
                except (WorkerDied, WorkerError, ValueError, ImportError, OSError) as exc:
                    pause = RESTART_PAUSES_S[min(attempt, len(RESTART_PAUSES_S) - 1)]
                    log.error("reward %r: a new model worker failed: %s; trying again in %g s", self.label, exc, pause)
                    if self._closing.wait(pause):
                        return
            self.restarts += 1
            log.warning("reward %r: model worker restarted (pid %s)", self.label, self.pid)

    def _wait_up(self) -> None:
        """Wait for a restarting worker: the batch did nothing wrong. Raise WorkerDied if no
        worker is up within RESTART_WAIT_S (loading keeps failing) or the backend closes."""
        deadline = time.monotonic() + RESTART_WAIT_S
        while not self._up.wait(0.1):
            if self._closing.is_set() or time.monotonic() > deadline:
                raise WorkerDied("its model worker is restarting and is not up yet")

    def _call(self, mode: bytes, batch: list[list[int]]) -> np.ndarray:
        """[rows * labels] float32 logits of one batch, from the worker."""
        self._wait_up()
        with self._lock:
            proc, conn = self._proc, self._conn
        assert conn is not None, "up"
        lengths = np.fromiter(map(len, batch), np.int64, len(batch))
        ids = np.fromiter(itertools.chain.from_iterable(batch), np.int64, int(lengths.sum()))
        try:
            conn.send_bytes(HEADER.pack(mode, len(batch)) + lengths.tobytes() + ids.tobytes())
            wait([conn, proc.sentinel])  # a reply, or the worker's exit (then the read below ends the file)
            reply = conn.recv_bytes()
        except (EOFError, OSError):
            proc.join(1.0)
            raise WorkerDied(
                f"its model worker exited ({_how(proc.exitcode)}) while scoring this batch; a new one is starting"
            ) from None
        if reply[:1] == FAILED:
            raise _raised(json.loads(reply[1:]))
        return np.frombuffer(reply, np.float32, offset=1 + len(PAD))


def _raised(failure: dict) -> Exception:
    """The worker's exception as the server raises it."""
    if failure["type"] == "OutOfMemory":  # retryable, with smaller batches: the reward says so
        return OutOfMemory(*failure["fields"])
    cls = _SAME_TYPE.get(failure["type"])
    return cls(failure["message"]) if cls else WorkerError(f"{failure['type']}: {failure['message']}")


def _how(exitcode: int | None) -> str:
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        return f"killed by {signal.Signals(-exitcode).name}"
    return f"exit status {exitcode}"
