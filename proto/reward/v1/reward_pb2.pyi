from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Granularity(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GRANULARITY_UNSPECIFIED: _ClassVar[Granularity]
    GRANULARITY_OUTCOME: _ClassVar[Granularity]
    GRANULARITY_STEPS: _ClassVar[Granularity]
    GRANULARITY_TOKENS: _ClassVar[Granularity]

class ErrorType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_TYPE_UNSPECIFIED: _ClassVar[ErrorType]
    ERROR_TYPE_INVALID_INPUT: _ClassVar[ErrorType]
    ERROR_TYPE_TOO_LONG: _ClassVar[ErrorType]
    ERROR_TYPE_TIMEOUT: _ClassVar[ErrorType]
    ERROR_TYPE_JUDGE_UNAVAILABLE: _ClassVar[ErrorType]
    ERROR_TYPE_JUDGE_ERROR: _ClassVar[ErrorType]
    ERROR_TYPE_DEPENDENCY_FAILED: _ClassVar[ErrorType]
    ERROR_TYPE_INTERNAL: _ClassVar[ErrorType]
    ERROR_TYPE_INVALID_REQUEST: _ClassVar[ErrorType]
    ERROR_TYPE_UNKNOWN_REWARD: _ClassVar[ErrorType]
    ERROR_TYPE_PAYLOAD_TOO_LARGE: _ClassVar[ErrorType]
    ERROR_TYPE_OVERLOADED: _ClassVar[ErrorType]
    ERROR_TYPE_UNAUTHENTICATED: _ClassVar[ErrorType]
    ERROR_TYPE_PERMISSION_DENIED: _ClassVar[ErrorType]
    ERROR_TYPE_NOT_READY: _ClassVar[ErrorType]
    ERROR_TYPE_REMOTE_UNAVAILABLE: _ClassVar[ErrorType]
    ERROR_TYPE_REMOTE_ERROR: _ClassVar[ErrorType]

class Winner(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WINNER_UNSPECIFIED: _ClassVar[Winner]
    WINNER_A: _ClassVar[Winner]
    WINNER_B: _ClassVar[Winner]
    WINNER_TIE: _ClassVar[Winner]
GRANULARITY_UNSPECIFIED: Granularity
GRANULARITY_OUTCOME: Granularity
GRANULARITY_STEPS: Granularity
GRANULARITY_TOKENS: Granularity
ERROR_TYPE_UNSPECIFIED: ErrorType
ERROR_TYPE_INVALID_INPUT: ErrorType
ERROR_TYPE_TOO_LONG: ErrorType
ERROR_TYPE_TIMEOUT: ErrorType
ERROR_TYPE_JUDGE_UNAVAILABLE: ErrorType
ERROR_TYPE_JUDGE_ERROR: ErrorType
ERROR_TYPE_DEPENDENCY_FAILED: ErrorType
ERROR_TYPE_INTERNAL: ErrorType
ERROR_TYPE_INVALID_REQUEST: ErrorType
ERROR_TYPE_UNKNOWN_REWARD: ErrorType
ERROR_TYPE_PAYLOAD_TOO_LARGE: ErrorType
ERROR_TYPE_OVERLOADED: ErrorType
ERROR_TYPE_UNAUTHENTICATED: ErrorType
ERROR_TYPE_PERMISSION_DENIED: ErrorType
ERROR_TYPE_NOT_READY: ErrorType
ERROR_TYPE_REMOTE_UNAVAILABLE: ErrorType
ERROR_TYPE_REMOTE_ERROR: ErrorType
WINNER_UNSPECIFIED: Winner
WINNER_A: Winner
WINNER_B: Winner
WINNER_TIE: Winner

class ErrorInfo(_message.Message):
    __slots__ = ("type", "message")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    type: ErrorType
    message: str
    def __init__(self, type: _Optional[_Union[ErrorType, str]] = ..., message: _Optional[str] = ...) -> None: ...

class Scores(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class Conversation(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class ScoreItem(_message.Message):
    __slots__ = ("id", "prompt", "messages", "response", "reference", "metadata_json")
    ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    id: str
    prompt: str
    messages: Conversation
    response: str
    reference: str
    metadata_json: str
    def __init__(self, id: _Optional[str] = ..., prompt: _Optional[str] = ..., messages: _Optional[_Union[Conversation, _Mapping]] = ..., response: _Optional[str] = ..., reference: _Optional[str] = ..., metadata_json: _Optional[str] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("reward", "items", "granularity", "timeout_s")
    REWARD_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    GRANULARITY_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    reward: str
    items: _containers.RepeatedCompositeFieldContainer[ScoreItem]
    granularity: Granularity
    timeout_s: float
    def __init__(self, reward: _Optional[str] = ..., items: _Optional[_Iterable[_Union[ScoreItem, _Mapping]]] = ..., granularity: _Optional[_Union[Granularity, str]] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class TokenScore(_message.Message):
    __slots__ = ("text", "score")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    text: str
    score: float
    def __init__(self, text: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class TokenScores(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedCompositeFieldContainer[TokenScore]
    def __init__(self, values: _Optional[_Iterable[_Union[TokenScore, _Mapping]]] = ...) -> None: ...

class ItemResult(_message.Message):
    __slots__ = ("id", "score", "error", "steps", "tokens")
    ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    id: str
    score: float
    error: ErrorInfo
    steps: Scores
    tokens: TokenScores
    def __init__(self, id: _Optional[str] = ..., score: _Optional[float] = ..., error: _Optional[_Union[ErrorInfo, _Mapping]] = ..., steps: _Optional[_Union[Scores, _Mapping]] = ..., tokens: _Optional[_Union[TokenScores, _Mapping]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("reward", "reward_id", "results")
    REWARD_FIELD_NUMBER: _ClassVar[int]
    REWARD_ID_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    reward: str
    reward_id: str
    results: _containers.RepeatedCompositeFieldContainer[ItemResult]
    def __init__(self, reward: _Optional[str] = ..., reward_id: _Optional[str] = ..., results: _Optional[_Iterable[_Union[ItemResult, _Mapping]]] = ...) -> None: ...

class ScoreStreamRequest(_message.Message):
    __slots__ = ("request_id", "request")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    request: ScoreRequest
    def __init__(self, request_id: _Optional[str] = ..., request: _Optional[_Union[ScoreRequest, _Mapping]] = ...) -> None: ...

class ScoreStreamResponse(_message.Message):
    __slots__ = ("request_id", "response", "error", "retry_after_s")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    response: ScoreResponse
    error: ErrorInfo
    retry_after_s: float
    def __init__(self, request_id: _Optional[str] = ..., response: _Optional[_Union[ScoreResponse, _Mapping]] = ..., error: _Optional[_Union[ErrorInfo, _Mapping]] = ..., retry_after_s: _Optional[float] = ...) -> None: ...

class CompareItem(_message.Message):
    __slots__ = ("id", "prompt", "messages", "response_a", "response_b", "reference", "metadata_json")
    ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_A_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_B_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    id: str
    prompt: str
    messages: Conversation
    response_a: str
    response_b: str
    reference: str
    metadata_json: str
    def __init__(self, id: _Optional[str] = ..., prompt: _Optional[str] = ..., messages: _Optional[_Union[Conversation, _Mapping]] = ..., response_a: _Optional[str] = ..., response_b: _Optional[str] = ..., reference: _Optional[str] = ..., metadata_json: _Optional[str] = ...) -> None: ...

class CompareRequest(_message.Message):
    __slots__ = ("reward", "items", "timeout_s")
    REWARD_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    reward: str
    items: _containers.RepeatedCompositeFieldContainer[CompareItem]
    timeout_s: float
    def __init__(self, reward: _Optional[str] = ..., items: _Optional[_Iterable[_Union[CompareItem, _Mapping]]] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class CompareResult(_message.Message):
    __slots__ = ("id", "prob_a", "winner", "scores", "error")
    ID_FIELD_NUMBER: _ClassVar[int]
    PROB_A_FIELD_NUMBER: _ClassVar[int]
    WINNER_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    id: str
    prob_a: float
    winner: Winner
    scores: Scores
    error: ErrorInfo
    def __init__(self, id: _Optional[str] = ..., prob_a: _Optional[float] = ..., winner: _Optional[_Union[Winner, str]] = ..., scores: _Optional[_Union[Scores, _Mapping]] = ..., error: _Optional[_Union[ErrorInfo, _Mapping]] = ...) -> None: ...

class CompareResponse(_message.Message):
    __slots__ = ("reward", "reward_id", "results")
    REWARD_FIELD_NUMBER: _ClassVar[int]
    REWARD_ID_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    reward: str
    reward_id: str
    results: _containers.RepeatedCompositeFieldContainer[CompareResult]
    def __init__(self, reward: _Optional[str] = ..., reward_id: _Optional[str] = ..., results: _Optional[_Iterable[_Union[CompareResult, _Mapping]]] = ...) -> None: ...

class ListRewardsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RewardInfo(_message.Message):
    __slots__ = ("name", "type", "reward_id", "needs_reference", "granularities", "pairwise", "pinned")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    REWARD_ID_FIELD_NUMBER: _ClassVar[int]
    NEEDS_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    GRANULARITIES_FIELD_NUMBER: _ClassVar[int]
    PAIRWISE_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    reward_id: str
    needs_reference: bool
    granularities: _containers.RepeatedScalarFieldContainer[Granularity]
    pairwise: bool
    pinned: bool
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., reward_id: _Optional[str] = ..., needs_reference: _Optional[bool] = ..., granularities: _Optional[_Iterable[_Union[Granularity, str]]] = ..., pairwise: _Optional[bool] = ..., pinned: _Optional[bool] = ...) -> None: ...

class RewardsResponse(_message.Message):
    __slots__ = ("rewards",)
    REWARDS_FIELD_NUMBER: _ClassVar[int]
    rewards: _containers.RepeatedCompositeFieldContainer[RewardInfo]
    def __init__(self, rewards: _Optional[_Iterable[_Union[RewardInfo, _Mapping]]] = ...) -> None: ...
