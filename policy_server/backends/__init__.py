"""The one interface the serving layer reaches a model through.

A backend turns `GenerationRequest`s (token ids in, one sequence each) into `GenerationOutput`s.
`generate` is a coroutine: the transformers backend (`hf.py`) queues the requests on the base's
batcher, whose worker thread runs the decode loop; the vLLM backend (`vllm.py`) hands them to
vLLM's own async engine. Either way the event loop never waits on a forward pass, and cancelling
the `generate` call (the client went away, the deadline passed) drops queued requests and aborts
running ones. What a backend refuses or fails at it says with the exceptions below (`Overloaded`,
`InvalidParameters`, `GenerationFailed`), which `errors.backend_error` maps to the API's errors.

`generate_streaming` is `generate` that also reports each sequence as it advances (`Progress`, on
the event loop): a `TokenDelta` with what it sampled since its last report, then its output once it
ended. The streamed responses (`streaming.py`) are built from these; the default reports nothing
before the end, so a backend without the hook still streams, each sequence in one piece.

No torch here: the serving layer and the adapters import this module; the server imports `hf`
(torch), and `vllm` only when that backend is chosen.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

from assay.chat import render_chat


@dataclass(frozen=True)
class GenerationRequest:
    """One sequence to generate. A request with n completions becomes n of these."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    stop: tuple[str, ...] = ()
    seed: int = 0  # each sequence samples from its own generator, so batch-mates do not matter
    top_logprobs: int = 0  # alternatives per position to return, besides the sampled token's logprob
    ignore_eos: bool = False
    min_p: float = 0.0  # drop tokens below min_p x the likeliest one's probability; 0: off
    repetition_penalty: float = 1.0  # over prompt and generated tokens, as vLLM and HF apply it; 1: off
    min_tokens: int = 0  # no eos or stop string before this many tokens


@dataclass
class GenerationOutput:
    token_ids: list[int]  # every generated token: eos and the tokens that completed a stop string included
    logprobs: list[float]  # one per token, under the raw model (before temperature and filtering)
    text: str  # the decoded completion, specials skipped, cut before a stop string
    finish_reason: Literal["stop", "length", "abort"]
    weight_version: int
    stop_reason: str | None = None  # the stop string that ended it (finish "stop"); None: eos, length, abort
    top_logprobs: list[list[tuple[int, float]]] | None = field(default=None)  # per token: (id, logprob), best first
    first_token_s: float | None = None  # from submission to the first token sampled (queue wait + prefill)


@dataclass
class TokenDelta:
    """What one sequence sampled since its last report (streaming): tokens, their raw logprobs and, when
    asked for, their top alternatives, and the version of the weights sampling it."""

    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]] | None
    weight_version: int


@dataclass(frozen=True)
class ParamSpec:
    """What a weight update must match for one parameter: its shape and dtype (torch's name, e.g. "float32")."""

    shape: tuple[int, ...]
    dtype: str


class Overloaded(Exception):
    """The backend's queue cannot take the request now; retrying after `retry_after_s` may work."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class InvalidParameters(ValueError):
    """The backend's engine refuses these sampling parameters, which the serving layer's own checks let
    through: the request is refused (400) before any of it reaches the engine."""


class GenerationFailed(Exception):
    """Generating failed for a reason of the server's (the model's logits were NaN, a sampling step or
    the forward pass raised): the requests whose sequences it names fail with it, no others. A backend
    raises it from `generate` for a request any of whose sequences failed; the message says what broke."""


Progress = Callable[[int, TokenDelta | GenerationOutput | GenerationFailed], None]
"""`progress(i, event)`, called on the event loop about `requests[i]`: a `TokenDelta` as it samples, then
its `GenerationOutput` (or `GenerationFailed`) when it ends; nothing after that."""


class GenerationBackend(ABC):
    """A served model: its tokenizer, context length, weight version and generate()."""

    name: str
    max_model_len: int  # prompt + completion tokens
    weight_version: int = 0  # bumped by every weight update (`load_weights`)
    tokenizer: Any  # a Hugging Face tokenizer

    async def start(self) -> None:
        """Called on the event loop before the first request."""

    async def close(self) -> None:
        """Stop accepting work and release threads."""

    @abstractmethod
    async def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationOutput]:
        """One output per request, in order. All are admitted or none (raises `Overloaded`); raises
        `GenerationFailed` when any of them could not be generated."""

    async def generate_streaming(
        self, requests: Sequence[GenerationRequest], progress: Progress
    ) -> list[GenerationOutput]:
        """`generate`, reporting to `progress` as the sequences advance. This default reports nothing:
        the stream gets each sequence whole from the outputs."""
        return await self.generate(requests)

    def queue_depth(self) -> int:
        return 0

    # --- weights -----------------------------------------------------------------------------

    def parameter_specs(self) -> dict[str, ParamSpec]:
        """Every tensor a weight update may name (the model's state dict), with its shape and dtype."""
        raise NotImplementedError(f"{type(self).__name__} does not take weight updates")

    def read_weights(self, names: Sequence[str]) -> dict[str, Any]:
        """Copies of the named tensors as the model serves them now (name -> torch.Tensor, on the CPU):
        the base weights a LoRA adapter is merged into. Blocking: run it on a thread."""
        raise NotImplementedError(f"{type(self).__name__} does not take weight updates")

    async def load_weights(self, tensors: Mapping[str, Any], version: int | None = None) -> int:
        """Swap in `tensors` (name -> torch.Tensor, already checked against `parameter_specs`)
        between batches, all at once, and set `weight_version` to `version` (None: one past the
        current; the caller has checked it is above); return the new version.

        No sequence ever sees some of the new tensors and some of the old: running batches finish
        on the old weights (and report the old version), later ones start on the new."""
        raise NotImplementedError(f"{type(self).__name__} does not take weight updates")

    # --- tokens ------------------------------------------------------------------------------

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """A completion prompt's ids, with the tokenizer's special tokens (e.g. <s>) added; without
        them for text a chat template rendered, which holds its own."""
        return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def chat_text(self, messages: list[dict[str, str]], **options: Any) -> str:
        """The conversation through the chat template, the assistant turn opened unless `options` say
        otherwise (`assay.chat.render_chat`'s), its specials in the text; `assay.chat.NoChatTemplate`
        when the tokenizer has none, `DroppedMessages` for messages the template would drop."""
        return render_chat(self.tokenizer, messages, **options)

    def chat_prompt(self, messages: list[dict[str, str]], **options: Any) -> list[int]:
        """The chat template's rendering (`chat_text`) as ids; the template adds its own specials."""
        return self.encode(self.chat_text(messages, **options), add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def token_texts(self, ids: Sequence[int]) -> list[str]:
        """Each token on its own, specials included (`</s>`), as logprobs list them."""
        pieces = self._pieces
        for i in ids:
            if i not in pieces:
                pieces[i] = self.tokenizer.decode([i])
        return [pieces[i] for i in ids]

    def visible_text(self, token_id: int) -> str:
        """What the token adds to a completion's text: its piece, or nothing for a special token."""
        return "" if token_id in self._specials else self.token_texts([token_id])[0]

    @cached_property
    def _pieces(self) -> dict[int, str]:
        # decode([i]) costs microseconds and responses list thousands of tokens: decode each id once
        return {}

    @cached_property
    def _specials(self) -> frozenset[int]:
        return frozenset(self.tokenizer.all_special_ids)

    def vocab_size(self) -> int:
        return len(self.tokenizer)
