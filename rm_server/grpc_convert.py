"""Conversion between the pydantic wire types (`protocol.py`) and the protobuf messages.

The gRPC contract (`proto/reward/v1/reward.proto`) mirrors the protocol models field for field;
these pure functions are the only place the two meet, used by the servicer (`grpc_api.py`) and
by the clients' gRPC transport. No torch, no grpc runtime: protobuf and pydantic only.

    score_request_to_proto(ScoreRequest) -> pb.ScoreRequest
    score_request_from_proto(pb.ScoreRequest) -> ScoreRequest            (validates)
    score_response_to_proto(ScoreResponse) -> pb.ScoreResponse
    score_response_from_proto(pb.ScoreResponse) -> ScoreResponse         (validates)
    score_stream_request_to_proto(request_id, ScoreRequest) -> pb.ScoreStreamRequest
    score_stream_response_to_proto(ScoreStreamAnswer) -> pb.ScoreStreamResponse
    score_stream_response_from_proto(pb.ScoreStreamResponse) -> ScoreStreamAnswer
    compare_request_to_proto / compare_request_from_proto               (CompareRequest)
    compare_response_to_proto / compare_response_from_proto             (CompareResponse)
    rewards_response_to_proto / rewards_response_from_proto             (RewardsResponse)
    error_info_to_proto / error_info_from_proto                         (ErrorInfo)

Every `*_from_proto` builds its model with `model_validate`, so a message that breaks the
protocol's rules (empty reward name, empty item id, timeout_s <= 0, an enum number this side
does not know) raises pydantic's `ValidationError` listing the problems. Absent and empty are
kept apart: optional scalars and the `Scores`/`TokenScores` wrappers carry presence, so `None`
and `[]` round-trip exactly. Enums map by name (`steps` <-> GRANULARITY_STEPS).

An item's prompt is the `input` oneof (text `prompt` or a `Conversation` of messages), so
"exactly one" holds on the wire; `metadata` travels as JSON text (`metadata_json`), which keeps
integers integers (a `google.protobuf.Struct` would turn them into doubles). Text that is not a
JSON object is refused like any other protocol break, as a `ValidationError` naming the item.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from typing import Any

from pydantic import ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from assay.proto.reward.v1 import reward_pb2 as pb
from assay.rm_server.protocol import (
    CompareItem,
    CompareRequest,
    CompareResponse,
    ErrorInfo,
    RewardsResponse,
    ScoreItem,
    ScoreRequest,
    ScoreResponse,
)

__all__ = [
    "ScoreStreamAnswer",
    "compare_request_from_proto",
    "compare_request_to_proto",
    "compare_response_from_proto",
    "compare_response_to_proto",
    "error_info_from_proto",
    "error_info_to_proto",
    "rewards_response_from_proto",
    "rewards_response_to_proto",
    "score_request_from_proto",
    "score_request_to_proto",
    "score_response_from_proto",
    "score_response_to_proto",
    "score_stream_request_to_proto",
    "score_stream_response_from_proto",
    "score_stream_response_to_proto",
]


# --- enums: by name, `<PREFIX>_<VALUE IN CAPITALS>` ------------------------------------------


_ENUMS = {"GRANULARITY": pb.Granularity, "ERROR_TYPE": pb.ErrorType, "WINNER": pb.Winner}


def _enum_to_proto(prefix: str, value: Enum | str) -> Any:
    """The proto enum number for a protocol value (typed Any: the generated stubs give each enum field
    its own class, and which one `prefix` names is known only here, at run time)."""
    text = value.value if isinstance(value, Enum) else value
    return _ENUMS[prefix].Value(f"{prefix}_{text.upper()}")


def _enum_from_proto(prefix: str, number: int) -> str | int:
    """The protocol's value for a proto enum number; an unknown number is passed on as is, for
    validation to refuse with a message naming the allowed values."""
    try:
        name = _ENUMS[prefix].Name(number)
    except ValueError:
        return number
    return name.removeprefix(prefix + "_").lower()


def _optional(msg: Any, field: str) -> Any:
    return getattr(msg, field) if msg.HasField(field) else None


# --- errors ----------------------------------------------------------------------------------


def error_info_to_proto(info: ErrorInfo) -> pb.ErrorInfo:
    return pb.ErrorInfo(type=_enum_to_proto("ERROR_TYPE", info.type), message=info.message)


def _error_info_data(msg: pb.ErrorInfo) -> dict[str, Any]:
    return {"type": _enum_from_proto("ERROR_TYPE", msg.type), "message": msg.message}


def error_info_from_proto(msg: pb.ErrorInfo) -> ErrorInfo:
    return ErrorInfo.model_validate(_error_info_data(msg))


# --- items: the prompt (text or conversation) and the metadata --------------------------------


def _prompt_to_proto(item: ScoreItem | CompareItem) -> dict[str, Any]:
    """The item's `input` oneof and metadata, as keyword arguments of its proto message."""
    messages = None
    if item.messages is not None:
        messages = pb.Conversation(messages=[pb.ChatMessage(role=m.role, content=m.content) for m in item.messages])
    return {
        "prompt": item.prompt,
        "messages": messages,
        "metadata_json": json.dumps(item.metadata) if item.metadata is not None else None,
    }


