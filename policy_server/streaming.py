"""Server-sent-event streams of completions and chat completions, as vLLM's OpenAI server sends them.

A streamed request is planned as the non-streamed one is (`PolicyService.plan_completions`,
`plan_chat`: the same checks, the same refusals), then generated with the backend's
`generate_streaming`, whose reports (`backends.Progress`) reach the `Stream` on the event loop.
Nothing is sent before the backend has taken the request (its first report, or the end of the
generation): a full queue, or a failure at once, is still the usual JSON 4xx/5xx (`Stream.start`).
After that each report becomes one chunk of its choice, `data: {chunk}\\n\\n`:

- Text: a choice's tokens are detokenized incrementally, from the last offset where the text was
  whole (as vLLM and TGI do: a token that ends mid-character adds nothing yet), and text that may be
  the start of a stop string is held back until later tokens show it is not one. When the sequence
  ends, the rest of its output's text goes with its finish_reason, so the chunks' texts add up to the
  non-streamed text (`_Text`).
- Choices interleave by `index`, numbered as in the response (prompt by prompt, n each); a chat
  choice's first chunk is `delta: {role: assistant, content: ""}`, sent before its first text.
- Every chunk carries the weight version of its choice's batch, on the choice and at the top;
  a version changes only between batches (`backends.hf`: a batch decodes under the weights lock).
- `logprobs` and `return_token_ids` give each chunk its tokens' entries (a completion choice's
  `prompt_token_ids` on its first chunk, a chat stream's at the top of its first chunks).
- `stream_options.include_usage` (true when stream_options is sent, as in vLLM): a last chunk with
  the request's `usage` and no choices; `continuous_usage_stats`: each chunk with its choice's usage.

An error after the stream started (a sequence failed, the deadline passed) is a last event
`data: {"error": {...}}` in OpenAI's error shape, and so is the server's drain cutting a stream
off (`cut_off`: a 503 `shutting_down`, which a retry elsewhere answers); every stream that is not
cut off by its client ends with `data: [DONE]\\n\\n`. A stream whose client goes away is
cancelled (`close`) as a non-streamed request is: its queued sequences are dropped, its running
ones stop at the next decode step.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from assay.policy_server.backends import (
    GenerationBackend,
    GenerationFailed,
    GenerationOutput,
    InvalidParameters,
    Overloaded,
    TokenDelta,
)
from assay.policy_server.errors import ApiError, NotReady, backend_error
from assay.policy_server.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatStreamChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionStreamChoice,
    DeltaMessage,
    ErrorInfo,
    ErrorResponse,
    StreamOptions,
    Usage,
)
from assay.policy_server.serving import Plan, PolicyService, Top, chat_logprobs, completion_logprobs

log = logging.getLogger(__name__)
DONE = "data: [DONE]\n\n"
_END = object()  # queued when the generation ends, after every report


def sse(chunk: ChatCompletionChunk | CompletionChunk | ErrorResponse) -> str:
    """One event; fields left unset stay out, as in vLLM's chunks (finish_reason: null is set)."""
    return f"data: {chunk.model_dump_json(exclude_unset=True)}\n\n"


def _error_event(exc: ApiError) -> str:
    """An error after the stream started, in OpenAI's error shape, as vLLM sends it."""
    return sse(ErrorResponse(error=ErrorInfo(message=exc.message, type=exc.type, param=exc.param, code=exc.code)))


