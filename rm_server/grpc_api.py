"""The gRPC adapter: a thin servicer over `serving.RewardService`. No torch here.

The servicer converts protobuf to the protocol models (`grpc_convert`), calls the serving layer
and converts back; nothing else. Auth and errors are handled in one place, `AuthAndErrors`:

- every `assay.reward.v1.RewardService` method needs an `authorization: Bearer KEY` metadata
  entry with the `score` scope (when keys are configured); health and reflection stay open;
- a `ServiceError` becomes its `grpc_code` with its message as details, an `error-type` trailer
  (the protocol's ErrorType, as in HTTP's body) and a `retry-after` trailer in seconds when it
  says when to retry; a request that breaks the
  protocol's rules becomes INVALID_ARGUMENT listing the problems, and anything else becomes
  INTERNAL with a short message (the traceback goes to the log, never to the client).

ScoreStream answers each of its requests in-band instead: a failed request becomes an
`ErrorInfo` on its own answer, built by the same `describe` function, and the stream goes on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pydantic import ValidationError

from proto.reward.v1 import reward_pb2 as pb
from proto.reward.v1 import reward_pb2_grpc
from rm_server import grpc_convert as convert
from rm_server.auth import ApiKeys
from rm_server.errors import ServiceError
from rm_server.protocol import CompareRequest, ErrorInfo, ErrorType, ScoreRequest
from rm_server.serving import Limits, RewardService, Timer

SERVICE = pb.DESCRIPTOR.services_by_name["RewardService"].full_name  # assay.reward.v1.RewardService
log = logging.getLogger("rm_server.grpc")
R = TypeVar("R", ScoreRequest, CompareRequest)


# --- errors: the one mapping from an exception to what the client is told ---------------------


@dataclass(frozen=True)
class Failure:
    code: grpc.StatusCode
    info: ErrorInfo
    retry_after_s: float | None = None


def describe(exc: Exception) -> Failure:
    if isinstance(exc, ServiceError):
        return Failure(exc.grpc_code, ErrorInfo(type=exc.type, message=exc.message), exc.retry_after_s)
    if isinstance(exc, ValidationError):
        problems = [f"{'.'.join(str(p) for p in e['loc']) or 'request'}: {e['msg']}" for e in exc.errors()[:10]]
        message = "invalid request: " + "; ".join(problems)
        return Failure(grpc.StatusCode.INVALID_ARGUMENT, ErrorInfo(type=ErrorType.invalid_request, message=message))
    log.error("unexpected error in a gRPC call", exc_info=exc)
    message = f"internal error ({type(exc).__name__}); the server log has the details"
    return Failure(grpc.StatusCode.INTERNAL, ErrorInfo(type=ErrorType.internal, message=message))


class AuthAndErrors(grpc.aio.ServerInterceptor):
    """Checks the API key and maps exceptions to status codes for every RewardService method.

    grpc.aio runs the handler after `intercept_service` returns, so a try/except around
    `continuation` would see no handler exceptions. Instead the interceptor returns the method's
    handler with its behaviour wrapped; that keeps both concerns in this one class, out of the
    servicer, and applies them to any method added to the service later without a decorator."""

    def __init__(self, keys: ApiKeys) -> None:
        self.keys = keys

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(f"/{SERVICE}/"):
            return handler  # unknown method (UNIMPLEMENTED), health, reflection
        codec = {"request_deserializer": handler.request_deserializer,
                 "response_serializer": handler.response_serializer}  # fmt: skip
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(self._unary(handler.unary_unary), **codec)
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(self._stream(handler.stream_stream), **codec)
        raise TypeError(f"{details.method}: only unary and bidirectional methods are wrapped")

    def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        metadata = dict(context.invocation_metadata() or ())
        self.keys.check(metadata.get("authorization"), "score")

    def _unary(self, behaviour):
        async def call(request, context: grpc.aio.ServicerContext):
            try:
                self._authorize(context)
                return await behaviour(request, context)
            except grpc.aio.AbortError:
                raise  # already a status
            except Exception as exc:  # noqa: BLE001 - this is the one place errors become statuses
                await _abort(context, describe(exc))

        return call

    def _stream(self, behaviour):
        async def call(requests, context: grpc.aio.ServicerContext):
            try:
                self._authorize(context)
                async for answer in behaviour(requests, context):
                    yield answer
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001 - this is the one place errors become statuses
                await _abort(context, describe(exc))

        return call


async def _abort(context: grpc.aio.ServicerContext, failure: Failure) -> None:
    # `error-type` carries the protocol's ErrorType, as the HTTP body does; `retry-after` is in
    # seconds like the HTTP header (fractions allowed here).
    trailing: tuple[tuple[str, str], ...] = (("error-type", failure.info.type.value),)
    if failure.retry_after_s is not None:
        trailing += (("retry-after", f"{failure.retry_after_s:.3f}"),)
    await context.abort(failure.code, failure.info.message, trailing_metadata=trailing)


# --- the servicer ----------------------------------------------------------------------------


def _within_deadline(req: R, context: grpc.aio.ServicerContext) -> R:
    """The request with `timeout_s` lowered to the gRPC deadline when that comes sooner."""
    left = context.time_remaining()
    if left is None or (req.timeout_s is not None and req.timeout_s <= left):
        return req
    return req.model_copy(update={"timeout_s": max(left, 1e-3)})


class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    def __init__(self, service: RewardService) -> None:
        self.service = service

    async def Score(self, request: pb.ScoreRequest, context) -> pb.ScoreResponse:
        req = _within_deadline(convert.score_request_from_proto(request), context)
        with Timer(self.service.metrics, "grpc/Score", req.reward):
            return convert.score_response_to_proto(await self.service.score(req))

    async def Compare(self, request: pb.CompareRequest, context) -> pb.CompareResponse:
        req = _within_deadline(convert.compare_request_from_proto(request), context)
        with Timer(self.service.metrics, "grpc/Compare", req.reward):
            return convert.compare_response_to_proto(await self.service.compare(req))

    async def ListRewards(self, request: pb.ListRewardsRequest, context) -> pb.RewardsResponse:
        return convert.rewards_response_to_proto(self.service.list_rewards())

    async def ScoreStream(self, requests, context) -> AsyncIterator[pb.ScoreStreamResponse]:
        """Work on every stream request at once and answer each as soon as it is done."""
        answers: asyncio.Queue[pb.ScoreStreamResponse | None] = asyncio.Queue()

        async def answer(msg: pb.ScoreStreamRequest) -> None:
            await answers.put(await self._stream_one(msg, context))

        async def read() -> None:
            try:
                async with asyncio.TaskGroup() as tasks:  # waits for every answer
                    async for msg in requests:
                        tasks.create_task(answer(msg))
            finally:
                await answers.put(None)

        reader = asyncio.create_task(read())
        try:
            while (resp := await answers.get()) is not None:
                yield resp
            await reader  # raises what broke the reading, if anything did
        finally:
            reader.cancel()  # the client went away: drop the work still in flight

    async def _stream_one(self, msg: pb.ScoreStreamRequest, context) -> pb.ScoreStreamResponse:
        try:
            req = _within_deadline(convert.score_request_from_proto(msg.request), context)
            with Timer(self.service.metrics, "grpc/ScoreStream", req.reward):
                resp = await self.service.score(req)
            answer = convert.ScoreStreamAnswer(msg.request_id, response=resp)
        except Exception as exc:  # noqa: BLE001 - answered in-band, mapped by describe
            failure = describe(exc)
            answer = convert.ScoreStreamAnswer(msg.request_id, error=failure.info, retry_after_s=failure.retry_after_s)
        return convert.score_stream_response_to_proto(answer)


# --- the server ------------------------------------------------------------------------------


class Health(health.aio.HealthServicer):
    """grpc.health.v1 over `service.ready`: "" and RewardService are SERVING once the models are
    loaded. Check looks at `service.ready` itself; Watch hears of a change within 50 ms."""

    def __init__(self, service: RewardService) -> None:
        super().__init__()
        self.service = service
        self.serving: bool | None = None

    async def sync(self) -> None:
        if self.service.ready != self.serving:
            self.serving = self.service.ready
            status = (
                health_pb2.HealthCheckResponse.SERVING if self.serving else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            for name in ("", SERVICE):
                await self.set(name, status)

    async def Check(self, request: health_pb2.HealthCheckRequest, context) -> health_pb2.HealthCheckResponse:
        await self.sync()
        return await super().Check(request, context)

    async def follow(self, server: grpc.aio.Server) -> None:
        """Keep the status in step with the service until the server stops."""
        while True:
            await self.sync()
            if not await server.wait_for_termination(timeout=0.05):  # False: it terminated
                return


_background: set[asyncio.Task] = set()


async def start_grpc_server(
    service: RewardService, keys: ApiKeys, host: str, port: int, limits: Limits
) -> tuple[grpc.aio.Server, int]:
    """Start the gRPC server (RewardService, health, reflection); returns it and its bound port."""
    server = grpc.aio.server(
        interceptors=[AuthAndErrors(keys)],
        options=[
            ("grpc.max_receive_message_length", limits.max_body_bytes),
            # a response can outgrow its request (per-token scores), so the cap is looser
            ("grpc.max_send_message_length", 4 * limits.max_body_bytes),
        ],
    )
    reward_pb2_grpc.add_RewardServiceServicer_to_server(RewardServicer(service), server)
    checks = Health(service)
    await checks.sync()  # NOT_SERVING from the first call on, "" included
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    bound = server.add_insecure_port(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")  # raises if taken
    await server.start()
    task = asyncio.create_task(checks.follow(server))
    _background.add(task)
    task.add_done_callback(_background.discard)
    return server, bound
