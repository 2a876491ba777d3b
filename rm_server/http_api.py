"""The HTTP adapter: FastAPI routes over `serving.RewardService`. No torch here.

Errors are mapped in one place (the exception handlers below): a `ServiceError` becomes its
status with an `ErrorResponse` body (and Retry-After for 429), a body that is not valid JSON or
does not match the protocol becomes 400 with the problems listed, and nothing a client sends
can produce a 500. The key is checked before the body is read, and what a browser sends
cross-site is refused (`assay.http_guard`).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from assay.http_guard import LOOPBACK_HOSTS, CrossSiteGuard, GuardedRoute, KeyCheck
from assay.serve import add_ops_routes
from assay.rm_server.auth import ApiKeys
from assay.rm_server.errors import ServiceError
from assay.rm_server.protocol import (
    CompareRequest,
    CompareResponse,
    ErrorInfo,
    ErrorResponse,
    ErrorType,
    HealthResponse,
    RewardsResponse,
    ScoreRequest,
    ScoreResponse,
)
from assay.rm_server.serving import RewardService, Timer

ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 413, 415, 429, 503)}


def _error(status: int, type: ErrorType, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(type=type, message=message))
    return JSONResponse(body.model_dump(mode="json"), status_code=status, headers=headers)


T = TypeVar("T")


async def _until_disconnected(request: Request) -> None:
    # With the body read, the next ASGI message is `http.disconnect`, when the client goes.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[T], timer: Timer) -> T | Response:
    """Run `work`, cancelled if the client hangs up first: its queued items leave the model
    queue and its running math-verify work is stopped, rather than computed for nobody."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait([task, watcher], return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this handler is cancelled (shutdown)
        watcher.cancel()
        task.cancel()
    if task.done() and not task.cancelled():
        return task.result()
    await asyncio.wait([task])  # let the cancellation run through the rewards
    timer.code = "499"  # nobody reads the answer
    return Response(status_code=499)


class BodyLimit:
    """Refuse bodies over `limit` bytes with 413, before they are read into memory whole.

    Routes in `exempt` bound their own bodies (a weight upload is as large as the model)."""

    def __init__(self, app: ASGIApp, limit: int, exempt: tuple[str, ...] = ()) -> None:
        self.app, self.limit, self.exempt = app, limit, exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt:
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(scope, receive, send)
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                # FastAPI passes HTTPException through its body parsing untouched (anything else
                # becomes a generic 400), and the handler below gives it the protocol's shape.
                raise StarletteHTTPException(413, f"the request body is over the limit of {self.limit} bytes")
            return message

        await self.app(scope, counted, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = _error(413, ErrorType.payload_too_large, f"the request body is over the limit of {self.limit} bytes")
        await response(scope, receive, send)


def _refusal(status: int, message: str) -> JSONResponse:
    """`CrossSiteGuard`'s refusals, in this service's shape."""
    return _error(status, ErrorType.permission_denied, message)


def create_app(service: RewardService, keys: ApiKeys | None = None,
               hosts: tuple[str, ...] | None = LOOPBACK_HOSTS) -> FastAPI:  # fmt: skip
    """The app over `service`; `hosts`: the Host names it answers (None: any), see `http_guard.allowed_hosts`."""
    keys = keys or ApiKeys()
    app = FastAPI(
        title="Assay reward service",
        version="1",
        description="Scores responses with reward models, rules and judges. Every score carries its reward id.",
    )
    app.router.route_class = GuardedRoute  # the key before the body

    def scope(name: str):
        return KeyCheck.depends(lambda authorization: keys.check(authorization, name))

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))} if exc.retry_after_s else None
        return _error(exc.http_status, exc.type, exc.message, headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for e in exc.errors()[:10]:
            where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
            problems.append(f"{where}: {e.get('msg', 'invalid')}")
        return _error(400, ErrorType.invalid_request, "invalid request: " + "; ".join(problems))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own refusals: unreadable body (e.g. not UTF-8), unknown route, wrong method (with
        # its Allow header), and GuardedRoute's wrong content type.
        kind = ErrorType.payload_too_large if exc.status_code == 413 else ErrorType.invalid_request
        return _error(exc.status_code, kind, str(exc.detail), exc.headers)

    @app.post("/v1/score", response_model=ScoreResponse, responses=ERRORS, dependencies=[scope("score")])
    async def score(req: ScoreRequest, request: Request) -> ScoreResponse | Response:
        with Timer(service.metrics, "/v1/score", req.reward) as timer:
            return await _unless_disconnected(request, service.score(req), timer)

    @app.post("/v1/compare", response_model=CompareResponse, responses=ERRORS, dependencies=[scope("score")])
    async def compare(req: CompareRequest, request: Request) -> CompareResponse | Response:
        with Timer(service.metrics, "/v1/compare", req.reward) as timer:
            return await _unless_disconnected(request, service.compare(req), timer)

    @app.get("/v1/rewards", response_model=RewardsResponse, responses=ERRORS, dependencies=[scope("score")])
    async def rewards() -> RewardsResponse:
        return service.list_rewards()

    @app.get("/v1/admin/queues", responses=ERRORS, dependencies=[scope("admin")])
    async def queues() -> dict[str, int]:
        """Items waiting per reward (admin scope)."""
        return service.queue_depths()

    add_ops_routes(app, HealthResponse, lambda: service.ready, lambda: service.metrics.render(service.queue_depths()))

    app.add_middleware(BodyLimit, limit=service.limits.max_body_bytes)
    app.add_middleware(CrossSiteGuard, refuse=_refusal, hosts=hosts)  # outermost: before the body is counted
    return app
