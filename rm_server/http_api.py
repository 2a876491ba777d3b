"""The HTTP adapter: FastAPI routes over `serving.RewardService`. No torch here.

Errors are mapped in one place (the exception handlers below): a `ServiceError` becomes its
status with an `ErrorResponse` body (and Retry-After for 429), a body that is not valid JSON or
does not match the protocol becomes 400 with the problems listed, and nothing a client sends
can produce a 500. The key is checked before the body is read, and what a browser sends
cross-site is refused (`assay.base.http_guard`). A client that hangs up has its work cancelled
(`assay.base.disconnect`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from assay.base.auth import ApiKeys
from assay.base.disconnect import unless_disconnected
from assay.base.errors import ServiceError
from assay.base.http_bounds import BodyLimit
from assay.base.http_guard import LOOPBACK_HOSTS, CrossSiteGuard, GuardedRoute, KeyCheck
from assay.base.metrics import Timer
from assay.base.serve import add_ops_routes
from assay.rm_server.errors import error_type
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
from assay.rm_server.serving import RewardService

# The error replies each route documents in OpenAPI, typed as FastAPI's `responses=` takes them.
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 413, 415, 429, 503)
}


def _error(status: int, type: ErrorType, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(type=type, message=message))
    return JSONResponse(body.model_dump(mode="json"), status_code=status, headers=headers)


def _too_large(message: str) -> JSONResponse:
    """`BodyLimit`'s refusal, in this service's shape."""
    return _error(413, ErrorType.payload_too_large, message)


def _refusal(status: int, message: str) -> JSONResponse:
    """`CrossSiteGuard`'s refusals, in this service's shape."""
    return _error(status, ErrorType.permission_denied, message)


def create_app(
    service: RewardService, keys: ApiKeys | None = None, hosts: tuple[str, ...] | None = LOOPBACK_HOSTS
) -> FastAPI:
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
        return _error(exc.status, error_type(exc), exc.message, headers)

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
        with Timer(service.metrics, "/v1/score", service.metrics.reward_label(req.reward)) as timer:
            return await unless_disconnected(request, service.score(req), timer)

    @app.post("/v1/compare", response_model=CompareResponse, responses=ERRORS, dependencies=[scope("score")])
    async def compare(req: CompareRequest, request: Request) -> CompareResponse | Response:
        with Timer(service.metrics, "/v1/compare", service.metrics.reward_label(req.reward)) as timer:
            return await unless_disconnected(request, service.compare(req), timer)

    @app.get("/v1/rewards", response_model=RewardsResponse, responses=ERRORS, dependencies=[scope("score")])
    async def rewards() -> RewardsResponse:
        return service.list_rewards()

    @app.get("/v1/admin/queues", responses=ERRORS, dependencies=[scope("admin")])
    async def queues() -> dict[str, int]:
        """Items waiting per reward (admin scope)."""
        return service.queue_depths()

    add_ops_routes(
        app,
        HealthResponse,
        lambda: service.ready,
        lambda accept: service.metrics.render(service.queue_depths(), accept),
    )

    app.add_middleware(BodyLimit, limit=service.limits.max_body_bytes, refuse=_too_large)
    app.add_middleware(CrossSiteGuard, refuse=_refusal, hosts=hosts)  # outermost: before the body is counted
    return app