def _prompt_data(msg: pb.ScoreItem | pb.CompareItem, where: tuple[str | int, ...], model: str) -> dict[str, Any]:
    """The item's prompt fields as protocol data; `metadata_json` that is no JSON object is refused."""
    data: dict[str, Any] = {}
    which = msg.WhichOneof("input")
    if which == "prompt":
        data["prompt"] = msg.prompt
    elif which == "messages":
        data["messages"] = [{"role": m.role, "content": m.content} for m in msg.messages.messages]
    if msg.HasField("metadata_json"):
        try:
            data["metadata"] = metadata = json.loads(msg.metadata_json)
        except json.JSONDecodeError as exc:
            raise _invalid(model, (*where, "metadata_json"), msg.metadata_json, f"is not JSON ({exc})") from None
        if not isinstance(metadata, dict):
            raise _invalid(model, (*where, "metadata_json"), msg.metadata_json, "is JSON but not an object")
    return data


def _invalid(model: str, loc: tuple[str | int, ...], value: str, why: str) -> ValidationError:
    error = PydanticCustomError("metadata_json", "metadata_json {why}", {"why": why})
    return ValidationError.from_exception_data(model, [InitErrorDetails(type=error, loc=loc, input=value[:200])])


# --- score -----------------------------------------------------------------------------------


def score_request_to_proto(req: ScoreRequest) -> pb.ScoreRequest:
    return pb.ScoreRequest(
        reward=req.reward,
        items=[
            pb.ScoreItem(id=i.id, response=i.response, reference=i.reference, **_prompt_to_proto(i)) for i in req.items
        ],
        granularity=_enum_to_proto("GRANULARITY", req.granularity),
        timeout_s=req.timeout_s,
    )


def score_request_from_proto(msg: pb.ScoreRequest) -> ScoreRequest:
    data: dict[str, Any] = {
        "reward": msg.reward,
        "items": [
            {
                "id": i.id,
                "response": i.response,
                "reference": _optional(i, "reference"),
                **_prompt_data(i, ("items", n), "ScoreRequest"),
            }
            for n, i in enumerate(msg.items)
        ],
        "timeout_s": _optional(msg, "timeout_s"),
    }
    if msg.granularity != pb.GRANULARITY_UNSPECIFIED:  # unspecified: the protocol's default
        data["granularity"] = _enum_from_proto("GRANULARITY", msg.granularity)
    return ScoreRequest.model_validate(data)


def score_response_to_proto(resp: ScoreResponse) -> pb.ScoreResponse:
    return pb.ScoreResponse(
        reward=resp.reward,
        reward_id=resp.reward_id,
        results=[
            pb.ItemResult(
                id=r.id,
                score=r.score,
                error=error_info_to_proto(r.error) if r.error is not None else None,
                steps=pb.Scores(values=r.steps) if r.steps is not None else None,
                tokens=(
                    pb.TokenScores(values=[pb.TokenScore(text=t.text, score=t.score) for t in r.tokens])
                    if r.tokens is not None
                    else None
                ),
            )
            for r in resp.results
        ],
    )


def score_response_from_proto(msg: pb.ScoreResponse) -> ScoreResponse:
    results = [
        {
            "id": r.id,
            "score": _optional(r, "score"),
            "error": _error_info_data(r.error) if r.HasField("error") else None,
            "steps": list(r.steps.values) if r.HasField("steps") else None,
            "tokens": [{"text": t.text, "score": t.score} for t in r.tokens.values] if r.HasField("tokens") else None,
        }
        for r in msg.results
    ]
    return ScoreResponse.model_validate({"reward": msg.reward, "reward_id": msg.reward_id, "results": results})


# --- score stream ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoreStreamAnswer:
    """One answer on the ScoreStream: the response, or the error that failed the whole request
    (with `retry_after_s` when the server was overloaded)."""

    request_id: str
    response: ScoreResponse | None = None
    error: ErrorInfo | None = None
    retry_after_s: float | None = None


