"""The serving layer: validate an OpenAI request, generate through a backend, build the response.

The HTTP adapter (`http_api.py`) calls `PolicyService` with the protocol models, and the gRPC
adapter (`grpc_api.py`) calls the same `completions` for its Generate, so the two edges cannot
drift apart. A request with P prompts and n completions each becomes P * n `GenerationRequest`s
(choice j of every prompt samples with seed + j, so a list of prompts gives what the same prompts
sent one by one give). Request-level problems raise an `errors.ApiError`, which each adapter
turns into its error shape; nothing a client sends produces a 500. `/v1/search` is served by
`serving_search.SearchService` over this service.

Each request is first checked and tokenized into a `Plan` (`plan_completions`, `plan_chat`), then
generated; `streaming.py` streams the same plan, so a streamed request is refused exactly as the
non-streamed one is, before its stream starts.
"""

from __future__ import annotations

import asyncio
import functools
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from jinja2.exceptions import TemplateError

from assay.base.errors import LOADING_RETRY_AFTER_S
from assay.chat import DroppedMessages, NoChatTemplate
from assay.policy_server.backends import (
    GenerationBackend,
    GenerationFailed,
    GenerationOutput,
    GenerationRequest,
    InvalidParameters,
    Overloaded,
)
from assay.policy_server.config import Limits
from assay.policy_server.errors import DeadlineExceeded, InvalidRequest, ModelNotFound, NotReady, backend_error
from assay.policy_server.metrics import Metrics
from assay.policy_server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    TokenLogprob,
    TopLogprob,
    Usage,
)

T = TypeVar("T")
_SEEDS = 2**64  # torch generators take seeds in [0, 2**64)
_INLINE_CHARS = 16 * 1024  # prompts longer than this are tokenized on a thread, off the event loop


@dataclass
class Plan:
    """A request checked and tokenized: its model, its prompts as (token ids, text), and one sequence
    per choice (prompt by prompt, n each)."""

    backend: GenerationBackend
    prompts: list[tuple[list[int], str]]
    requests: list[GenerationRequest]


