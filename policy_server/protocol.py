"""Wire types of the policy server: the OpenAI-compatible JSON it speaks.

The shapes follow OpenAI's completions, chat completions and models APIs, so the official
`openai` client works unchanged. Extensions, all optional: `top_k`, `ignore_eos` and
`return_token_ids` on requests (as vLLM names them), `stop_reason` on completion choices (vLLM's
too), and `weight_version` on every generation response: the version of the weights that
produced it (0 until weights are updated). Beside
them, this server's own `/v1/search` (`SearchRequest` -> `SearchResponse`): inference-time
search over a served model, scored by rm_server. Its `answer` is `assay.answers.Extract`, the
one answer-extraction config (standard library only, so this module stays light).

Generation requests are lenient the way vLLM's server is, so that clients written for OpenAI or
vLLM work unchanged: an unknown field is accepted and ignored (one DEBUG line of the
`assay.policy_server.protocol` logger names the ignored fields; the price is that a typo is silent
too), and `extra_body`, which some clients send as a literal key (its_hub 1.2) instead of letting
the SDK merge it, is merged into the request (its fields win, as the SDK's merge does). OpenAI
fields this server does not implement (`tools`, `response_format`, penalties, `echo`, ...) are
accepted at their neutral values (`NEUTRAL_ONLY`) and refused otherwise with a 400 whose `param`
names the field. Fields that cannot change what is generated (`user`, `metadata`, `service_tier`,
`parallel_tool_calls`, prompt caching, `safety_identifier`, and `reasoning_effort` and `verbosity`,
which the served models have no reasoning phase or style to apply to) are ignored like unknown
ones. `/v1/search` (this server's own API), the admin routes and every response stay strict:
there a typo is a 400. `stream: true` answers with server-sent events of the chunk models at the
end of this module (`streaming.py` builds them).

Rules the serving layer enforces with messages of its own (no empty prompt or stop string, the
neutral values above, a reward for every strategy but majority) are stated in the schema only
(`json_schema_extra`, `WithJsonSchema`), so that the OpenAPI schema says what the code enforces.

Nothing heavy is imported here (no torch), so clients and tests can import these cheaply.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, WithJsonSchema, field_validator, model_validator
from pydantic.json_schema import JsonDict

from assay.answers import Extract

log = logging.getLogger(__name__)
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


def _empty(value: Any) -> bool:
    return not value


# OpenAI fields accepted only at their neutral value: the check, and the refusal's reason.
NEUTRAL_ONLY: dict[str, tuple[Callable[[Any], bool], str]] = {
    "presence_penalty": (_empty, "presence_penalty is not supported; send 0"),
    "frequency_penalty": (_empty, "frequency_penalty is not supported; send 0"),
    "logit_bias": (_empty, "logit_bias is not supported; send {} or null"),
    "echo": (_empty, "echo is not supported; send false"),
    "suffix": (_empty, "suffix is not supported; send null"),
    "tools": (_empty, "tool calling is not supported; send no tools (or [])"),
    "functions": (_empty, "function calling is not supported; send no functions (or [])"),
    "tool_choice": (lambda v: v in (None, "none", "auto"), 'tool calling is not supported; send "none" or "auto"'),
    "function_call": (lambda v: v in (None, "none", "auto"), 'function calling is not supported; send "none"'),
    "response_format": (
        lambda v: v is None or v.get("type") == "text",
        'structured output is not supported; send {"type": "text"}',
    ),
    "store": (_empty, "this server does not store completions; send false"),
    "modalities": (lambda v: v is None or v == ["text"], 'this server generates text only; send ["text"]'),
    "audio": (lambda v: v is None, "audio output is not supported; send null"),
    "prediction": (lambda v: v is None, "predicted outputs are not supported; send null"),
    "web_search_options": (lambda v: v is None, "web search is not supported; send null"),
    "moderation": (lambda v: v is None, "moderation is not supported; send null"),
    "skip_special_tokens": (bool, "special tokens are always skipped; send true"),
}


def _only(**schema: Any) -> Any:
    """A field accepted only at its neutral value (`NEUTRAL_ONLY`): `schema` says which, for OpenAPI."""
    return Field(default=None, json_schema_extra=schema)


class _Request(BaseModel):
    """A generation request: unknown fields ignored, `extra_body` merged (see the module docstring)."""

    model_config = ConfigDict(extra="ignore")

    extra_body: dict[str, Any] | None = Field(
        default=None,
        exclude=True,
        description="Fields merged into the request, as the OpenAI SDK merges its extra_body.",
    )

    @model_validator(mode="before")
    @classmethod
    def _lenient(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if isinstance(extra := data.get("extra_body"), dict):
            data = {**data, **extra, "extra_body": extra}
        ignored = sorted(str(k) for k in data if k not in cls.model_fields)
        if ignored:
            log.debug("%s: ignored the fields %s", cls.__name__, ", ".join(ignored))
        return data

    @field_validator(*NEUTRAL_ONLY, mode="after", check_fields=False)
    @classmethod
    def _neutral_only(cls, value: Any, info: ValidationInfo) -> Any:
        accepts, reason = NEUTRAL_ONLY[str(info.field_name)]
        if not accepts(value):
            raise ValueError(reason)
        return value


class StreamOptions(BaseModel):
    """OpenAI's `stream_options`, with vLLM's defaults and its extension; fields OpenAI adds are ignored."""

    include_usage: bool = Field(default=True, description="A last chunk with the request's usage, no choices.")
    continuous_usage_stats: bool = Field(
        default=False, description="Extension (vLLM's): every chunk carries its choice's usage so far."
    )


class _Sampling(_Request):
    """Fields the two generation requests share."""

    model: str = Field(min_length=1, description="A model id from GET /v1/models.")
    n: int = Field(default=1, ge=1, description="Completions per prompt.")
    temperature: float = Field(default=1.0, ge=0.0, le=100.0, description="0 samples greedily.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1, description="Extension: sample among the k likeliest tokens; 0 or -1: off.")
    min_p: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Extension: drop tokens less likely than min_p times the likeliest one; 0: off.",
    )
    repetition_penalty: float = Field(
        default=1.0,
        gt=0.0,
        le=100.0,
        description="Extension (vLLM's and Hugging Face's): the logits of tokens already in the prompt or "
        "the completion are divided by it where positive and multiplied by it where negative; 1: off.",
    )
    min_tokens: int = Field(
        default=0, ge=0, description="Extension: no end-of-sequence or stop string before this many tokens."
    )
    stop: Annotated[str | list[str] | None, WithJsonSchema(_STOP)] = Field(
        default=None, description="Strings that end a completion (not returned)."
    )
    include_stop_str_in_output: bool = Field(
        default=False, description="Extension: end the text with the stop string that ended it."
    )
    seed: int | None = Field(
        default=None, ge=-MAX_SEED - 1, le=MAX_SEED, description="Same seed, same request: same completions."
    )
    ignore_eos: bool = Field(default=False, description="Extension: keep generating past end-of-sequence.")
    return_token_ids: bool = Field(default=False, description="Extension: return prompt and completion token ids.")
    return_tokens_as_token_ids: bool = Field(
        default=False, description='Extension: logprobs name each token "token_id:<id>" instead of its text.'
    )
    skip_special_tokens: bool = Field(default=True, json_schema_extra={"const": True})
    stream: bool = Field(default=False, description="Answer with server-sent events, a chunk at a time.")
    stream_options: StreamOptions | None = Field(default=None, description="Only with stream=true.")
    # OpenAI fields accepted at their neutral values only (`NEUTRAL_ONLY`)
    presence_penalty: float = Field(default=0.0, json_schema_extra={"const": 0})
    frequency_penalty: float = Field(default=0.0, json_schema_extra={"const": 0})
    logit_bias: dict[str, float] | None = Field(default=None, json_schema_extra=_NEUTRAL)
    user: str | None = None

    @model_validator(mode="after")
    def _stream_options(self) -> Self:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options needs stream=true")
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

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and value != info.data.get("n", 1):
            raise ValueError("best_of is not supported (only best_of == n)")
        return value


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
    tool_calls: list[Any] | None = Field(default=None, json_schema_extra={"maxItems": 0})
    tool_call_id: str | None = None

    @field_validator("tool_calls")
    @classmethod
    def _no_tool_calls(cls, value: list[Any] | None) -> list[Any] | None:
        if value:
            raise ValueError("tool calling is not supported; send no tool_calls")
        return value

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
    add_generation_prompt: bool = Field(
        default=True, description="Extension: the template opens the assistant's turn after the messages."
    )
    continue_final_message: bool = Field(
        default=False,
        description="Extension: the last message, an assistant's, is left open and continued "
        "(with add_generation_prompt=false).",
    )
    chat_template_kwargs: dict[str, Any] | None = Field(
        default=None, description="Extension: more variables for the chat template (e.g. enable_thinking)."
    )
    # OpenAI fields accepted at their neutral values only (`NEUTRAL_ONLY`)
    tools: list[Any] | None = _only(maxItems=0)
    tool_choice: str | dict[str, Any] | None = _only(enum=["none", "auto", None])
    functions: list[Any] | None = _only(maxItems=0)
    function_call: str | dict[str, Any] | None = _only(enum=["none", "auto", None])
    response_format: dict[str, Any] | None = _only(
        anyOf=[{"type": "null"}, {"type": "object", "properties": {"type": {"const": "text"}}, "required": ["type"]}]
    )
    store: bool | None = _only(enum=[False, None])
    modalities: list[str] | None = _only(anyOf=[{"type": "null"}, {"const": ["text"]}])
    audio: dict[str, Any] | None = _only(type="null")
    prediction: dict[str, Any] | None = _only(type="null")
    web_search_options: dict[str, Any] | None = _only(type="null")
    moderation: dict[str, Any] | None = _only(type="null")

    @model_validator(mode="after")
    def _logprobs(self) -> Self:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("send max_tokens or max_completion_tokens, not both")
        return self

    @field_validator("continue_final_message")
    @classmethod
    def _continue(cls, value: bool, info: ValidationInfo) -> bool:
        messages = info.data.get("messages") or []
        if value and info.data.get("add_generation_prompt", True):
            raise ValueError("continue_final_message needs add_generation_prompt=false")
        if value and messages and messages[-1].role != "assistant":
            raise ValueError("continue_final_message continues the last message, which must be the assistant's")
        return value


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
    version: int | None = Field(
        default=None,
        ge=1,
        description="The weight_version the update makes (default: the current one + 1); refused (409) "
        "unless it is above the current one.",
    )


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
    # /ready: the services this one calls (`rm`: the reward service /v1/search scores with); a
    # degraded one takes away what needs it (search), not the 200 (generation still works)
    dependencies: dict[str, Literal["ok", "degraded"]] | None = None


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
