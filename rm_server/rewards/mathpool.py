"""math-verify in a small pool of worker processes, shared by every math_equal reward.

math-verify enforces its timeouts with `signal.alarm`, which works only in a process's main
thread, while the service scores from an event loop in any thread. A pool task runs in its
worker's main thread, so math-verify's own timeouts work there. But an alarm reaches Python
code only: a worker stuck in C code runs on past it, and a task the caller gave up on would
still hold its worker. So work never outlives its request:

- one item is one task, and a task is handed to the pool only when a worker is free for it
  (`_gate`), so an item whose request gave up while it waited never starts;
- a running task is stopped at its request's deadline (`rewards.base.DEADLINE`) or when its
  caller is cancelled: pebble kills its worker process, whatever it is doing, and starts a
  fresh one (a second or two of warm-up, paid by nobody waiting);
- closing the pool kills the workers rather than waiting for them.

Workers also exit by themselves when the service process dies, so a killed server leaves
nothing behind.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from concurrent.futures.process import BrokenProcessPool
from itertools import product
from typing import Any

from pebble import ProcessExpired, ProcessPool

from assay.rm_server import forkserver
from assay.rm_server.protocol import ErrorType
from assay.rm_server.rewards.base import DEADLINE, ItemFailure, Outcome, Scored

POOL_WORKERS = 2  # sympy is CPU-bound, and the service's other rewards need cores too
CLOSE_S = 10.0  # closing waits this long at most for killed workers to be reaped

_pool: ProcessPool | None = None
_pool_users: set[int] = set()  # ids of the math_equal rewards using the pool; empty -> shut it
_pool_lock = threading.Lock()  # rewards may be scored from event loops in several threads
_running: dict[Future, ProcessPool] = {}  # tasks handed to a pool and not finished: failed when it closes
# One gate per event loop: at most POOL_WORKERS tasks handed to the pool from each loop.
_gates: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = weakref.WeakKeyDictionary()


class PoolClosed(Exception):
    """The pool was shut down while the task ran."""


# --- in the worker ---------------------------------------------------------------------------


def _warm_worker() -> None:
    # Importing sympy and building the LaTeX parser take a second or two: pay it up front.
    from math_verify import parse

    parse("$\\frac{1}{2}$")


def _init_worker() -> None:
    """Runs first in each worker: exit when the parent goes (even by SIGKILL), then warm up."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()
    _warm_worker()


def _parse(text: str, seconds: int, bare: bool) -> list:
    """math-verify's parse. A bare answer (a reference, an answer_pattern group) is read as LaTeX
    math first: the default extraction looks for numbers in prose and reads `2^{10}` as 2."""
    from math_verify import parse

    for attempt in [f"${text}$", text] if bare and "$" not in text else [text]:
        try:
            found = parse(attempt, parsing_timeout=seconds, raise_on_error=True)
        except Exception:  # noqa: BLE001 - any parser error means unparseable; its TimeoutException is a BaseException
            found = []
        if found:
            return found
    return []


@functools.lru_cache(maxsize=1024)
def _gold(reference: str, seconds: int) -> tuple:
    # The items of one prompt group share their reference: parse it once per worker.
    return tuple(_parse(reference, seconds, bare=True))


def _equal(gold: tuple, target: list, seconds: int) -> bool:
    from math_verify import verify

    # Pair by pair, as verify does over lists, but so that one pair sympy cannot compare is not
    # a verdict, while a timeout (raise_on_error) still reaches the caller.
    for g, t in product(gold, target):
        try:
            if verify(g, t, timeout_seconds=seconds, raise_on_error=True):
                return True
        except Exception:  # noqa: BLE001 - any error sympy raises on one pair: no verdict for that pair
            continue
    return False


def _verify(reference: str, answer: str, bare: bool, seconds: int) -> tuple[str, Any]:
    """Pool task: judge one answer against its reference, in a worker's main thread.

    Returns ("ok", 1.0 | 0.0), ("timeout", why) or ("invalid", why): plain tuples, since an
    ItemFailure does not survive pickling.
    """
    from math_verify.errors import TimeoutException

    try:
        gold = _gold(reference, seconds)
        if not gold:
            return "invalid", f"math-verify finds no answer in the reference {reference[:80]!r}"
        return "ok", 1.0 if _equal(gold, _parse(answer, seconds, bare), seconds) else 0.0
    except TimeoutException:
        return "timeout", f"math-verify did not finish within {seconds} s"


# --- in the service --------------------------------------------------------------------------