class PolicyService:
    def __init__(
        self, backends: dict[str, GenerationBackend], limits: Limits | None = None, metrics: Metrics | None = None
    ) -> None:
        self.backends, self.limits, self.metrics = backends, limits or Limits(), metrics or Metrics()
        self.ready = False
        self.created = int(time.time())

    async def start(self) -> None:
        for b in self.backends.values():
            await b.start()
        self.ready = True

    async def close(self) -> None:
        self.ready = False
        for b in self.backends.values():
            await b.close()

    def model_label(self, model: str) -> str:
        """The metrics label for a requested model: made-up names share one, so they cannot bloat /metrics."""
        return model if model in self.backends else "unknown"

    def queue_depths(self) -> dict[str, int]:
        return {name: b.queue_depth() for name, b in self.backends.items()}

    def models(self) -> ModelList:
        return ModelList(
            data=[
                ModelCard(id=name, created=self.created, max_model_len=b.max_model_len, weight_version=b.weight_version)
                for name, b in self.backends.items()
            ]
        )

    async def plan_completions(self, req: CompletionRequest) -> Plan:
        backend = self.backend(req.model)
        prompts = await maybe_off_loop(_size(req.prompt), self._prompts, backend, req.prompt)  # [(ids, text)]
        self._check_sampling(req, len(prompts), req.logprobs, "logprobs")
        max_tokens = self.room(backend, [ids for ids, _ in prompts], req.max_tokens)
        self.check_lengths(backend, [ids for ids, _ in prompts], max_tokens, "max_tokens")
        requests = self._requests(req, [ids for ids, _ in prompts], max_tokens, req.logprobs or 0)
        return Plan(backend, prompts, requests)

    async def completions(self, req: CompletionRequest) -> CompletionResponse:
        plan = await self.plan_completions(req)
        backend, prompts = plan.backend, plan.prompts
        outputs = await self._generate(plan, req.model)
        choices = []
        for index, out in enumerate(outputs):
            ids, text = prompts[index // req.n]
            logprobs = None
            if req.logprobs is not None:
                as_ids = req.return_tokens_as_token_ids
                logprobs = completion_logprobs(
                    backend, out.token_ids, out.logprobs, out.top_logprobs, len(text), as_ids
                )
            choices.append(
                CompletionChoice(
                    index=index,
                    text=_text(out, req.include_stop_str_in_output),
                    logprobs=logprobs,
                    finish_reason=out.finish_reason,
                    stop_reason=out.stop_reason,
                    token_ids=out.token_ids if req.return_token_ids else None,
                    prompt_token_ids=ids if req.return_token_ids else None,
                    weight_version=out.weight_version,
                )
            )
        return CompletionResponse(
            id=f"cmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=req.model,
            choices=choices,
            usage=_usage([ids for ids, _ in prompts], outputs),
            weight_version=_version(outputs),
        )

    async def plan_chat(self, req: ChatCompletionRequest) -> Plan:
        backend = self.backend(req.model)
        ids = await self.chat_ids(backend, req)
        top = (req.top_logprobs or 0) if req.logprobs else None
        self._check_sampling(req, 1, top, "top_logprobs")
        max_tokens = req.max_completion_tokens or req.max_tokens
        if max_tokens is None:  # as much as the context has room for
            max_tokens = max(1, min(self.limits.max_tokens, backend.max_model_len - len(ids)))
        max_tokens = self.room(backend, [ids], max_tokens)
        param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        self.check_lengths(backend, [ids], max_tokens, param)
        return Plan(backend, [(ids, "")], self._requests(req, [ids], max_tokens, top or 0))

    async def chat(self, req: ChatCompletionRequest) -> ChatCompletionResponse:
        plan = await self.plan_chat(req)
        backend, ids = plan.backend, plan.prompts[0][0]
        outputs = await self._generate(plan, req.model)
        choices = [
            ChatChoice(
                index=i,
                message=AssistantMessage(content=_text(out, req.include_stop_str_in_output)),
                logprobs=chat_logprobs(
                    backend, out.token_ids, out.logprobs, out.top_logprobs, req.return_tokens_as_token_ids
                )
                if req.logprobs
                else None,
                finish_reason=out.finish_reason,
                token_ids=out.token_ids if req.return_token_ids else None,
                weight_version=out.weight_version,
            )
            for i, out in enumerate(outputs)
        ]
        return ChatCompletionResponse(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=req.model,
            choices=choices,
            usage=_usage([ids], outputs),
            weight_version=_version(outputs),
            prompt_token_ids=ids if req.return_token_ids else None,
        )

    async def chat_ids(self, backend: GenerationBackend, req: ChatCompletionRequest) -> list[int]:
        """The conversation through the model's chat template (`assay.chat.render_chat`), as token ids."""
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        render = functools.partial(
            backend.chat_prompt,
            messages,
            add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message,
            template_kwargs=req.chat_template_kwargs,
        )
        try:
            return await maybe_off_loop(sum(len(m["content"]) for m in messages), render)
        except (NoChatTemplate, DroppedMessages) as exc:
            raise InvalidRequest(f"model {req.model!r}: {exc}", param="messages") from None
        except (TemplateError, TypeError) as exc:  # templates raise on what they cannot render (roles, order)
            raise InvalidRequest(f"the chat template refused these messages: {exc}", param="messages") from None
        except ValueError as exc:  # transformers: e.g. a final message continue_final_message cannot find
            raise InvalidRequest(f"the chat template cannot render these messages: {exc}", param="messages") from None

    # --- validation ----------------------------------------------------------------------

    def backend(self, model: str) -> GenerationBackend:
        """The served model of that name; NotReady while loading, ModelNotFound for other names."""
        if not self.ready:
            raise NotReady(
                "the policy server is still loading its models", code="not_ready", retry_after_s=LOADING_RETRY_AFTER_S
            )
        try:
            return self.backends[model]
        except KeyError:
            served = ", ".join(self.backends)
            raise ModelNotFound(
                f"the model {model!r} does not exist; this server has {served}", param="model", code="model_not_found"
            ) from None

    def _prompts(self, backend: GenerationBackend, prompt) -> list[tuple[list[int], str]]:
        """Every prompt as (token ids, text), checked: none empty, ids inside the vocabulary."""
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise InvalidRequest("`prompt` is an empty list; send at least one prompt", param="prompt")
        if len(prompt) > self.limits.max_prompts:
            raise InvalidRequest(
                f"{len(prompt)} prompts in one request, more than the limit of {self.limits.max_prompts}",
                param="prompt",
            )
        out = []
        vocab = backend.vocab_size()
        for i, p in enumerate(prompt):
            where = "`prompt`" if len(prompt) == 1 else f"prompt {i}"
            if not p:
                raise InvalidRequest(f"{where} is empty", param="prompt")
            if isinstance(p, str):
                out.append((backend.encode(p), p))
                continue
            if not all(0 <= t < vocab for t in p):
                raise InvalidRequest(f"{where} has token ids outside [0, {vocab})", param="prompt")
            out.append((list(p), backend.decode(p)))
        return out

    def _check_sampling(self, req, prompts: int, logprobs: int | None, logprobs_param: str) -> None:
        lim = self.limits
        if req.n > lim.max_n:
            raise InvalidRequest(f"n={req.n} is more than the limit of {lim.max_n}", param="n")
        if req.n * prompts > lim.max_sequences:
            raise InvalidRequest(
                f"{prompts} prompts x n={req.n} is {req.n * prompts} completions, more than "
                f"the limit of {lim.max_sequences}",
                param="n",
            )
        if logprobs is not None and logprobs > lim.max_logprobs:
            raise InvalidRequest(
                f"{logprobs_param}={logprobs} is more than the limit of {lim.max_logprobs}", param=logprobs_param
            )
        stops = req.stop_list()
        if len(stops) > lim.max_stop:
            raise InvalidRequest(f"{len(stops)} stop strings, more than the limit of {lim.max_stop}", param="stop")
        if any(not s for s in stops):
            raise InvalidRequest("a stop string is empty", param="stop")

    def room(self, backend: GenerationBackend, prompts: list[list[int]], max_tokens: int) -> int:
        """`max_tokens`, lowered to what the context and --max-tokens leave room for when the server
        clamps (`--clamp-max-tokens`; at least 1, so a prompt that fills the context is still refused)."""
        if not self.limits.clamp_max_tokens:
            return max_tokens
        room = backend.max_model_len - max(len(ids) for ids in prompts)
        return max(1, min(max_tokens, room, self.limits.max_tokens))

    def check_lengths(self, backend: GenerationBackend, prompts: list[list[int]], max_tokens: int, param: str) -> None:
        lim, context = self.limits, backend.max_model_len
        if max_tokens > lim.max_tokens:
            raise InvalidRequest(f"{param}={max_tokens} is more than the limit of {lim.max_tokens}", param=param)
        longest = max(len(ids) for ids in prompts)
        max_prompt = min(lim.max_prompt_tokens or context, context)
        if longest > max_prompt:
            raise InvalidRequest(
                f"the prompt has {longest} tokens, more than the limit of {max_prompt}",
                param="prompt",
                code="context_length_exceeded",
            )
        if longest + max_tokens > context:
            raise InvalidRequest(
                f"this model's context holds {context} tokens, and the request asks for {longest + max_tokens} "
                f"({longest} in the prompt, {max_tokens} to generate); lower {param}",
                param=param,
                code="context_length_exceeded",
            )

    # --- generation ----------------------------------------------------------------------

    def _requests(self, req, prompts: list[list[int]], max_tokens: int, top_logprobs: int) -> list[GenerationRequest]:
        """One sequence per choice, prompt by prompt: choice j of a prompt samples with seed + j."""
        if req.min_tokens > max_tokens:
            raise InvalidRequest(
                f"min_tokens={req.min_tokens} is more than max_tokens={max_tokens}", param="min_tokens"
            )
        seed = req.seed if req.seed is not None else random.getrandbits(63)
        common = dict(
            max_tokens=max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=max(req.top_k, 0),
            min_p=req.min_p,
            repetition_penalty=req.repetition_penalty,
            min_tokens=req.min_tokens,
            stop=tuple(req.stop_list()),
            top_logprobs=top_logprobs,
            ignore_eos=req.ignore_eos,
        )
        return [
            GenerationRequest(prompt_ids=ids, seed=(seed + j) % _SEEDS, **common)
            for ids in prompts
            for j in range(req.n)
        ]

    async def _generate(self, plan: Plan, model: str) -> list[GenerationOutput]:
        try:
            outputs = await asyncio.wait_for(plan.backend.generate(plan.requests), self.limits.timeout_s)
        except (Overloaded, GenerationFailed, InvalidParameters) as exc:
            raise backend_error(exc) from None
        except TimeoutError:
            raise self.deadline_exceeded() from None
        self.count_prompt_tokens(plan, model)
        return outputs

    def deadline_exceeded(self) -> DeadlineExceeded:
        return DeadlineExceeded(f"generation did not finish within {self.limits.timeout_s:g}s", code="timeout")

    def count_prompt_tokens(self, plan: Plan, model: str) -> None:
        """Once a request's sequences are generated: each prompt's tokens, once per prompt."""
        self.metrics.prompt_tokens.labels(model).inc(sum(len(ids) for ids, _ in plan.prompts))


Top = list[list[tuple[int, float]]] | None  # per token: its alternatives as (id, logprob), best first


def completion_logprobs(
    backend: GenerationBackend, token_ids: list[int], logprobs: list[float], top: Top, start: int, as_ids: bool = False
) -> CompletionLogprobs:
    """The legacy logprobs of these tokens, the first at character `start` of prompt + completion; `as_ids`
    names tokens "token_id:<id>" (`return_tokens_as_token_ids`) instead of by their text."""
    names = _token_ids if as_ids else backend.token_texts
    tokens = names(token_ids)
    offsets, at = [], start
    for token_id in token_ids:
        offsets.append(at)
        at += len(backend.visible_text(token_id))
    tops = []
    for position in top or [[] for _ in token_ids]:
        alternatives: dict[str, float] = {}
        for token, lp in zip(names([i for i, _ in position]), (lp for _, lp in position)):
            alternatives.setdefault(token, lp)  # two ids with one text (rare): keep the likelier
        tops.append(alternatives)
    return CompletionLogprobs(tokens=tokens, token_logprobs=logprobs, top_logprobs=tops, text_offset=offsets)


def chat_logprobs(
    backend: GenerationBackend, token_ids: list[int], logprobs: list[float], top: Top, as_ids: bool = False
) -> ChoiceLogprobs:
    names = _token_ids if as_ids else backend.token_texts
    content = []
    for token, lp, position in zip(names(token_ids), logprobs, top or [[] for _ in token_ids], strict=True):
        alternatives = [
            TopLogprob(token=t, logprob=alt, bytes=list(t.encode()))
            for t, (_, alt) in zip(names([i for i, _ in position]), position)
        ]
        content.append(TokenLogprob(token=token, logprob=lp, bytes=list(token.encode()), top_logprobs=alternatives))
    return ChoiceLogprobs(content=content)


async def maybe_off_loop(chars: int, fn: Callable[..., T], *args) -> T:
    """Tokenizing a few KB takes microseconds, a few MB takes a second: long prompts go to a thread."""
    return fn(*args) if chars <= _INLINE_CHARS else await asyncio.to_thread(fn, *args)


def _size(prompt: str | list) -> int:
    """Characters (or token ids) in a completions prompt, whatever its shape."""
    if isinstance(prompt, str):
        return len(prompt)
    return sum(len(p) if isinstance(p, (str, list)) else 1 for p in prompt)


def _token_ids(ids: list[int]) -> list[str]:
    """Tokens named by id, as vLLM's `return_tokens_as_token_ids` names them (TRL parses these)."""
    return [f"token_id:{i}" for i in ids]


def _text(out: GenerationOutput, with_stop: bool) -> str:
    """A choice's text; with `include_stop_str_in_output`, ending in the stop string that ended it."""
    return out.text + out.stop_reason if with_stop and out.stop_reason else out.text


def _usage(prompts: list[list[int]], outputs: list[GenerationOutput]) -> Usage:
    prompt_tokens = sum(len(ids) for ids in prompts)
    completion_tokens = sum(len(o.token_ids) for o in outputs)
    return Usage(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
    )


def _version(outputs: list[GenerationOutput]) -> int:
    # A request's sequences can straddle a weight update (split over two batches); each choice
    # carries its own version, and the response the oldest, so "at least this old" stays true.
    return min(o.weight_version for o in outputs)
