"""Wire types of the policy server: the OpenAI-compatible JSON it speaks.

The shapes follow OpenAI's completions, chat completions and models APIs, so the official
`openai` client works unchanged. Extensions, all optional: `top_k`, `ignore_eos` and
`return_token_ids` on requests (as vLLM names them), `stop_reason` on completion choices (vLLM's
too), and `weight_version` on every generation response: the version of the weights that
produced it (0 until weights are updated). Beside
them, this server's own `/v1/search` (`SearchRequest` -> `SearchResponse`): inference-time
search over a served model, scored by rm_server. Its `answer` is `assay.answers.Extract`, the
one answer-extraction config (standard library only, so this module stays light).

Requests refuse unknown fields, so a typo is a 400 and not a silent default. OpenAI fields this
server does not implement (`echo`, penalties, ...) are accepted only at their neutral
values, and refused with a message otherwise. `stream: true` answers with server-sent events
of the chunk models at the end of this module (`streaming.py` builds them).

Rules the serving layer enforces with messages of its own (no empty prompt or stop string, the
neutral values above, a reward for every strategy but majority) are stated in the schema only
(`json_schema_extra`, `WithJsonSchema`), so that the OpenAPI schema says what the code enforces.

Nothing heavy is imported here (no torch), so clients and tests can import these cheaply.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, model_validator
from pydantic.json_schema import JsonDict

from assay.answers import Extract

MAX_SEED = 2**63 - 1
# search.STRATEGIES' names (a test keeps the two equal; importing search here would not be light)
SEARCH_STRATEGIES = ("best_of_n", "weighted_best_of_n", "majority", "refine", "beam_search", "dvts")
NO_REWARD_STRATEGIES = ("majority",)  # they score nothing

# schemas of what serving refuses with its own messages
_TEXT: JsonDict = {"type": "string", "minLength": 1}
_TOKEN_IDS: JsonDict = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
_PROMPT: JsonDict = {
    "anyOf": [
        _TEXT,
        {"type": "array", "items": _TEXT, "minItems": 1},
        _TOKEN_IDS,
        {"type": "array", "items": _TOKEN_IDS, "minItems": 1},
    ]
}
_STOP: JsonDict = {"anyOf": [_TEXT, {"type": "array", "items": _TEXT}, {"type": "null"}]}
_NEUTRAL: JsonDict = {"maxProperties": 0}  # an object field accepted only empty (or null)
_STREAM_OPTIONS: JsonDict = {  # stream_options needs stream=true
    "if": {"required": ["stream_options"], "properties": {"stream_options": {"type": "object"}}},
    "then": {"required": ["stream"], "properties": {"stream": {"const": True}}},
}


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(BaseModel):
    """OpenAI's `stream_options`, with vLLM's defaults and its extension; fields OpenAI adds are ignored."""

    include_usage: bool = Field(default=True, description="A last chunk with the request's usage, no choices.")
    continuous_usage_stats: bool = Field(
        default=False, description="Extension (vLLM's): every chunk carries its choice's usage so far."
    )


class _Sampling(_Wire):
    """Fields the two generation requests share."""

    model: str = Field(min_length=1, description="A model id from GET /v1/models.")
    n: int = Field(default=1, ge=1, description="Completions per prompt.")
    temperature: float = Field(default=1.0, ge=0.0, le=100.0, description="0 samples greedily.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1, description="Extension: sample among the k likeliest tokens; 0 or -1: off.")
    stop: Annotated[str | list[str] | None, WithJsonSchema(_STOP)] = Field(
        default=None, description="Strings that end a completion (not returned)."
    )
    seed: int | None = Field(
        default=None, ge=-MAX_SEED - 1, le=MAX_SEED, description="Same seed, same request: same completions."
    )
    ignore_eos: bool = Field(default=False, description="Extension: keep generating past end-of-sequence.")
    return_token_ids: bool = Field(default=False, description="Extension: return prompt and completion token ids.")
    # OpenAI fields accepted at their neutral values only (see `_neutral`)
    stream: bool = Field(default=False, description="Answer with server-sent events, a chunk at a time.")
    stream_options: StreamOptions | None = Field(default=None, description="Only with stream=true.")
    presence_penalty: float = Field(default=0.0, json_schema_extra={"const": 0})
    frequency_penalty: float = Field(default=0.0, json_schema_extra={"const": 0})
    logit_bias: dict[str, float] | None = Field(default=None, json_schema_extra=_NEUTRAL)
    user: str | None = None

    @model_validator(mode="after")
    def _neutral(self) -> Self:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options needs stream=true")
        if self.presence_penalty or self.frequency_penalty:
            raise ValueError("presence_penalty and frequency_penalty are not supported; leave them at 0")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        return self

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


# --- /v1/completions -------------------------------------------------------------------------


class CompletionRequest(_Sampling):
    model_config = ConfigDict(json_schema_extra={"allOf": [_STREAM_OPTIONS]})

    prompt: Annotated[str | list[str] | list[int] | list[list[int]], WithJsonSchema(_PROMPT)] = Field(
        description="One prompt, a list of prompts, or token ids (one list or a list of lists); none empty."
    )
    max_tokens: int = Field(default=16, ge=1, description="Tokens to generate at most, per completion.")
    logprobs: int | None = Field(
        default=None, ge=0, description="Return the sampled tokens' logprobs and this many top alternatives."
    )
    echo: bool = Field(default=False, json_schema_extra={"const": False})
    suffix: str | None = Field(default=None, json_schema_extra={"maxLength": 0})
    best_of: int | None = Field(default=None, description="Only equal to n.")

    @model_validator(mode="after")
    def _unsupported(self) -> Self:
        if self.echo:
            raise ValueError("echo is not supported; send echo=false")
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported (only best_of == n)")
        return self


class CompletionLogprobs(_Wire):
    """The legacy shape: per generated token its text, logprob, top alternatives, character offset."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int] = Field(description="Offset of each token in prompt + completion text.")