def _acquire_pool(user: int) -> ProcessPool:
    global _pool
    with _pool_lock:
        _pool_users.add(user)
        if _pool is None:
            # Workers fork from a single-threaded server that has math-verify and sympy imported
            # already (`rm_server.forkserver`), so a worker killed at a deadline is replaced in a
            # moment, not seconds.
            _pool = ProcessPool(POOL_WORKERS, initializer=_init_worker, context=forkserver.context())
        return _pool


def _gate() -> asyncio.Semaphore:
    loop = asyncio.get_running_loop()
    with _pool_lock:
        if loop not in _gates:
            _gates[loop] = asyncio.Semaphore(POOL_WORKERS)
        return _gates[loop]


def _hang_budget(seconds: int) -> float:
    """How long one item may run when no request deadline bounds it: two parses of the answer
    and up to four comparisons, each capped by math-verify's alarm, plus a worker's start-up."""
    return 8 * seconds + 10


class Stopped(Exception):
    """The task ran past its limit and its worker was killed."""


async def call(user: int, fn: Callable[..., Any], args: tuple, limit_s: float) -> Any:
    """`fn(*args)` in a pool worker, without blocking the loop, stopped (its worker killed)
    after `limit_s` or at the request deadline, whichever comes first.

    Raises `ItemFailure(timeout)` when the deadline passed before it started, `Stopped` when it
    was stopped, `ProcessExpired` when its worker died, `PoolClosed` when the pool closed.
    Cancelling the caller stops the task too. `fn` must be importable in a fresh process.
    """
    async with _gate():
        loop = asyncio.get_running_loop()
        deadline = DEADLINE.get()
        left = limit_s if deadline is None else min(limit_s, deadline - loop.time())
        if left <= 0:
            raise ItemFailure(ErrorType.timeout, "the request deadline passed before this item started")
        pool = _acquire_pool(user)
        fut = pool.schedule(fn, args=args, timeout=left)
        _running[fut] = pool
        fut.add_done_callback(lambda f: _running.pop(f, None))
        try:
            # Cancelling the wrapper cancels `fut`, and pebble kills the worker that runs it.
            return await asyncio.wrap_future(fut)
        except TimeoutError as exc:
            raise Stopped(f"stopped after {left:.1f} s; its worker was restarted") from exc
        except BrokenProcessPool as exc:  # how pebble answers the tasks of a pool stopped under them
            raise PoolClosed() from exc


async def judge(user: int, reference: str, answer: str, bare: bool, seconds: int) -> Outcome:
    """One answer against its reference on the pool: a typed outcome, never an exception."""
    try:
        status, payload = await call(user, _verify, (reference, answer, bare, seconds), _hang_budget(seconds))
    except ItemFailure as failure:
        return failure
    except Stopped as exc:
        return ItemFailure(ErrorType.timeout, f"math-verify {exc}")
    except ProcessExpired as exc:
        return ItemFailure(ErrorType.internal, f"math-verify's worker process died ({exc})")
    except PoolClosed:
        return ItemFailure(ErrorType.internal, "the math-verify pool closed while this item ran")
    if status == "ok":
        return Scored(payload)
    return ItemFailure(ErrorType.timeout if status == "timeout" else ErrorType.invalid_input, payload)


def worker_pids() -> list[int]:
    """The process ids of the pool's workers now (none when no pool runs)."""
    with _pool_lock:
        pool = _pool
    return [] if pool is None else list(pool._pool_manager.worker_manager.workers)  # pebble has no public list


async def start(user: int) -> None:
    """Register a user and start every worker (and import math-verify) now, not on first use."""
    pool = _acquire_pool(user)
    await asyncio.gather(*(asyncio.wrap_future(pool.schedule(_warm_worker)) for _ in range(POOL_WORKERS)))


async def release(user: int) -> None:
    """Forget a user; the last one out shuts the pool down, killing whatever it still runs."""
    global _pool
    with _pool_lock:
        _pool_users.discard(user)
        pool = None
        if not _pool_users:
            pool, _pool = _pool, None
    if pool is None:
        return
    pool.stop()  # no waiting on a worker stuck in C code: stopping kills the workers
    # Reaping takes a moment (pebble's SIGTERM, then SIGKILL); a daemon thread, so an exiting
    # process never waits on it.
    reaper = threading.Thread(target=pool.join, daemon=True, name="mathpool-close")
    reaper.start()
    await asyncio.to_thread(reaper.join, CLOSE_S)
    # Only now: pebble's own threads may still answer a task while the pool stops (a broken pool),
    # and a future answered twice raises in pebble's thread. What is left unanswered gets PoolClosed.
    for fut in [f for f, p in list(_running.items()) if p is pool]:
        try:
            fut.set_exception(PoolClosed())
        except InvalidStateError:  # finished or cancelled meanwhile
            pass
