"""Wire types of the peers' reward protocols that rm_server speaks (`compat.py` serves them).

Each is the peer's own shape, read from its client code (the tests run that code):

- OpenRLHF (`openrlhf/utils/agent.py`, `_fetch_rewards_via_http`; `remote_rm_utils.py` before
  0.10): `{"query": [...], "prompts": [...], "labels": [...]}` -> `{"rewards", "scores",
  "extra_logs"}`. The trainer turns every `extra_logs` value into a tensor, so it holds numbers
  only, one per item; the reward id and the errors are fields beside it, which OpenRLHF ignores.
- slime (`slime/rollout/rm_hub/__init__.py`, `remote_rm`): `{"prompt", "response", "label"}` ->
  any JSON object, of which `--reward-key` picks one field: here `score`. A failed item is an
  error status (slime's client raises for it after its retries), never an object without a score.
- vLLM's pooling routes (`vllm/entrypoints/pooling/`): `/classify` and `/pooling` with `model`,
  `input` (one text or several) or chat `messages`, and `use_activation` (`activation` and
  `softmax` are its older names, which veRL's reward loop still sends); SGLang's reward shape
  of `/v1/embeddings`; vLLM's `/score` (`text_1`, `text_2`).

Unknown fields are ignored, not refused: a peer adds fields between releases (vLLM's `priority`,
`request_id`, `user`, ...), and a drop-in must take its requests unchanged. Numbers sent as a
label are read as their text.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from assay.rm_server.protocol import ChatMessage, ErrorInfo


class _Peer(BaseModel):
    model_config = ConfigDict(extra="ignore")


def _label_text(value: object) -> object:
    """A label sent as a number (`42`, `0.5`) is its text; other values are left to validation."""
    return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


# --- OpenRLHF ----------------------------------------------------------------------------------


class OpenRLHFRequest(_Peer):
    query: list[str] = Field(description="Prompt and response as one decoded text, special tokens and all.")
    prompts: list[str] = Field(description="Each query's prompt: the text its query starts with.")
    labels: list[str | None] | None = Field(default=None, description="References, one per query (or null).")

    @field_validator("labels", mode="before")
    @classmethod
    def _numbers_as_text(cls, v: object) -> object:
        return [_label_text(x) for x in v] if isinstance(v, list) else v


class OpenRLHFResponse(BaseModel):
    rewards: list[float]
    scores: list[float]
    extra_logs: dict[str, list[float]] = Field(
        description="`assay_failed`: 1 for an item that failed and got `--openrlhf-failed-reward`, else 0."
    )
    reward: str
    reward_id: str
    errors: list[ErrorInfo | None] = Field(description="Why each failed item failed; null for the others.")


# --- slime -------------------------------------------------------------------------------------


class SlimeRequest(_Peer):
    prompt: str | Annotated[list[ChatMessage], Field(min_length=1)] = Field(
        description="The prompt as text, or as a conversation."
    )
    response: str
    label: str | None = None

    @field_validator("label", mode="before")
    @classmethod
    def _number_as_text(cls, v: object) -> object:
        return _label_text(v)


class SlimeResponse(BaseModel):
    """The answer; a failed item is an error status with the `ErrorResponse` body instead."""

    score: float
    reward: str
    reward_id: str


# --- vLLM pooling shapes -----------------------------------------------------------------------


class PoolingRequest(_Peer):
    """vLLM's classify and pooling requests (completion or chat form), and SGLang's embeddings one."""

    model: str | None = Field(
        default=None,
        description="The reward's name (or its checkpoint's path, as vLLM names a model); "
        "null: the one model reward served.",
    )
    input: str | list[str] | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    use_activation: bool | None = Field(
        default=None,
        description="null: the reward's own scores; true: sigmoid of the logit; false: the raw logit.",
    )
    activation: bool | None = Field(default=None, description="vLLM's older name of `use_activation`.")
    softmax: bool | None = Field(default=None, description="vLLM's oldest name of `use_activation`.")
    add_special_tokens: bool | None = Field(
        default=None, description="Add the tokenizer's special tokens (default: yes for `input`, no for `messages`)."
    )
    truncate_prompt_tokens: int | None = Field(default=None, description="Only -1 or null: the spec truncates.")

    def activation_choice(self) -> bool | None:
        """vLLM's `get_use_activation`: the newest of the three names that is set."""
        for value in (self.use_activation, self.activation, self.softmax):
            if value is not None:
                return value
        return None


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = 0


def _now() -> int:
    return int(time.time())


class ClassificationData(BaseModel):
    index: int
    label: str | None
    probs: list[float]
    num_classes: int


class ClassificationResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"classify-{uuid.uuid4().hex}")
    object: str = "list"
    created: int = Field(default_factory=_now)
    model: str
    data: list[ClassificationData]
    usage: Usage
    reward_id: str


class PoolingData(BaseModel):
    index: int
    object: str = "pooling"
    data: list[float]


class PoolingResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"pool-{uuid.uuid4().hex}")
    object: str = "list"
    created: int = Field(default_factory=_now)
    model: str
    data: list[PoolingData]
    usage: Usage
    reward_id: str


class EmbeddingData(BaseModel):
    index: int
    object: Literal["embedding"] = "embedding"
    embedding: list[float]


class EmbeddingResponse(BaseModel):
    """SGLang's answer for a reward model on `/v1/embeddings`: the raw score as a one-float embedding."""

    object: str = "list"
    model: str
    data: list[EmbeddingData]
    usage: Usage
    reward_id: str


class VllmScoreRequest(_Peer):
    """vLLM's `/score`: `text_1` against `text_2`, one to one, one to many, or pairwise lists."""

    model: str | None = None
    text_1: str | list[str]
    text_2: str | list[str]
    use_activation: bool | None = None
    activation: bool | None = None
    softmax: bool | None = None


class ScoreData(BaseModel):
    index: int
    object: str = "score"
    score: float


class VllmScoreResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"score-{uuid.uuid4().hex}")
    object: str = "list"
    created: int = Field(default_factory=_now)
    model: str
    data: list[ScoreData]
    usage: Usage
    reward_id: str
