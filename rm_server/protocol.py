"""Wire types of the reward service: the JSON that HTTP speaks and the clients parse.

Nothing heavy is imported here (no torch), so clients and tests can import these cheaply. The
gRPC contract in `proto/reward/v1/reward.proto` mirrors these models field for field; the
conversion lives in `rm_server/grpc_convert.py`, used by the server's and the clients' gRPC edges.

A rule the serving layer enforces with a message of its own (at least one item) is stated in the
schema only (`json_schema_extra`), so that the OpenAPI schema says what the code enforces.
"""

from __future__ import annotations

from enum import Enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Wire(BaseModel):
    # Unknown fields are refused so that a typo (`"refernce"`) is an error, not a silent default.
    model_config = ConfigDict(extra="forbid")


class Granularity(str, Enum):
    """What a score covers: the whole response, each step, or every prefix (token by token)."""

    outcome = "outcome"
    steps = "steps"
    tokens = "tokens"


class ErrorType(str, Enum):
    """Why one item (or a whole request) failed. A failed item never carries a score."""

    invalid_input = "invalid_input"
    too_long = "too_long"
    timeout = "timeout"
    judge_unavailable = "judge_unavailable"
    judge_error = "judge_error"
    dependency_failed = "dependency_failed"
    internal = "internal"
    # request-level only
    invalid_request = "invalid_request"
    unknown_reward = "unknown_reward"
    payload_too_large = "payload_too_large"
    overloaded = "overloaded"
    unauthenticated = "unauthenticated"
    permission_denied = "permission_denied"
    not_ready = "not_ready"


class ErrorInfo(_Wire):
    type: ErrorType
    message: str


class ErrorResponse(_Wire):
    """Body of every 4xx/5xx answer."""

    error: ErrorInfo


# --- /v1/score -------------------------------------------------------------------------------


class ScoreItem(_Wire):
    id: str = Field(min_length=1, max_length=256, description="Echoed back; unique within a request.")
    prompt: str = Field(description="The prompt exactly as the policy saw it.")
    response: str = Field(description="The completion under judgement.")
    reference: str | None = Field(default=None, description="Reference answer, for rules that need one.")


class ScoreRequest(_Wire):
    reward: str = Field(min_length=1, description="Reward name, as listed by GET /v1/rewards.")
    items: list[ScoreItem] = Field(json_schema_extra={"minItems": 1})  # enforced by serving: "`items` is empty"
    granularity: Granularity = Granularity.outcome
    timeout_s: float | None = Field(
        default=None, gt=0, description="Deadline for the whole request; unfinished items fail with `timeout`."
    )


class TokenScore(_Wire):
    """The reward of the response prefix ending with this token."""

    text: str
    score: float


class ItemResult(_Wire):
    id: str
    score: float | None = Field(description="null exactly when `error` is set.")
    error: ErrorInfo | None = None
    steps: list[float] | None = Field(default=None, description="Per-step scores (granularity steps).")
    tokens: list[TokenScore] | None = Field(default=None, description="Per-prefix scores (granularity tokens).")


class ScoreResponse(_Wire):
    reward: str
    reward_id: str
    results: list[ItemResult] = Field(description="One per request item, in request order.")


# --- /v1/compare -----------------------------------------------------------------------------


class CompareItem(_Wire):
    id: str = Field(min_length=1, max_length=256)
    prompt: str
    response_a: str
    response_b: str
    reference: str | None = None


class CompareRequest(_Wire):
    reward: str = Field(min_length=1)
    items: list[CompareItem] = Field(json_schema_extra={"minItems": 1})
    timeout_s: float | None = Field(default=None, gt=0)


class CompareResult(_Wire):
    id: str
    prob_a: float | None = Field(description="P(response_a is better), position bias cancelled; null on error.")
    winner: Literal["a", "b", "tie"] | None = None
    scores: list[float] | None = Field(default=None, description="[score_a, score_b] for pointwise rewards.")
    error: ErrorInfo | None = None


class CompareResponse(_Wire):
    reward: str
    reward_id: str
    results: list[CompareResult]


# --- /v1/rewards, health ---------------------------------------------------------------------


class RewardInfo(_Wire):
    name: str
    type: str
    reward_id: str
    needs_reference: bool
    granularities: list[Granularity]
    pairwise: bool = Field(description="True when the reward only compares (POST /v1/compare).")


class RewardsResponse(_Wire):
    rewards: list[RewardInfo]


class HealthResponse(_Wire):
    status: Literal["ok", "starting", "stopping"]