class CompletionChoice(_Wire):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"]
    stop_reason: str | None = Field(
        default=None,
        description="Extension (as vLLM names it): the stop string "
        "that ended the choice; None: end-of-sequence or length.",
    )
    token_ids: list[int] | None = Field(default=None, description="With return_token_ids: every generated token.")
    prompt_token_ids: list[int] | None = None
    weight_version: int = Field(description="Version of the weights that generated this choice.")


class Usage(_Wire):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(_Wire):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice] = Field(description="n per prompt, prompt by prompt.")
    usage: Usage
    weight_version: int = Field(
        description="The oldest of the choices' weight versions (they differ only when "
        "an update landed between the batches of one request)."
    )


# --- /v1/chat/completions --------------------------------------------------------------------


class TextPart(_Wire):
    type: Literal["text"]
    text: str


class ChatMessage(_Wire):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    model_config = ConfigDict(
        json_schema_extra={
            "allOf": [
                _STREAM_OPTIONS,
                # top_logprobs needs logprobs=true; max_tokens and max_completion_tokens are not both sent
                {
                    "if": {"required": ["top_logprobs"], "properties": {"top_logprobs": {"type": "integer"}}},
                    "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}},
                },
                {
                    "not": {
                        "required": ["max_tokens", "max_completion_tokens"],
                        "properties": {"max_tokens": {"type": "integer"}, "max_completion_tokens": {"type": "integer"}},
                    }
                },
            ]
        }
    )

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, description="Default: what the context has room for.")
    max_completion_tokens: int | None = Field(default=None, ge=1, description="The newer name of max_tokens.")
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _logprobs(self) -> Self:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("send max_tokens or max_completion_tokens, not both")
        return self


class TopLogprob(_Wire):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(_Wire):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(_Wire):
    content: list[TokenLogprob]


class AssistantMessage(_Wire):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Wire):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"]
    token_ids: list[int] | None = None
    weight_version: int = Field(description="Version of the weights that generated this choice.")


