"""math-verify in a small pool of worker processes, shared by every math_equal reward.

math-verify enforces its timeouts with `signal.alarm`, which works only in a process's main
thread, while the service scores from an event loop in any thread. A pool task runs in its
worker's main thread, so math-verify's own timeouts work there. A worker stuck where no alarm
reaches it (sympy in C code) is killed and the pool replaced. Workers exit by themselves when
the service process dies, so a killed server leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from itertools import product
from typing import Any

from rm_server.protocol import ErrorType
from rm_server.rewards.base import ItemFailure, Outcome, Scored

POOL_WORKERS = 2  # sympy is CPU-bound, and the service's other rewards need cores too
CHUNK_ITEMS = 8  # items per pool task: few round trips, yet little lost when one task hangs

_pool: ProcessPoolExecutor | None = None
_pool_users: set[int] = set()  # ids of the math_equal rewards using the pool; empty -> shut it
_pool_lock = threading.Lock()  # rewards may be scored from event loops in several threads


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


def _acquire_pool(user: int) -> ProcessPoolExecutor:
    global _pool
    with _pool_lock:
        _pool_users.add(user)
        if _pool is None:
            # spawn, not fork: forking a process that runs threads can copy their held locks.
            # A spawned worker re-runs the parent's main *script* (not a `-m` module), so entry
            # points should not import torch at module level, or every worker loads it too.
            ctx = multiprocessing.get_context("spawn")
            _pool = ProcessPoolExecutor(POOL_WORKERS, mp_context=ctx, initializer=_init_worker)
        return _pool


def _drop_pool(pool: ProcessPoolExecutor, kill: bool) -> None:
    """Forget `pool`, so the next task starts a fresh one; with `kill`, end its workers now."""
    global _pool
    with _pool_lock:
        if _pool is pool:
            _pool = None
    if kill:
        # A worker stuck in C code (a huge sympy power) never sees its alarm, and a running task
        # cannot be cancelled; killing the process is the only way back. ProcessPoolExecutor
        # has no public way to do it before Python 3.14. Tasks of other calls on this pool fail
        # with BrokenProcessPool and are retried on the fresh pool.
        for proc in list((getattr(pool, "_processes", None) or {}).values()):
            proc.kill()
    pool.shutdown(wait=False, cancel_futures=True)


def _parse(text: str, seconds: int, bare: bool) -> list:
    """math-verify's parse. A bare answer (a reference, an answer_pattern group) is read as LaTeX
    math first: the default extraction looks for numbers in prose and reads `2^{10}` as 2."""
    from math_verify import parse

    for attempt in ([f"${text}$", text] if bare and "$" not in text else [text]):
        try:
            found = parse(attempt, parsing_timeout=seconds, raise_on_error=True)
        except Exception:  # unparseable; math-verify's TimeoutException is a BaseException
            found = []
        if found:
            return found
    return []


def _equal(gold: list, target: list, seconds: int) -> bool:
    from math_verify import verify

    # Pair by pair, as verify does over lists, but so that one pair sympy cannot compare is not
    # a verdict, while a timeout (raise_on_error) still reaches the caller.
    for g, t in product(gold, target):
        try:
            if verify(g, t, timeout_seconds=seconds, raise_on_error=True):
                return True
        except Exception:
            continue
    return False


def _verify_chunk(tasks: list[tuple[str, str, bool]], seconds: int) -> list[tuple[str, Any]]:
    """Pool task: judge (reference, answer, answer_is_bare) triples in a worker's main thread.

    Returns ("ok", 1.0 | 0.0), ("timeout", why) or ("invalid", why) per triple: plain tuples,
    since an ItemFailure does not survive pickling.
    """
    from math_verify.errors import TimeoutException

    golds: dict[str, list] = {}  # the items of one prompt group share their reference
    out: list[tuple[str, Any]] = []
    for reference, answer, bare in tasks:
        try:
            if reference not in golds:
                golds[reference] = _parse(reference, seconds, bare=True)
            if not golds[reference]:
                out.append(("invalid", f"math-verify finds no answer in the reference {reference[:80]!r}"))
                continue
            target = _parse(answer, seconds, bare)
            out.append(("ok", 1.0 if _equal(golds[reference], target, seconds) else 0.0))
        except TimeoutException:
            out.append(("timeout", f"math-verify did not finish within {seconds} s"))
    return out


def _outcome(status: str, payload: Any) -> Outcome:
    if status == "ok":
        return Scored(payload)
    return ItemFailure(ErrorType.timeout if status == "timeout" else ErrorType.invalid_input, payload)


def _hang_budget(n: int, seconds: int) -> float:
    """How long a pool task of n items may run before its worker counts as stuck.

    A well-behaved item takes a few `seconds` at worst (two parses and a comparison or so, each
    capped by math-verify's alarm). Doubled, since the executor marks one task more running than
    it has workers, so a "running" task may still wait for another; plus a worker's start-up.
    """
    return 6 * seconds * n + 10


class _Hung(Exception):
    pass


async def _result(fut: Future, budget: float) -> Any:
    """The pool task's result without blocking the loop; _Hung when it runs past `budget`.

    Time spent queued behind other tasks does not count: that is load, not a hang.
    """
    waiter = asyncio.wrap_future(fut)
    try:
        while not fut.running() and not fut.done():
            await asyncio.wait([waiter], timeout=0.05)
        done, _ = await asyncio.wait([waiter], timeout=budget)
    except asyncio.CancelledError:
        waiter.cancel()  # a task still queued is dropped rather than run for nobody
        raise
    if not done:
        waiter.cancel()  # nobody will read the BrokenProcessPool it ends with
        raise _Hung
    return waiter.result()


async def run_chunk(user: int, triples: list[tuple[str, str, bool]], seconds: int) -> list[Outcome]:
    """Judge (reference, answer, answer_is_bare) triples on the pool, without blocking the loop."""
    n, budget = len(triples), _hang_budget(len(triples), seconds)
    for _ in range(2):  # a pool broken by another call's stuck task gets one retry
        pool = _acquire_pool(user)
        try:
            fut = pool.submit(_verify_chunk, triples, seconds)
        except RuntimeError:  # shut down or broken under us (BrokenProcessPool is one too)
            _drop_pool(pool, kill=False)
            continue
        try:
            raw = await _result(fut, budget)
        except BrokenProcessPool:
            _drop_pool(pool, kill=False)
            continue
        except _Hung:
            _drop_pool(pool, kill=True)
            why = f"math-verify ran past {budget:.0f} s on a batch of {n}; its worker was restarted"
            return [ItemFailure(ErrorType.timeout, why)] * n
        return [_outcome(status, payload) for status, payload in raw]
    return [ItemFailure(ErrorType.internal, "math-verify's worker process died twice")] * n


async def start(user: int) -> None:
    """Register a user and start every worker (and import math-verify) now, not on first use."""
    pool = _acquire_pool(user)
    await asyncio.gather(*(asyncio.wrap_future(pool.submit(_warm_worker)) for _ in range(POOL_WORKERS)))


async def release(user: int) -> None:
    """Forget a user; the last one out shuts the pool down."""
    global _pool
    with _pool_lock:
        _pool_users.discard(user)
        pool = None
        if not _pool_users:
            pool, _pool = _pool, None
    if pool is not None:
        await asyncio.to_thread(pool.shutdown, True)
