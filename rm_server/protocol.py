"""Wire types of the reward service: the JSON that HTTP speaks and the clients parse.

Nothing heavy is imported here (no torch), so clients and tests can import these cheaply. The
gRPC contract in `proto/reward/v1/reward.proto` mirrors these models field for field; the
conversion lives in `rm_server/grpc_convert.py`, used by the server's and the clients' gRPC edges.

A rule the serving layer enforces with a message of its own (at least one item) is stated in the
schema only (`json_schema_extra`), so that the OpenAPI schema says what the code enforces.

The prompt of an item is either text (`prompt`, exactly as the policy saw it) or a conversation
(`messages`, the turns before the response); exactly one of the two. A reward that reads text
renders a conversation itself (a model reward with `chat_template: true`, through its own
tokenizer's template), so the policy's template never decides what another model reads.
`metadata` carries a dataset row's other columns to the reward, as a JSON object.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.config import JsonDict


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
    remote_unavailable = "remote_unavailable"  # a remote reward's server is down, overloaded or gone (retryable)
    remote_error = "remote_error"  # it answered with an error, or with something that is not a score for the item
    dependency_failed = "dependency_failed"
    internal = "internal"
    overloaded = "overloaded"  # a request: the queue is full; an item: its batch ran out of memory (both retryable)
    # request-level only
    invalid_request = "invalid_request"
    unknown_reward = "unknown_reward"
    payload_too_large = "payload_too_large"
    unauthenticated = "unauthenticated"
    permission_denied = "permission_denied"
    not_ready = "not_ready"


class ErrorInfo(_Wire):
    type: ErrorType
    message: str


class ErrorResponse(_Wire):
    """Body of every 4xx/5xx answer."""

    error: ErrorInfo


# --- items: a prompt as text or as a conversation --------------------------------------------


class ChatMessage(_Wire):
    """One turn of a conversation, as chat templates take it: a role and its text."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str


_ONE_PROMPT = "give exactly one of `prompt` (the prompt as text) and `messages` (the prompt as a conversation)"
# Stated in the schema too: an item object has `prompt` or `messages`, not both.
_ONE_PROMPT_SCHEMA: JsonDict = {"oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}]}


class _Item(_Wire):
    """What score and compare items share: an id, the prompt (text or conversation), a reference
    and metadata."""

    model_config = ConfigDict(json_schema_extra=_ONE_PROMPT_SCHEMA)

    id: str = Field(min_length=1, max_length=256, description="Echoed back; unique within a request.")
    prompt: str | None = Field(default=None, description="The prompt exactly as the policy saw it (text).")
    messages: list[ChatMessage] | None = Field(
        default=None,
        min_length=1,
        description="The prompt as a conversation (the turns before the response); instead of `prompt`.",
    )
    reference: str | None = Field(default=None, description="Reference answer, for rules that need one.")
    metadata: dict[str, Any] | None = Field(
        default=None, description="Other columns of the item's dataset row, passed to the reward as they are."
    )

    @model_validator(mode="after")
    def _one_prompt(self) -> Self:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError(_ONE_PROMPT)
        return self

    @property
    def conversation(self) -> str | list[dict[str, str]]:
        """The prompt as the rewards take it: the text, or the messages as plain dicts."""
        if self.messages is not None:
            return [m.model_dump() for m in self.messages]
        assert self.prompt is not None  # exactly one (validated)
        return self.prompt


# --- /v1/score -------------------------------------------------------------------------------


class ScoreItem(_Item):
    response: str = Field(description="The completion under judgement.")


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


class CompareItem(_Item):
    response_a: str
    response_b: str


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
    pinned: bool = Field(
        description="True when the reward id pins everything the score depends on (rules, local checkpoints); "
        "false for a reward another server computes (judge, remote.*): its id names that server, model and "
        "template, not the weights behind them."
    )


class RewardsResponse(_Wire):
    rewards: list[RewardInfo]


class HealthResponse(_Wire):
    status: Literal["ok", "starting", "stopping"]