class _Text:
    """One choice's text as its tokens arrive: what is final is sent, the rest held back."""

    def __init__(self, backend: GenerationBackend, stops: Sequence[str]) -> None:
        self.backend, self.stops = backend, stops
        self.tokens: list[int] = []
        self.prefix = self.read = 0  # tokens[prefix:read] decode to the end of `text`, whole
        self.text = ""
        self.sent = 0  # characters of `text` sent

    def add(self, token_ids: list[int]) -> str:
        """The text these tokens make final."""
        self.tokens += token_ids
        # A window that starts a token early keeps what the tokenizer does at a word's start (a
        # leading space); bytes that end mid-character decode to U+FFFD, and wait for the next token.
        before = self.backend.decode(self.tokens[self.prefix : self.read])
        after = self.backend.decode(self.tokens[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self.prefix, self.read = self.read, len(self.tokens)
        safe = self._safe()
        new = self.text[self.sent : safe]
        self.sent = max(self.sent, safe)
        return new

    def _safe(self) -> int:
        """How much of the text is final: all of it, but a stop string and what may be the start of one."""
        text, cut = self.text, len(self.text)
        # what was sent held no stop string nor the start of one: a stop string can only begin after it
        hits = [at for s in self.stops if (at := text.find(s, self.sent)) >= 0]
        if hits:
            return min(hits)
        for s in self.stops:
            for k in range(min(len(s) - 1, cut - self.sent), 0, -1):  # the longest end of text that begins s
                if text.endswith(s[:k]):
                    cut = min(cut, len(text) - k)
                    break
        return cut

    def rest(self, final: str) -> str:
        """What the sequence's final text adds to what was sent."""
        sent = self.text[: self.sent]
        if not final.startswith(sent):  # a tokenizer whose pieces do not add up to its whole decode
            log.warning("a streamed choice sent %r, which does not begin its final text %r", sent, final)
        return final[len(sent) :]


@dataclass
class _Choice:
    text: _Text
    offset: int  # completions' logprobs: the character of prompt + completion its next token starts at
    tokens: int = 0  # tokens sent
    chunks: int = 0  # chunks with its text sent
    started: bool = False  # its opening was sent
    finished: bool = False


class Stream:
    """One streamed request: `await start()` (refusals raise, as `ApiError`), then `events()`."""

    kind: Literal["completion", "chat"]

    def __init__(self, service: PolicyService, req: CompletionRequest | ChatCompletionRequest) -> None:
        self.service, self.req = service, req
        self.options = req.stream_options or StreamOptions(include_usage=False)
        self.id = f"{'cmpl' if self.kind == 'completion' else 'chatcmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.error: ApiError | None = None  # what ended the stream after it started
        self.finished = False  # it sent its last event
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._task: asyncio.Task[list[GenerationOutput]] | None = None
        self._first: Any = None

    async def plan(self) -> Plan:
        raise NotImplementedError

    async def start(self) -> None:
        """Plan and submit the request; return once the backend has taken it."""
        self._plan = plan = await self.plan()
        stops = list(plan.requests[0].stop) if plan.requests else []
        prompt_chars = [len(plan.prompts[i // self.req.n][1]) for i in range(len(plan.requests))]
        self._choices = [_Choice(_Text(plan.backend, stops), chars) for chars in prompt_chars]
        self._task = asyncio.ensure_future(self._generate())
        self._task.add_done_callback(lambda _: self._queue.put_nowait(_END))
        try:
            self._first = await self._queue.get()
            if self._first is _END:
                self._outcome()  # refused or failed before any token: the usual error answer
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Cancel what still generates (the client went away, or the stream was cut off)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()

    async def _generate(self) -> list[GenerationOutput]:
        async with asyncio.timeout(self.service.limits.timeout_s):
            return await self._plan.backend.generate_streaming(self._plan.requests, self._report)

    def _report(self, i: int, event: TokenDelta | GenerationOutput | GenerationFailed) -> None:
        self._queue.put_nowait((i, event))

    def _outcome(self) -> list[GenerationOutput]:
        """The generation's outputs, or its failure as the API error it is."""
        assert self._task is not None and self._task.done()
        try:
            return self._task.result()
        except (Overloaded, GenerationFailed, InvalidParameters) as exc:
            raise backend_error(exc) from None
        except TimeoutError:
            raise self.service.deadline_exceeded() from None

    async def events(self) -> AsyncIterator[str]:
        """The stream's events, each a `data: ...` line, `data: [DONE]` last."""
        try:
            item = self._first
            while item is not _END:
                i, event = item
                for chunk in self._on(i, event):
                    yield chunk
                item = await self._queue.get()
            outputs = self._outcome()
            for i, out in enumerate(outputs):  # what no report brought (a backend that reports nothing)
                for chunk in self._on(i, out):
                    yield chunk
            self.service.count_prompt_tokens(self._plan, self.req.model)
            if self.options.include_usage:
                yield self._usage(outputs)
        except ApiError as exc:
            self.error = exc
            yield _error_event(exc)
        finally:
            self.close()
        self.finished = True
        yield DONE

    def cut_off(self) -> str:
        """The last events of a stream the server cut off (its drain ended): an error a retry may
        answer, and the end."""
        self.error = NotReady(
            "the server is shutting down and cut this stream off; retry the request", code="shutting_down"
        )
        self.finished = True
        return _error_event(self.error) + DONE

    def _on(self, i: int, event: TokenDelta | GenerationOutput | GenerationFailed) -> list[str]:
        """The chunks one report of choice i makes."""
        choice = self._choices[i]
        if choice.finished:
            return []
        if isinstance(event, GenerationFailed):
            raise backend_error(event)
        chunks = []
        if not choice.started:
            choice.started = True
            chunks += self._opening(i, event.weight_version)
        if isinstance(event, TokenDelta):
            text = choice.text.add(event.token_ids)
            ids, logprobs, tops, reason, stop = event.token_ids, event.logprobs, event.top_logprobs, None, None
        elif event.finish_reason == "abort":  # only when cancelled, and then nobody reads
            return chunks
        else:
            choice.finished = True
            at = choice.tokens
            ids, logprobs = event.token_ids[at:], event.logprobs[at:]
            tops = event.top_logprobs[at:] if event.top_logprobs is not None else None
            text, reason, stop = choice.text.rest(event.text), event.finish_reason, event.stop_reason
        choice.tokens += len(ids)
        chunks.append(self._chunk(i, text, ids, logprobs, tops, reason, stop, event.weight_version))
        choice.chunks += 1
        return chunks

    def _opening(self, i: int, version: int) -> list[str]:
        """What goes before a choice's first text (chat: its role)."""
        return []

    def _chunk(
        self,
        i: int,
        text: str,
        ids: list[int],
        logprobs: list[float],
        tops: Top,
        reason: str | None,
        stop: str | None,
        version: int,
    ) -> str:
        raise NotImplementedError

    def _usage_so_far(self, i: int) -> dict[str, Usage]:
        """`usage` for a chunk of choice i with continuous_usage_stats, else nothing."""
        if not self.options.continuous_usage_stats:
            return {}
        prompt, completion = len(self._plan.prompts[i // self.req.n][0]), self._choices[i].tokens
        return {"usage": Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)}

    def _usage(self, outputs: list[GenerationOutput]) -> str:
        prompt = sum(len(ids) for ids, _ in self._plan.prompts)
        completion = sum(len(o.token_ids) for o in outputs)
        usage = Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
        version = min(o.weight_version for o in outputs)
        head = dict(id=self.id, object=self._object, created=self.created, model=self.req.model, choices=[])
        model = CompletionChunk if self.kind == "completion" else ChatCompletionChunk
        return sse(model(**head, usage=usage, weight_version=version))

    @property
    def _object(self) -> str:
        return "text_completion" if self.kind == "completion" else "chat.completion.chunk"


class CompletionStream(Stream):
    kind = "completion"
    req: CompletionRequest

    async def plan(self) -> Plan:
        return await self.service.plan_completions(self.req)

    def _chunk(self, i, text, ids, logprobs, tops, reason, stop, version) -> str:
        req, choice = self.req, self._choices[i]
        fields: dict[str, Any] = dict(index=i, text=text, finish_reason=reason, weight_version=version)
        if reason is not None:
            fields["stop_reason"] = stop
        if req.logprobs is not None:
            fields["logprobs"] = completion_logprobs(
                self._plan.backend, ids, logprobs, tops, choice.offset, req.return_tokens_as_token_ids
            )
            choice.offset += sum(len(self._plan.backend.visible_text(t)) for t in ids)
        if req.return_token_ids:
            fields["token_ids"] = ids
            if choice.chunks == 0:
                fields["prompt_token_ids"] = self._plan.prompts[i // req.n][0]
        return sse(
            CompletionChunk(
                id=self.id,
                object="text_completion",
                created=self.created,
                model=req.model,
                choices=[CompletionStreamChoice(**fields)],
                weight_version=version,
                **self._usage_so_far(i),
            )
        )


class ChatStream(Stream):
    kind = "chat"
    req: ChatCompletionRequest

    async def plan(self) -> Plan:
        return await self.service.plan_chat(self.req)

    def _opening(self, i: int, version: int) -> list[str]:
        role = ChatStreamChoice(
            index=i, delta=DeltaMessage(role="assistant", content=""), finish_reason=None, weight_version=version
        )
        extra: dict[str, Any] = {"prompt_token_ids": self._plan.prompts[0][0]} if self.req.return_token_ids else {}
        return [self._send(role, version, i, **extra)]

    def _chunk(self, i, text, ids, logprobs, tops, reason, stop, version) -> str:
        req = self.req
        fields: dict[str, Any] = dict(index=i, delta=DeltaMessage(content=text), finish_reason=reason)
        if reason is not None:
            fields["stop_reason"] = stop
        if req.logprobs:
            fields["logprobs"] = chat_logprobs(self._plan.backend, ids, logprobs, tops, req.return_tokens_as_token_ids)
        if req.return_token_ids:
            fields["token_ids"] = ids
        return self._send(ChatStreamChoice(**fields, weight_version=version), version, i)

    def _send(self, choice: ChatStreamChoice, version: int, i: int, **extra: Any) -> str:
        return sse(
            ChatCompletionChunk(
                id=self.id,
                object="chat.completion.chunk",
                created=self.created,
                model=self.req.model,
                choices=[choice],
                weight_version=version,
                **self._usage_so_far(i),
                **extra,
            )
        )