class ChatCompletionResponse(_Wire):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    weight_version: int
    prompt_token_ids: list[int] | None = None


# --- /v1/search ------------------------------------------------------------------------------


class SearchBudget(_Wire):
    """The most one search may spend; a field left out gets the server's cap (also its maximum)."""

    max_candidates: int | None = Field(
        default=None,
        ge=0,
        description="Sequences sampled (whole responses, or step continuations for beam search and DVTS).",
    )
    max_tokens: int | None = Field(default=None, ge=0, description="Tokens generated, summed over every sequence.")


class SearchRequest(_Wire):
    """One inference-time search. Config fields left out take `search.SearchConfig`'s defaults."""

    model_config = ConfigDict(
        json_schema_extra={
            # exactly one of prompt and messages
            "oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}],
            # every strategy but majority needs a reward
            "if": {"properties": {"strategy": {"enum": list(NO_REWARD_STRATEGIES)}}},
            "else": {"required": ["reward"], "properties": {"reward": {"type": "string"}}},
        }
    )

    prompt: str | None = Field(
        default=None, min_length=1, description="The task prompt as text; responses continue it. Or send `messages`."
    )
    messages: list[ChatMessage] | None = Field(
        default=None,
        min_length=1,
        description="The task prompt as a conversation: the model's chat template renders it (with the "
        "assistant turn opened) and responses continue that; the reward is sent the conversation itself.",
    )
    strategy: str = Field(
        description="best_of_n, weighted_best_of_n, majority, refine, beam_search or dvts.",
        json_schema_extra={"enum": list(SEARCH_STRATEGIES)},
    )
    reward: str | None = Field(
        default=None,
        min_length=1,
        description="The rm_server reward that scores candidates; every strategy but majority needs one.",
    )
    budget: SearchBudget | None = None
    reference: str | None = Field(
        default=None, description="The known answer: sent to the reward, and marks each candidate `correct`."
    )
    model: str = Field(default="policy", min_length=1, description="The served model that generates.")
    seed: int | None = Field(
        default=None,
        ge=0,
        le=MAX_SEED,
        description="Same seed, same request: same search (default: a random one, echoed in the response).",
    )
    n: int | None = Field(
        default=None, ge=1, description="Candidates (best-of-N, majority), beams (beam search, DVTS)."
    )
    temperature: float | None = Field(default=None, ge=0.0, le=100.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1, description="Tokens in one response, at most.")
    stop: list[str] | None = Field(
        default=None,
        description='Step boundaries (beam search, DVTS); default [" "].',
        json_schema_extra={"minItems": 1, "items": _TEXT},
    )
    beam_width: int | None = Field(default=None, ge=1)
    max_steps: int | None = Field(default=None, ge=1)
    max_step_tokens: int | None = Field(default=None, ge=1)
    round_size: int | None = Field(default=None, ge=1)
    consensus: float | None = Field(default=None, gt=0.0, le=1.0)
    rounds: int | None = Field(default=None, ge=0)
    threshold: float | None = None
    step_threshold: float | None = None
    aggregate: Literal["min", "prod", "last", "mean"] | None = None
    answer: Extract | None = Field(
        default=None,
        description='How a response\'s final answer is found, for votes and `correct`: {"how": "hashes"} '
        '(`#### n`, the default), "boxed" (the last \\boxed{}), "last_number", or "regex" with a `pattern` '
        "whose group 1 is the answer. Answers are normalised: 1,234 = 1234, 2.50 = 2.5.",
    )

    @model_validator(mode="after")
    def _one_prompt(self) -> Self:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send the task as `prompt` (text) or as `messages` (a conversation): exactly one")
        return self


class SearchCandidate(_Wire):
    text: str
    score: float | None = Field(description="None: not scored, or the reward failed on it (see `error`).")
    final_answer: str | None
    steps: list[float] | None = Field(description="Per-step scores, from a process reward.")
    num_tokens: int
    finish_reason: str = Field(description="stop (end of sequence), step, length, depth or budget.")
    correct: bool | None = Field(description="final_answer == reference, when a reference was sent.")
    error: str | None


