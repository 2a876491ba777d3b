"""The gRPC adapter (`assay.policy.v1.PolicyService`): a thin servicer over `serving.PolicyService`.

Generate is /v1/completions for one prompt: the proto request becomes a `CompletionRequest` (with
token ids always returned), `PolicyService.completions` serves it, and its response becomes the
proto response. So validation, limits, batching, the timeout and the seeds are HTTP's, and the
same request gives the same completions on either edge. No streaming: the serving layer answers
when every choice is done.

Auth and errors are handled in one place, the shared `assay.grpc_serve.AuthAndErrors`, with the
`generate` scope and `describe` below: an `ApiError` becomes the status matching its HTTP status
(INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED with `retry-after`, DEADLINE_EXCEEDED, ...),
with its message as details and its OpenAI `type` and `code` as `error-type` and `error-code`
trailers; bytes that do not parse as the request message get INVALID_ARGUMENT. A client that
cancels (or whose deadline passes) has its call's task cancelled, which drops its queued
sequences and stops its running ones, as an HTTP disconnect does.
"""

from __future__ import annotations

import functools
from typing import Any

import grpc
from pydantic import ValidationError

from assay import grpc_serve
from assay.grpc_serve import AuthAndErrors, Failure, MalformedMessage, internal, invalid_argument, malformed
from assay.policy_server.config import Limits
from assay.policy_server.protocol import CompletionLogprobs, CompletionRequest, CompletionResponse, ModelList
from assay.policy_server.serving import ApiError, InvalidRequest, PolicyService, Timer, check_key
from assay.proto.policy.v1 import policy_pb2 as pb
from assay.proto.policy.v1 import policy_pb2_grpc
from assay.rm_server.auth import ApiKeys

SERVICE = pb.DESCRIPTOR.services_by_name["PolicyService"].full_name  # assay.policy.v1.PolicyService
_OPTIONAL = ("n", "max_tokens", "temperature", "top_p", "seed", "logprobs")  # absent: HTTP's default


# --- errors: the one mapping from an exception to what the client is told ---------------------


_STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    500: grpc.StatusCode.INTERNAL,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def describe(exc: Exception) -> Failure:
    if isinstance(exc, ApiError):
        return Failure(_STATUS[exc.status], exc.type, exc.message, exc.retry_after_s, exc.code)
    if isinstance(exc, ValidationError):
        return invalid_argument(exc, "invalid_request_error")
    if isinstance(exc, MalformedMessage):  # bytes that are not the request message
        return malformed(exc, "invalid_request_error")
    return internal(exc, "server_error")


# --- conversion ------------------------------------------------------------------------------


def generate_request_from_proto(msg: pb.GenerateRequest) -> CompletionRequest:
    """The completions request Generate stands for; raises ValidationError as a JSON body would."""
    if msg.prompt and msg.prompt_token_ids:
        raise InvalidRequest("send prompt or prompt_token_ids, not both", param="prompt")
    data: dict[str, Any] = {
        "model": msg.model,
        "prompt": list(msg.prompt_token_ids) or msg.prompt,  # neither: "", refused as an empty prompt
        "top_k": msg.top_k,
        "stop": list(msg.stop),
        "ignore_eos": msg.ignore_eos,
        "return_token_ids": True,
        **{name: getattr(msg, name) for name in _OPTIONAL if msg.HasField(name)},
    }
    return CompletionRequest.model_validate(data)


def generate_response_to_proto(resp: CompletionResponse) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        model=resp.model,
        choices=[
            pb.Choice(
                index=c.index,
                text=c.text,
                token_ids=c.token_ids,
                logprobs=_logprobs_to_proto(c.logprobs) if c.logprobs is not None else None,
                finish_reason=pb.FinishReason.Value(f"FINISH_REASON_{c.finish_reason.upper()}"),
                stop_reason=c.stop_reason,
                weight_version=c.weight_version,
            )
            for c in resp.choices
        ],
        usage=pb.Usage(**resp.usage.model_dump()),
        weight_version=resp.weight_version,
        prompt_token_ids=resp.choices[0].prompt_token_ids,  # one prompt: every choice has the same
    )


def _logprobs_to_proto(lp: CompletionLogprobs) -> pb.Logprobs:
    return pb.Logprobs(
        tokens=lp.tokens,
        token_logprobs=lp.token_logprobs,
        top_logprobs=[
            pb.TopLogprobs(values=[pb.TopLogprob(token=t, logprob=v) for t, v in top.items()])
            for top in lp.top_logprobs
        ],
        text_offset=lp.text_offset,
    )


def models_to_proto(models: ModelList) -> pb.ListModelsResponse:
    return pb.ListModelsResponse(models=[
        pb.ModelInfo(name=m.id, max_model_len=m.max_model_len, weight_version=m.weight_version) for m in models.data
    ])  # fmt: skip


# --- the servicer and the server -------------------------------------------------------------


class PolicyServicer(policy_pb2_grpc.PolicyServiceServicer):
    def __init__(self, service: PolicyService) -> None:
        self.service = service

    async def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        req = generate_request_from_proto(request)
        with Timer(self.service.metrics, "grpc/Generate", self.service.model_label(req.model)):
            return generate_response_to_proto(await self.service.completions(req))

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        return models_to_proto(self.service.models())


async def start_grpc_server(
    service: PolicyService, keys: ApiKeys, host: str, port: int, limits: Limits
) -> tuple[grpc.aio.Server, int]:
    """Start the gRPC server (PolicyService, health, reflection); returns it and its bound port."""
    return await grpc_serve.start_server(
        SERVICE,
        lambda server: policy_pb2_grpc.add_PolicyServiceServicer_to_server(PolicyServicer(service), server),
        AuthAndErrors(SERVICE, functools.partial(check_key, keys, scope="generate"), describe),
        lambda: service.ready,
        host,
        port,
        max_receive_bytes=limits.max_body_bytes,
        # no cap: n and max_tokens bound a response, and a client sets the size it will receive
        max_send_bytes=-1,
    )
