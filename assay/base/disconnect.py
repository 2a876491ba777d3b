"""Work that an HTTP client no longer waits for is cancelled, not finished for nobody.

Both services' routes run their serving call through `unless_disconnected`: if the client hangs
up first, the call is cancelled, which drops its queued items or sequences from the batcher and
stops what already runs (a model's next decode step, a math-verify worker). The request is
recorded as 499 (nginx's "client closed request"); the answer is never read.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request
from fastapi.responses import Response

from assay.base.metrics import CANCELLED, Timer

log = logging.getLogger(__name__)
T = TypeVar("T")


async def _until_disconnected(request: Request) -> None:
    # With the body read, the next ASGI message is `http.disconnect`, when the client goes.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T], timer: Timer) -> T | Response:
    """Run `work`; cancel it if the client disconnects first (and answer 499, which no one reads)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait([task, watcher], return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this handler is cancelled (shutdown)
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task.done() and not task.cancelled():
        return task.result()
    await asyncio.wait([task])  # let the cancellation run through the batcher and the backend
    if not task.cancelled():
        task.exception()  # retrieved: whatever it ended with, the client is gone
    log.info("client disconnected from %s: its work cancelled", request.url.path)
    timer.code = CANCELLED
    return Response(status_code=499)
