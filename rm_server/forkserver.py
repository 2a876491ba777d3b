"""Where the reward service's worker processes come from: one forkserver, with their imports done.

Both kinds of worker (math-verify's pool, `rewards.mathpool`; the model workers,
`backends.worker`) start through `context()`. Never `fork`: the server runs threads (the event
loop's, uvicorn's, gRPC's), and a fork copies their locks held. Not `spawn` either: a spawned
process imports everything afresh, and torch with transformers' model code costs 7 s of CPU on a
2-core machine (20 s when it is busy), paid for each model worker and again for each restart.
multiprocessing's forkserver is one single-threaded process per server, started on first use,
that imports `PRELOAD` once and forks every worker from itself: a worker starts with its imports
done, and loading a small model is all that is left.

The forkserver is one per process and takes its preload when it starts, so both kinds of worker
name the same list here. It exits when the server does; so do the workers (each watches for its
parent, the forkserver, to go).
"""

from __future__ import annotations

import multiprocessing
from multiprocessing.context import ForkServerContext

PRELOAD = ["math_verify", "sympy", "pebble", "torch", "assay.rm_server.backends.hf"]


def context() -> ForkServerContext:
    """multiprocessing's forkserver context, its preload set to what every worker imports."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx
