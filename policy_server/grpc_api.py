"""The gRPC adapter (`assay.policy.v1.PolicyService`): a thin servicer over `serving.PolicyService`.

Generate is /v1/completions for one prompt: the proto request becomes a `CompletionRequest` (with
token ids always returned), `PolicyService.completions` serves it, and its response becomes the
proto response. So validation, limits, batching, the timeout and the seeds are HTTP's, and the
same request gives the same completions on either edge. No streaming: the serving layer answers
when every choice is done.

Auth and errors are handled in one place, the shared `assay.base.grpc_serve.AuthAndErrors`, with the
`generate` scope and `describe` below: an `ApiError` becomes the status matching its HTTP status
(INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED with `retry-after`, DEADLINE_EXCEEDED, ...),
with its message as details and its OpenAI `type` and `code` as `error-type` and `error-code`
trailers; bytes that do not parse as the request message get INVALID_ARGUMENT. A client that
cancels (or whose deadline passes) has its call's task cancelled, which drops its queued
sequences and stops its running ones, as an HTTP disconnect does.
"""

from __future__ import annotations

import functools
from pathlib import Path

import grpc
from pydantic import ValidationError

from assay.base import grpc_serve
from assay.base.auth import ApiKeys
from assay.base.errors import grpc_status
from assay.base.grpc_serve import AuthAndErrors, Failure, MalformedMessage, internal, invalid_argument, malformed
from assay.base.metrics import Timer
from assay.policy_server import grpc_convert as convert
from assay.policy_server.config import Limits
from assay.policy_server.errors import ApiError, check_key
from assay.policy_server.serving import PolicyService
from assay.proto.policy.v1 import policy_pb2 as pb
from assay.proto.policy.v1 import policy_pb2_grpc

SERVICE = pb.DESCRIPTOR.services_by_name["PolicyService"].full_name  # assay.policy.v1.PolicyService


# --- errors: the one mapping from an exception to what the client is told ---------------------


def describe(exc: Exception) -> Failure:
    if isinstance(exc, ApiError):
        return Failure(grpc_status(exc.status), exc.type, exc.message, exc.retry_after_s, exc.code)
    if isinstance(exc, ValidationError):
        return invalid_argument(exc, "invalid_request_error")
    if isinstance(exc, MalformedMessage):  # bytes that are not the request message
        return malformed(exc, "invalid_request_error")
    return internal(exc, "server_error")


# --- the servicer and the server -------------------------------------------------------------


class PolicyServicer(policy_pb2_grpc.PolicyServiceServicer):
    def __init__(self, service: PolicyService) -> None:
        self.service = service

    async def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        req = convert.generate_request_from_proto(request)
        with Timer(self.service.metrics, "grpc/Generate", self.service.model_label(req.model)):
            return convert.generate_response_to_proto(await self.service.completions(req))

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        return convert.models_to_proto(self.service.models())


async def start_grpc_server(
    service: PolicyService, keys: ApiKeys, host: str, port: int, limits: Limits, tls: tuple[Path, Path] | None = None
) -> tuple[grpc.aio.Server, int]:
    """Start the gRPC server (PolicyService, health, reflection), over TLS with `tls` (certificate and key
    files); returns it and its bound port."""
    return await grpc_serve.start_server(
        SERVICE,
        lambda server: policy_pb2_grpc.add_PolicyServiceServicer_to_server(PolicyServicer(service), server),
        AuthAndErrors(SERVICE, functools.partial(check_key, keys, scope="generate"), describe),
        lambda: service.ready,
        host,
        port,
        tls=tls,
        max_receive_bytes=limits.max_body_bytes,
        # no cap: n and max_tokens bound a response, and a client sets the size it will receive
        max_send_bytes=-1,
    )
