"""The HTTP adapter: OpenAI-compatible FastAPI routes over `serving.PolicyService`, and `/v1/search`
over `serving_search.SearchService`. No torch here.

Errors are mapped in one place (the handlers below) to OpenAI's shape, `{"error": {"message",
"type", "param", "code"}}`: an `ApiError` becomes its status (with Retry-After on 429), a body
that is not valid JSON or does not match the protocol becomes 400, an oversized body 413.
The key is checked before the body is read, and what a browser sends cross-site is refused
(`assay.base.http_guard`): a web page must not swap the served weights of a keyless loopback server.
A generation whose client disconnects is cancelled (`assay.base.disconnect`), which drops its queued
sequences and stops its running ones at the next decode step. `stream: true` is answered with
server-sent events (`streaming.py`, sent by `EventStream`), once the request is planned and taken:
what is refused before that gets the usual JSON error, and the request is recorded once, when its
stream ends. `create_app` assembles the app from
one small function per route group.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.params import Depends
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette import types as asgi
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from assay.base.auth import ApiKeys
from assay.base.disconnect import unless_disconnected
from assay.base.http_bounds import BodyLimit
from assay.base.http_guard import LOOPBACK_HOSTS, CrossSiteGuard, GuardedRoute, KeyCheck
from assay.base.metrics import CANCELLED, Timer
from assay.base.serve import add_ops_routes
from assay.policy_server.adapters import AdapterService
from assay.policy_server.errors import ApiError, InvalidRequest, check_key
from assay.policy_server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorInfo,
    ErrorResponse,
    HealthResponse,
    LoadWeightsRequest,
    ModelList,
    SearchRequest,
    SearchResponse,
    WeightUpdateResponse,
)
from assay.policy_server.serving import PolicyService
from assay.policy_server.serving_search import SearchService
from assay.policy_server.streaming import ChatStream, CompletionStream, Stream
from assay.policy_server.weights import Update, WeightService

log = logging.getLogger("policy_server")
SCOPES = ("generate", "admin")
# The error replies each route documents in OpenAPI, typed as FastAPI's `responses=` takes them.
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 413, 415, 429, 503, 504)
}
# The generation routes' 200 is JSON, or server-sent events with `stream: true`
STREAMED = {"content": {"text/event-stream": {"schema": {"type": "string"}}}}
GENERATION_ERRORS: dict[int | str, dict[str, Any]] = {**ERRORS, 200: STREAMED}
SEARCH_ERRORS: dict[int | str, dict[str, Any]] = {status: {"model": ErrorResponse} for status in (*ERRORS, 409, 502)}
WEIGHTS_ROUTE = "/v1/admin/weights"
ADAPTER_ROUTE = "/v1/admin/adapter"
# The weights upload's body, as the schema documents it and GuardedRoute enforces it (clients/policy.py sends it)
SAFETENSORS = {"type": "string", "format": "binary", "description": "a safetensors file"}
# A weight push's target version (`weights.py`): above the current one, so never below 1
TargetVersion = Annotated[int | None, Query(ge=1, description="The weight_version the update makes.")]
SAFETENSORS_BODY = {"requestBody": {"required": True, "content": {"application/octet-stream": {"schema": SAFETENSORS}}}}


def _error(
    status: int,
    type: str,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(message=message, type=type, param=param, code=code))
    return JSONResponse(body.model_dump(mode="json"), status_code=status, headers=headers)


def _too_large(message: str) -> JSONResponse:
    """`BodyLimit`'s refusal, in OpenAI's shape."""
    return _error(413, "invalid_request_error", message, code="request_too_large")


def _refusal(status: int, message: str) -> JSONResponse:
    """`CrossSiteGuard`'s refusals, in OpenAI's shape."""
    return _error(status, "permission_error", message, code="cross_site_request")


def _update(u: Update) -> WeightUpdateResponse:
    return WeightUpdateResponse(
        model=u.model,
        previous_version=u.previous_version,
        weight_version=u.weight_version,
        tensors=u.tensors,
        bytes=u.bytes,
        seconds=round(u.seconds, 6),
    )


Scope = Callable[[str], Depends]  # a route's key check for one scope: `dependencies=[scope("generate")]`


class EventStream(StreamingResponse):
    """A started `Stream`'s events, `text/event-stream`. However the response ends (the stream's last
    event, the client gone, the drain cutting it off), the generation is cancelled if it still runs and
    the request is recorded: its error's status after an error event, 499 if it did not finish."""

    def __init__(self, stream: Stream, timer: Timer, recording: ExitStack) -> None:
        super().__init__(
            stream.events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},  # no proxy holds events back
        )
        self.stream, self.timer, self.recording = stream, timer, recording

    async def __call__(self, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send) -> None:
        started = False

        async def watched(message: asgi.Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await super().__call__(scope, receive, watched)
        except asyncio.CancelledError:
            # Cut off from outside (the drain's end; a client that leaves ends the response without
            # raising): a stream under way gets a last error event and its end, so the client reads a
            # whole response that says why, and the cancellation goes on.
            self.stream.close()
            if started and not self.stream.finished:
                with suppress(OSError, ClientDisconnect):
                    await send({"type": "http.response.body", "body": self.stream.cut_off().encode()})
            raise
        finally:
            self.stream.close()
            if not self.stream.finished:
                self.timer.code = CANCELLED
            elif self.stream.error is not None:
                self.timer.code = str(self.stream.error.status)
            self.recording.close()


async def _streamed(request: Request, stream: Stream, timer: Timer) -> Response:
    """Start `stream` and answer with its events; refused (or the client gone) before it starts, the
    usual answer, recorded now. Once started, the timer is the response's to stop (`EventStream`)."""
    with ExitStack() as recording:
        recording.enter_context(timer)
        started = await unless_disconnected(request, stream.start(), timer)
        if isinstance(started, Response):
            return started
        return EventStream(stream, timer, recording.pop_all())


def create_app(
    service: PolicyService,
    keys: ApiKeys | None = None,
    searches: SearchService | None = None,
    weight_roots: Sequence[Path] = (),
    hosts: tuple[str, ...] | None = LOOPBACK_HOSTS,
    dependencies: Callable[[], dict[str, str]] | None = None,
    weights: WeightService | None = None,
) -> FastAPI:
    """The app over `service`; with `searches`, also `POST /v1/search`; with `weight_roots` (resolved
    `--weights-dir`s), `POST /v1/admin/weights/load` reads safetensors inside them. `hosts`: the Host
    names it answers (None: any), see `http_guard.allowed_hosts`; `dependencies`: the services it
    calls and their state (`ok`, `degraded`), as `/ready` reports them; `weights`: the caller's
    weight service over `service` (one with a `publish` hook), in place of one over `weight_roots`."""
    keys = keys or ApiKeys(scopes=SCOPES)
    app = FastAPI(
        title="Assay policy service",
        version="1",
        description="OpenAI-compatible generation. Every response carries the weight_version that produced it.",
    )
    app.router.route_class = GuardedRoute  # the key before the body

    def scope(name: str) -> Depends:
        return KeyCheck.depends(lambda authorization: check_key(keys, authorization, name))

    _add_error_handlers(app)
    _add_generation_routes(app, service, scope)
    if searches is not None:
        _add_search_route(app, service, searches, scope)
    _add_model_routes(app, service, scope)
    _add_weight_routes(app, weights or WeightService(service, weight_roots), scope)
    add_ops_routes(
        app,
        HealthResponse,
        lambda: service.ready,
        lambda accept: service.metrics.render(service.queue_depths(), accept),
        dependencies,
    )

    app.add_middleware(
        BodyLimit, limit=service.limits.max_body_bytes, refuse=_too_large, exempt=(WEIGHTS_ROUTE, ADAPTER_ROUTE)
    )
    app.add_middleware(CrossSiteGuard, refuse=_refusal, hosts=hosts)  # outermost: before the body is counted
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """The one mapping of what a route raises to OpenAI's error shape."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))} if exc.retry_after_s else None
        return _error(exc.status, exc.type, exc.message, exc.param, exc.code, headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems, params = [], []
        for e in exc.errors()[:10]:
            loc = [str(p) for p in e.get("loc", ()) if p != "body"]
            # union members show up in the location (`prompt.list[int].0`): keep the field names
            loc = [p for p in loc if "[" not in p and p not in ("str", "int", "float")]
            where = ".".join(loc) or "body"
            problems.append(f"{where}: {e.get('msg', 'invalid').removeprefix('Value error, ')}")
            params.append(loc[0] if loc else None)
        param = params[0] if len(set(params)) == 1 else None
        return _error(400, "invalid_request_error", "invalid request: " + "; ".join(problems), param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own refusals: the streamed body over the limit, unknown route, wrong method (with
        # its Allow header), and GuardedRoute's wrong content type.
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        code = {413: "request_too_large", 415: "unsupported_media_type"}.get(exc.status_code)
        return _error(exc.status_code, kind, str(exc.detail), code=code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error on %s", request.url.path, exc_info=exc)
        return _error(500, "server_error", f"internal error: {type(exc).__name__}", code="internal")


def _add_generation_routes(app: FastAPI, service: PolicyService, scope: Scope) -> None:
    """OpenAI's completions and chat completions."""

    @app.post(
        "/v1/completions",
        response_model=CompletionResponse,
        response_model_exclude_none=True,
        responses=GENERATION_ERRORS,
        dependencies=[scope("generate")],
    )
    async def completions(req: CompletionRequest, request: Request) -> CompletionResponse | Response:
        timer = Timer(service.metrics, "/v1/completions", service.model_label(req.model))
        if req.stream:
            return await _streamed(request, CompletionStream(service, req), timer)
        with timer:
            return await unless_disconnected(request, service.completions(req), timer)

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletionResponse,
        response_model_exclude_none=True,
        responses=GENERATION_ERRORS,
        dependencies=[scope("generate")],
    )
    async def chat(req: ChatCompletionRequest, request: Request) -> ChatCompletionResponse | Response:
        timer = Timer(service.metrics, "/v1/chat/completions", service.model_label(req.model))
        if req.stream:
            return await _streamed(request, ChatStream(service, req), timer)
        with timer:
            return await unless_disconnected(request, service.chat(req), timer)


