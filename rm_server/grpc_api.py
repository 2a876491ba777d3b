"""The gRPC adapter: a thin servicer over `serving.RewardService`. No torch here.

The servicer converts protobuf to the protocol models (`grpc_convert`), calls the serving layer
and converts back; nothing else. Auth and errors are handled in one place, the shared
`assay.base.grpc_serve.AuthAndErrors`, with this service's scope and `describe`:

- every `assay.reward.v1.RewardService` method needs an `authorization: Bearer KEY` metadata
  entry with the `score` scope (when keys are configured); health and reflection stay open;
- a `ServiceError` becomes the gRPC code of its HTTP status (`assay.base.errors.grpc_status`),
  with its message as details, an `error-type` trailer (the protocol's ErrorType, as in HTTP's
  body, `errors.error_type`) and a `retry-after` trailer in seconds when it says when to retry;
  a request that breaks the protocol's rules becomes INVALID_ARGUMENT listing the problems, bytes
  that do not parse as the request message too, and anything else becomes INTERNAL with a short
  message (the traceback goes to the log, never to the client).

ScoreStream answers each of its requests in-band instead: a failed request becomes an
`ErrorInfo` on its own answer, built by the same `describe` function, and the stream goes on.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TypeVar

import grpc
from pydantic import ValidationError

from assay.base import grpc_serve
from assay.base.auth import ApiKeys
from assay.base.errors import ServiceError, grpc_status
from assay.base.grpc_serve import AuthAndErrors, Failure, MalformedMessage, internal, invalid_argument, malformed
from assay.base.metrics import Timer
from assay.proto.reward.v1 import reward_pb2 as pb
from assay.proto.reward.v1 import reward_pb2_grpc
from assay.rm_server import grpc_convert as convert
from assay.rm_server.config import Limits
from assay.rm_server.errors import error_type
from assay.rm_server.protocol import CompareRequest, ErrorInfo, ErrorType, ScoreRequest
from assay.rm_server.serving import RewardService

SERVICE = pb.DESCRIPTOR.services_by_name["RewardService"].full_name  # assay.reward.v1.RewardService
R = TypeVar("R", ScoreRequest, CompareRequest)


# --- errors: the one mapping from an exception to what the client is told ---------------------


def describe(exc: Exception) -> Failure:
    if isinstance(exc, ServiceError):
        return Failure(grpc_status(exc.status), error_type(exc).value, exc.message, exc.retry_after_s)
    if isinstance(exc, ValidationError):
        return invalid_argument(exc, ErrorType.invalid_request.value)
    if isinstance(exc, MalformedMessage):  # bytes that are not the request message
        return malformed(exc, ErrorType.invalid_request.value)
    return internal(exc, ErrorType.internal.value)


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

    def _timer(self, route: str, req: ScoreRequest | CompareRequest) -> Timer:
        return Timer(self.service.metrics, route, self.service.metrics.reward_label(req.reward))

    async def Score(self, request: pb.ScoreRequest, context) -> pb.ScoreResponse:
        req = _within_deadline(convert.score_request_from_proto(request), context)
        with self._timer("grpc/Score", req):
            return convert.score_response_to_proto(await self.service.score(req))

    async def Compare(self, request: pb.CompareRequest, context) -> pb.CompareResponse:
        req = _within_deadline(convert.compare_request_from_proto(request), context)
        with self._timer("grpc/Compare", req):
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
            with self._timer("grpc/ScoreStream", req):
                resp = await self.service.score(req)
            answer = convert.ScoreStreamAnswer(msg.request_id, response=resp)
        except Exception as exc:  # noqa: BLE001 - answered in-band, mapped by describe
            failure = describe(exc)
            info = ErrorInfo(type=failure.type, message=failure.message)
            answer = convert.ScoreStreamAnswer(msg.request_id, error=info, retry_after_s=failure.retry_after_s)
        return convert.score_stream_response_to_proto(answer)


# --- the server ------------------------------------------------------------------------------


async def start_grpc_server(
    service: RewardService, keys: ApiKeys, host: str, port: int, limits: Limits, tls: tuple[Path, Path] | None = None
) -> tuple[grpc.aio.Server, int]:
    """Start the gRPC server (RewardService, health, reflection), over TLS with `tls` (certificate and key
    files); returns it and its bound port."""
    return await grpc_serve.start_server(
        SERVICE,
        lambda server: reward_pb2_grpc.add_RewardServiceServicer_to_server(RewardServicer(service), server),
        AuthAndErrors(SERVICE, functools.partial(keys.check, scope="score"), describe),
        lambda: service.ready,
        host,
        port,
        tls=tls,
        max_receive_bytes=limits.max_body_bytes,
        # a response can outgrow its request (per-token scores), so the cap is looser
        max_send_bytes=4 * limits.max_body_bytes,
    )