class SearchUsage(_Wire):
    generated_tokens: int
    candidates: int = Field(description="Sequences sampled, as the budget counts them.")
    generate_calls: int
    reward_calls: int
    scored_items: int


class SearchResponse(_Wire):
    id: str
    object: Literal["search"] = "search"
    created: int
    model: str
    strategy: str
    answer: str | None = Field(description="The chosen candidate's final answer.")
    text: str | None = Field(description="The chosen candidate's response.")
    chosen: int | None = Field(description="Its index in `candidates`.")
    candidates: list[SearchCandidate]
    prompt: str | None = Field(
        default=None,
        description="With `messages`: the text the model continued, the chat template's rendering of them. "
        "None when the request sent `prompt` (that text is what was continued).",
    )
    trace: list[dict[str, Any]] = Field(description="The strategy's steps, as events.")
    usage: SearchUsage
    reward: str | None
    reward_id: str | None = Field(description="rm_server's id of the reward that scored; None for majority vote.")
    weight_version: int | None = Field(
        description="The oldest weight version that generated a candidate; None when nothing was generated."
    )
    seed: int


# --- /v1/models, errors, health --------------------------------------------------------------


# --- /v1/admin/weights -----------------------------------------------------------------------


class LoadWeightsRequest(_Wire):
    model: str
    path: str = Field(
        min_length=1,
        max_length=4096,
        description="A .safetensors file, or a directory of them, inside a directory the server "
        "loads weights from (its --weights-dir): relative to it, or absolute and inside it.",
    )
    expect_version: int | None = Field(default=None, description="Refuse (409) unless the model is at this version.")


class WeightUpdateResponse(_Wire):
    model: str
    previous_version: int
    weight_version: int = Field(description="The version serving now; every later generation carries it.")
    tensors: int
    bytes: int
    seconds: float = Field(description="Reading, checking and swapping in.")


class ModelCard(_Wire):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "assay"
    max_model_len: int = Field(description="Prompt and completion tokens together, at most.")
    weight_version: int


class ModelList(_Wire):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(_Wire):
    message: str
    type: str = Field(description="invalid_request_error, not_found_error, rate_limit_error, ...")
    param: str | None = Field(default=None, description="The request field at fault, when one is.")
    code: str | None = Field(default=None, description="A stable short code: model_not_found, queue_full, ...")


class ErrorResponse(_Wire):
    """Body of every 4xx/5xx answer, in OpenAI's shape."""

    error: ErrorInfo


class HealthResponse(_Wire):
    status: Literal["ok", "starting", "stopping"]


# --- streaming: the chunks of `stream: true` -------------------------------------------------
# Sent as server-sent events, `data: {chunk}`, then `data: [DONE]`; vLLM's shapes, with the
# weight version on every chunk (the oldest of its choices', as in the responses) and choice.


class CompletionStreamChoice(_Wire):
    index: int
    text: str = Field(description="The text this choice adds; held back while it may begin a stop string.")
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = Field(default=None, description="Set on its last chunk.")
    stop_reason: str | None = None
    token_ids: list[int] | None = Field(default=None, description="With return_token_ids: the tokens it adds.")
    prompt_token_ids: list[int] | None = Field(default=None, description="With return_token_ids: on its first chunk.")
    weight_version: int


class CompletionChunk(_Wire):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionStreamChoice] = Field(description="One choice a chunk; none in the usage chunk.")
    usage: Usage | None = None
    weight_version: int


class DeltaMessage(_Wire):
    role: Literal["assistant"] | None = Field(default=None, description="On each choice's first chunk.")
    content: str | None = None


class ChatStreamChoice(_Wire):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    stop_reason: str | None = None
    token_ids: list[int] | None = None
    weight_version: int


class ChatCompletionChunk(_Wire):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | None = None
    weight_version: int
    prompt_token_ids: list[int] | None = Field(default=None, description="With return_token_ids: on the first chunks.")
