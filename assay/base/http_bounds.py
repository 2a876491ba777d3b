"""What bounds a client's HTTP connection: a cap on how many, and how long each part may take.

uvicorn closes a keep-alive connection that idles after a response, but nothing else: a
connection that never sends a byte, or sends its headers or body a byte at a time, is held
forever. Here, on top of uvicorn's httptools protocol (what uvicorn[standard] picks):

- **connections**: past `max_connections` open at once, a new connection is answered at once
  with the service's typed, retryable 503 (Retry-After) and closed, before it is read;
- **headers**: from the moment a connection opens, or a kept-alive one starts its next request,
  the request line and headers must arrive within `header_timeout_s`, or the connection is
  closed (408 when part of a request had come);
- **idle**: between requests uvicorn's keep-alive timeout (`idle_timeout_s`) closes it;
- **body**: `BodyTimeout` answers 408 in the service's error shape when a request's body is not
  all read within `body_timeout_s` of its headers (a weight upload counts too), and `BodyLimit`
  answers 413 to a body over the service's `max_body_bytes`, before it is read whole.

Not covered: the time a client takes to read a response (the kernel's buffers and TCP's own
timeouts bound that), and HTTP/2 (not served).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from http import HTTPStatus

from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from assay.base.connections import Connections

_TIMED_OUT = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


def raw_response(response: Response) -> bytes:
    """`response` as HTTP/1.1 bytes with `connection: close`, for answering below ASGI."""
    head = [f"HTTP/1.1 {response.status_code} {HTTPStatus(response.status_code).phrase}".encode()]
    head += [b"%s: %s" % (name, value) for name, value in response.raw_headers]
    return b"\r\n".join([*head, b"connection: close", b"", response.body])


class GuardedHttp(HttpToolsProtocol):
    """uvicorn's httptools protocol with the connection cap and the header timeout.

    Built per listener with `functools.partial(GuardedHttp, limits=..., refusal=...)`, `refusal`
    being the raw 503 an excess connection gets."""

    def __init__(self, *args, limits: Connections, refusal: bytes, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.limits, self.refusal = limits, refusal
        self._header_timer: asyncio.TimerHandle | None = None
        self._partial = False  # bytes of a request have come, its headers not all

    # uvicorn's server hands its protocols a Transport; asyncio.Protocol declares the BaseTransport above it
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            transport.write(self.refusal)
            transport.close()
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        # uvicorn's keep-alive timer runs only while the connection idles between requests: a
        # byte now starts the next request, whose headers must come in time
        if self.timeout_keep_alive_task is not None:
            self._arm()
        self._partial = self._header_timer is not None
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.limits.header_timeout_s, self._headers_too_slow)
            self._partial = False

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        self._partial = False

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            if self._partial:
                self.transport.write(_TIMED_OUT)
            self.transport.close()


class BodyTimeout:
    """ASGI middleware: a request whose body is not all read within `timeout_s` of its start gets 408.

    One timer per request: when it fires while the app waits for body bytes, that wait is
    cancelled and becomes Starlette's HTTPException(408), raised from `receive`, that is inside the
    route reading the body, so the service's own handler answers it in the service's error shape.
    (`asyncio.timeout` around each `receive` would do the same at ~10x the cost per request.)"""

    def __init__(self, app: ASGIApp, timeout_s: float) -> None:
        self.app, self.timeout_s = app, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        waiting: asyncio.Task | None = None  # the task blocked in `receive` for body bytes
        expired = complete = False

        def expire() -> None:
            nonlocal expired
            expired = True
            if waiting is not None:
                waiting.cancel()

        async def timed() -> Message:
            nonlocal waiting, complete
            if complete:  # the body is in: what comes now is a disconnect, whenever it comes
                return await receive()
            if expired:
                raise self._too_slow()
            waiting = asyncio.current_task()
            try:
                message = await receive()
            except asyncio.CancelledError:
                if not expired:
                    raise
                waiting.uncancel()
                raise self._too_slow() from None
            finally:
                waiting = None
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            if complete:
                timer.cancel()
            return message

        timer = asyncio.get_running_loop().call_later(self.timeout_s, expire)
        try:
            await self.app(scope, timed, send)
        finally:
            timer.cancel()

    def _too_slow(self) -> HTTPException:
        return HTTPException(408, f"the request body did not arrive within {self.timeout_s:g}s")


class BodyLimit:
    """ASGI middleware: a body over `limit` bytes gets 413, before it is read into memory whole.

    A declared Content-Length over the limit is answered at once with `refuse(message)`, the
    service's error shape; a body that outgrows the limit while streaming raises Starlette's
    HTTPException(413) from `receive` (FastAPI passes it through its body parsing untouched, where
    anything else would become a generic 400), which the service's own handler answers. Routes in
    `exempt` bound their own bodies (a weight upload is as large as the model); they are matched below
    the app's mount point (`root_path`: Ray Serve's route prefix, `/policy/v1/admin/weights`)."""

    def __init__(
        self, app: ASGIApp, limit: int, refuse: Callable[[str], Response], exempt: tuple[str, ...] = ()
    ) -> None:
        self.app, self.limit, self.refuse, self.exempt = app, limit, refuse, exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].removeprefix(scope.get("root_path", "")) in self.exempt:
            return await self.app(scope, receive, send)
        too_large = f"the request body is over the limit of {self.limit} bytes"
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self.refuse(too_large)(scope, receive, send)
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, too_large)
            return message

        await self.app(scope, counted, send)
