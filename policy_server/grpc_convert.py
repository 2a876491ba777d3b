"""Conversion between the policy service's protocol models and its protobuf messages (`assay.policy.v1`).

The gRPC edge speaks protobuf, the serving layer the pydantic models of `protocol.py`; this module
is the only place one becomes the other, as `rm_server.grpc_convert` is for the reward service.
Generate is /v1/completions for one prompt: `generate_request_from_proto` builds the
`CompletionRequest` it stands for (token ids always returned; a field the message leaves unset takes
HTTP's default), validated by the same pydantic model, so a field out of range raises
`pydantic.ValidationError` just as a JSON body would. No torch, no grpc server here.
"""

from __future__ import annotations

from typing import Any

from assay.policy_server.errors import InvalidRequest
from assay.policy_server.protocol import CompletionLogprobs, CompletionRequest, CompletionResponse, ModelList
from assay.proto.policy.v1 import policy_pb2 as pb

_OPTIONAL = ("n", "max_tokens", "temperature", "top_p", "seed", "logprobs")  # absent: HTTP's default
_FINISH_REASONS = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}


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
                finish_reason=_FINISH_REASONS[c.finish_reason],
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
    return pb.ListModelsResponse(
        models=[
            pb.ModelInfo(name=m.id, max_model_len=m.max_model_len, weight_version=m.weight_version) for m in models.data
        ]
    )