def score_stream_request_to_proto(request_id: str, req: ScoreRequest) -> pb.ScoreStreamRequest:
    return pb.ScoreStreamRequest(request_id=request_id, request=score_request_to_proto(req))


def score_stream_response_to_proto(answer: ScoreStreamAnswer) -> pb.ScoreStreamResponse:
    return pb.ScoreStreamResponse(
        request_id=answer.request_id,
        response=score_response_to_proto(answer.response) if answer.response is not None else None,
        error=error_info_to_proto(answer.error) if answer.error is not None else None,
        retry_after_s=answer.retry_after_s,
    )


def score_stream_response_from_proto(msg: pb.ScoreStreamResponse) -> ScoreStreamAnswer:
    which = msg.WhichOneof("result")
    if which is None:
        raise ValueError(f"stream answer {msg.request_id!r} holds neither a response nor an error")
    return ScoreStreamAnswer(
        request_id=msg.request_id,
        response=score_response_from_proto(msg.response) if which == "response" else None,
        error=error_info_from_proto(msg.error) if which == "error" else None,
        retry_after_s=_optional(msg, "retry_after_s"),
    )


# --- compare ---------------------------------------------------------------------------------


def compare_request_to_proto(req: CompareRequest) -> pb.CompareRequest:
    return pb.CompareRequest(
        reward=req.reward,
        items=[
            pb.CompareItem(
                id=i.id,
                response_a=i.response_a,
                response_b=i.response_b,
                reference=i.reference,
                **_prompt_to_proto(i),
            )
            for i in req.items
        ],
        timeout_s=req.timeout_s,
    )


def compare_request_from_proto(msg: pb.CompareRequest) -> CompareRequest:
    items = [
        {
            "id": i.id,
            "response_a": i.response_a,
            "response_b": i.response_b,
            "reference": _optional(i, "reference"),
            **_prompt_data(i, ("items", n), "CompareRequest"),
        }
        for n, i in enumerate(msg.items)
    ]
    return CompareRequest.model_validate(
        {"reward": msg.reward, "items": items, "timeout_s": _optional(msg, "timeout_s")}
    )


def compare_response_to_proto(resp: CompareResponse) -> pb.CompareResponse:
    return pb.CompareResponse(
        reward=resp.reward,
        reward_id=resp.reward_id,
        results=[
            pb.CompareResult(
                id=r.id,
                prob_a=r.prob_a,
                winner=_enum_to_proto("WINNER", r.winner) if r.winner is not None else pb.WINNER_UNSPECIFIED,
                scores=pb.Scores(values=r.scores) if r.scores is not None else None,
                error=error_info_to_proto(r.error) if r.error is not None else None,
            )
            for r in resp.results
        ],
    )


def compare_response_from_proto(msg: pb.CompareResponse) -> CompareResponse:
    results = [
        {
            "id": r.id,
            "prob_a": _optional(r, "prob_a"),
            "winner": _enum_from_proto("WINNER", r.winner) if r.winner != pb.WINNER_UNSPECIFIED else None,
            "scores": list(r.scores.values) if r.HasField("scores") else None,
            "error": _error_info_data(r.error) if r.HasField("error") else None,
        }
        for r in msg.results
    ]
    return CompareResponse.model_validate({"reward": msg.reward, "reward_id": msg.reward_id, "results": results})


# --- rewards ---------------------------------------------------------------------------------


def rewards_response_to_proto(resp: RewardsResponse) -> pb.RewardsResponse:
    return pb.RewardsResponse(
        rewards=[
            pb.RewardInfo(
                name=r.name,
                type=r.type,
                reward_id=r.reward_id,
                needs_reference=r.needs_reference,
                granularities=[_enum_to_proto("GRANULARITY", g) for g in r.granularities],
                pairwise=r.pairwise,
                pinned=r.pinned,
            )
            for r in resp.rewards
        ]
    )


def rewards_response_from_proto(msg: pb.RewardsResponse) -> RewardsResponse:
    rewards = [
        {
            "name": r.name,
            "type": r.type,
            "reward_id": r.reward_id,
            "needs_reference": r.needs_reference,
            "granularities": [_enum_from_proto("GRANULARITY", g) for g in r.granularities],
            "pairwise": r.pairwise,
            "pinned": r.pinned,
        }
        for r in msg.rewards
    ]
    return RewardsResponse.model_validate({"rewards": rewards})
