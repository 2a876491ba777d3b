"""Request ids and access lines, for every HTTP request and gRPC call of both services.

Each request gets an id: the client's `X-Request-Id` (gRPC: `x-request-id` metadata) when it is sane
(1-128 visible ASCII characters), else a new one (uuid4 hex). The id is echoed on every answer, in
the `X-Request-Id` response header (gRPC: the initial metadata), and set in the request's context
(`assay.base.logs.current_request`), so every record logged while serving it carries it.

- `RequestLog` is the HTTP edge's outermost ASGI middleware (outside the drain and error gate, the
  body limit and the cross-site guard), so their refusals carry the id too: 413, 403, 503 while
  draining, 500 for a bug. A connection refused at the connection cap is answered before any
  request is read, and has no id.
- `GrpcCall` does the same for a gRPC call of the service (`assay.base.grpc_serve` wraps every
  method with it); health and reflection calls are not logged.

With the access log on, each one ends with one record on the `assay.access` logger at level info:
method (gRPC: the full method), path, status (gRPC: the status code's name), duration in ms, request
id, client address, bytes of the response body (HTTP), and the model or reward the serving layer
noted (`assay.base.logs.note`, which the metrics `Timer` calls). A request whose client went away
before an answer started is logged with status 499, as the metrics count it. uvicorn's own access
log stays off.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from contextvars import Token

import grpc
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from assay.base.logs import ACCESS_LOGGER, RequestContext, current_request

HEADER = "x-request-id"
_SANE = re.compile(r"[\x21-\x7e]{1,128}")  # visible ASCII: no spaces or control characters, nothing to escape
CANCELLED = 499  # as the metrics count a request nobody reads the answer of (assay.base.metrics)
access_log = logging.getLogger(ACCESS_LOGGER)


def request_id(offered: str | None) -> str:
    """The client's id when it is sane, else a new one."""
    if offered is not None and _SANE.fullmatch(offered):
        return offered
    return uuid.uuid4().hex


def _access_line(
    context: RequestContext, method: str, path: str, status: int | str, seconds: float, client: str, sent: int | None
) -> None:
    """One access line, HTTP's (with the bytes sent) or gRPC's (`sent` None): its text, and its fields as
    record attributes (what `--log-format json` writes)."""
    size = "" if sent is None else f" {sent}B"
    labels = "".join(f" {k}={v}" for k, v in context.fields.items())
    fields: dict[str, object] = {
        "request_id": context.request_id,
        "method": method,
        "path": path,
        "status": status,
        "duration_ms": round(seconds * 1000, 2),
        "client": client,
        **({} if sent is None else {"bytes_out": sent}),
        **context.fields,
    }
    access_log.info(f"{method} {path} {status} {seconds * 1000:.1f}ms{size} client={client}{labels}", extra=fields)


class RequestLog:
    """ASGI middleware: the request id (taken or made, echoed, in the log context) and the access line."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        offered = next((v for k, v in scope["headers"] if k == HEADER.encode()), None)
        context = RequestContext(request_id(offered.decode("latin-1") if offered is not None else None))
        token: Token = current_request.set(context)
        echoed = (HEADER.encode(), context.request_id.encode())
        start = time.perf_counter()
        status: int | None = None
        sent = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), echoed]}
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except asyncio.CancelledError:
            status = status or CANCELLED
            raise
        except Exception:
            status = status or 500
            raise
        finally:
            current_request.reset(token)
            if access_log.isEnabledFor(logging.INFO):
                client = scope.get("client")
                address = f"{client[0]}:{client[1]}" if client else "-"
                seconds = time.perf_counter() - start
                _access_line(context, scope["method"], scope["path"], status or CANCELLED, seconds, address, sent)


class GrpcCall:
    """One gRPC call's request id and access line: `call = await GrpcCall.begin(method, context)` in the
    call's handler task, the handler runs, then `call.end(code)`. `begin` sends the id in the initial
    metadata at once. (grpc.aio runs each call in a task of its own, so the id set in its context is
    gone with the task: nothing to reset.)"""

    def __init__(self, method: str, peer: str, context: RequestContext) -> None:
        self.method, self.peer, self.context = method, peer, context
        self.start = time.perf_counter()

    @classmethod
    async def begin(cls, method: str, context: grpc.aio.ServicerContext) -> GrpcCall:
        offered = dict(context.invocation_metadata() or ()).get(HEADER)
        request = RequestContext(request_id(offered if isinstance(offered, str) else None))
        current_request.set(request)
        await context.send_initial_metadata(((HEADER, request.request_id),))
        return cls(method, context.peer(), request)

    def end(self, code: grpc.StatusCode) -> None:
        if not access_log.isEnabledFor(logging.INFO):
            return
        seconds = time.perf_counter() - self.start
        _access_line(self.context, "grpc", self.method, code.name, seconds, self.peer, None)