def _add_search_route(app: FastAPI, service: PolicyService, searches: SearchService, scope: Scope) -> None:
    @app.post("/v1/search", response_model=SearchResponse, responses=SEARCH_ERRORS, dependencies=[scope("generate")])
    async def search(req: SearchRequest, request: Request) -> SearchResponse | Response:
        """Inference-time search: generate with `model`, score with rm_server's `reward`, choose."""
        with Timer(service.metrics, "/v1/search", service.model_label(req.model)) as timer:
            return await unless_disconnected(request, searches.search(req), timer)


def _add_model_routes(app: FastAPI, service: PolicyService, scope: Scope) -> None:
    @app.get("/v1/models", response_model=ModelList, responses=ERRORS, dependencies=[scope("generate")])
    async def models() -> ModelList:
        return service.models()

    @app.get("/v1/admin/queues", responses=ERRORS, dependencies=[scope("admin")])
    async def queues() -> dict[str, int]:
        """Sequences waiting per model (admin scope)."""
        return service.queue_depths()


def _add_weight_routes(app: FastAPI, weights: WeightService, scope: Scope) -> None:
    """Weight updates (admin scope): an upload, or a load from the server's disk."""

    @app.post(
        WEIGHTS_ROUTE,
        response_model=WeightUpdateResponse,
        responses={**ERRORS, 409: ERRORS[400]},
        dependencies=[scope("admin")],
        openapi_extra=SAFETENSORS_BODY,
    )
    async def update_weights(
        request: Request, model: str, expect_version: int | None = None, version: TargetVersion = None
    ) -> WeightUpdateResponse:
        """New weights for `model`: the body is a safetensors file (the full state dict or a named
        subset), streamed. Checked against the model's names, shapes and dtypes before any is used.
        `version`: the weight_version it makes (default: the current one + 1), above the current one."""
        try:
            update = await weights.from_stream(model, request.stream(), expect_version, version)
        except ClientDisconnect:
            raise InvalidRequest("the client went away during the upload; the weights are unchanged") from None
        return _update(update)

    @app.post(
        WEIGHTS_ROUTE + "/load",
        response_model=WeightUpdateResponse,
        responses={**ERRORS, 409: ERRORS[400]},
        dependencies=[scope("admin")],
    )
    async def load_weights(req: LoadWeightsRequest) -> WeightUpdateResponse:
        """New weights for `model` from safetensors on the server's disk (a file or a checkpoint directory),
        inside a directory the server was started with (`--weights-dir`; none: 403)."""
        return _update(await weights.from_path(req.model, req.path, req.expect_version, req.version))

    adapters = AdapterService(weights)

    @app.post(
        ADAPTER_ROUTE,
        response_model=WeightUpdateResponse,
        responses={**ERRORS, 409: ERRORS[400]},
        dependencies=[scope("admin")],
        openapi_extra=SAFETENSORS_BODY,
    )
    async def update_adapter(
        request: Request, model: str, expect_version: int | None = None, version: TargetVersion = None
    ) -> WeightUpdateResponse:
        """A LoRA adapter for `model`, merged into its base weights (`policy_server/adapters.py`): the body
        is a safetensors file of `<module>.lora_A.weight` and `.lora_B.weight` pairs, `lora_alpha` and `r`
        in its metadata. Checked against the model's linear layers before any is used."""
        try:
            update = await adapters.from_stream(model, request.stream(), expect_version, version)
        except ClientDisconnect:
            raise InvalidRequest("the client went away during the upload; the weights are unchanged") from None
        return _update(update)
