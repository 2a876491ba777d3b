"""Numeric reward models: outcome (sequence classification) and process (token classification).

The text a model reads is built here and only here, from the spec's `template` (or the
tokenizer's chat template when `chat_template: true`), so the text the reward model scores in
serving is the text it was trained on. A prompt sent as a conversation (`messages`) is rendered
with the reward model's own chat template, whatever template the policy used: a reward model on
another tokenizer than the policy reads the exchange as it was trained to. A reward without
`chat_template` fails such items `invalid_input` rather than flatten the conversation into a
text it never saw. Scores come from the model through the batcher:

- outcome: the model's pooled logit (sigmoid with `activation: sigmoid`); per-token prefix
  scores apply the score head at every response token (exact for causal models, whose prefix
  representation does not see later tokens);
- process: P(good) at the last token of each step (sigmoid for one label, softmax label 1 for
  two), aggregated into the outcome by min, product, last or mean.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from jinja2 import TemplateError

from assay.base.batcher import Batcher
from assay.base.errors import LOADING_RETRY_AFTER_S, InvalidRequest, NotReady
from assay.chat import has_chat_template, render_exchange, render_prompt
from assay.data import Text
from assay.rm_server.backends import OutOfMemory
from assay.rm_server.protocol import ErrorType, Granularity
from assay.rm_server.rewards.base import (
    Item,
    ItemFailure,
    Outcome,
    Reward,
    Scored,
    check_template,
    fill_template,
    until_deadline,
)
from assay.rm_server.spec import OutcomeModelSpec, ProcessModelSpec

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from assay.rm_server.backends import Kind, ScoringBackend

log = logging.getLogger(__name__)


def _activated(logit: float, activation: str) -> float:
    """An outcome model's score: its logit, or the logit's sigmoid with `activation: sigmoid`."""
    return 1.0 / (1.0 + math.exp(-logit)) if activation == "sigmoid" else logit


@dataclass(frozen=True)
class _Encoded:
    ids: list[int]
    spans: list[tuple[int, int]]  # per token, [start, end) in text
    text: str
    response_span: tuple[int, int]  # [start, end) of the response in text


def step_ends(response: str, how: str) -> list[int]:
    """Character offsets (exclusive) where each step of the response ends."""
    if how == "arith":
        from assay.arith.checks import segments

        return [s.end for s in segments(response)]
    sep = r"\n" if how == "lines" else r"\n\s*\n"
    ends, pos = [], 0
    for part in re.split(f"({sep})", response):
        pos += len(part)
        if part.strip() and not re.fullmatch(sep, part):
            ends.append(pos - (len(part) - len(part.rstrip())))
    return ends


def _token_at(spans: Sequence[tuple[int, int]], char: int) -> int:
    """Index of the last token covering `char` (special tokens have empty spans)."""
    for i in range(len(spans) - 1, -1, -1):
        start, end = spans[i]
        if start <= char < end:
            return i
    raise ValueError(f"no token covers character {char}")


class ModelReward(Reward):
    """A reward computed by a local Hugging Face checkpoint."""

    def __init__(
        self,
        name: str,
        reward_id: str,
        spec: OutcomeModelSpec | ProcessModelSpec,
        path,
        *,
        worker_threads: int | None = None,
    ) -> None:
        """`worker_threads`: run the model in a worker process with that many torch threads
        (`backends.worker`; the transformers backend only); None: on the batcher's thread here."""
        super().__init__(name, reward_id)
        self.spec, self.path, self.worker_threads = spec, path, worker_threads
        self.type = spec.type
        self.process = isinstance(spec, ProcessModelSpec)
        self.granularities = frozenset(
            {Granularity.outcome, Granularity.steps, Granularity.tokens}
            if self.process
            else {Granularity.outcome, Granularity.tokens}
        )
        if not spec.chat_template:
            check_template(spec.template)
        self.backend: ScoringBackend | None = None  # these three once started
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.batcher: Batcher | None = None
        self._tokenizing: ThreadPoolExecutor | None = None  # one thread: a fast tokenizer is not to be shared
        self.on_batch = None  # set by the service to record batch metrics

    async def start(self) -> None:
        from assay.checkpoints import check_device
        from assay.rm_server.backends import load_backend
        from assay.rm_server.backends.worker import WorkerBackend

        try:  # one sentence naming the reward, before any weights are read
            check_device(self.spec.device)
        except ValueError as exc:
            raise ValueError(f"reward {self.name!r}: {exc}") from None
        kind: Kind = "process" if self.process else "outcome"
        backend: ScoringBackend
        if self.worker_threads is not None and self.spec.backend == "transformers":
            worker = await asyncio.to_thread(  # starts the worker and waits while it loads the weights
                WorkerBackend,
                self.spec.backend,
                self.path,
                kind,
                label=self.name,
                torch_threads=self.worker_threads,
                device=self.spec.device,
                dtype=self.spec.dtype,
            )
            log.info("reward %r: model worker pid %s, %d torch threads", self.name, worker.pid, worker.torch_threads)
            backend, tokenizer = worker, worker.tokenizer
        else:  # loading weights takes a while
            backend, tokenizer = await asyncio.to_thread(
                load_backend, self.spec.backend, self.path, kind, self.spec.device, self.spec.dtype
            )
        self.backend, self.tokenizer = backend, tokenizer
        if self.spec.chat_template and not has_chat_template(tokenizer):
            raise ValueError(
                f"reward {self.name!r}: `chat_template: true`, but the tokenizer of {self.path} has no chat "
                "template; add one to the checkpoint, or give a `template` instead"
            )
        # A spec may allow more tokens than the model has positions for: the model's limit wins.
        self.max_tokens = min(self.spec.max_tokens, backend.max_positions or self.spec.max_tokens)
        labels = backend.num_labels
        if (not self.process and labels != 1) or (self.process and labels not in (1, 2)):
            raise ValueError(
                f"reward {self.name!r}: {self.path} has {labels} labels; an outcome model needs 1, "
                "a process model 1 (sigmoid) or 2 (softmax, label 1 = good)"
            )
        self.batcher = Batcher(
            self._run_batch,
            name=self.name,
            max_items=self.spec.max_batch_items,
            max_tokens=self.spec.batch_tokens(),
            max_wait_s=self.spec.max_wait_ms / 1000,
            max_queue=self.spec.max_queue,
            on_batch=lambda n, t: self.on_batch and self.on_batch(self.name, n, t),
        )
        self.batcher.start()
        self._tokenizing = ThreadPoolExecutor(1, thread_name_prefix=f"tokenize-{self.name}")

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.close()
        if self._tokenizing is not None:
            self._tokenizing.shutdown(wait=True, cancel_futures=True)
        if self.backend is not None:
            await asyncio.to_thread(self.backend.close)

    def ready(self) -> bool:
        return self.backend is not None and self.backend.ready

    def queue_depth(self) -> int:
        return self.batcher.depth() if self.batcher else 0

    # --- text --------------------------------------------------------------------------------

    def render(self, prompt: Text, response: str) -> tuple[str, int]:
        """(text the model reads, index where the response starts in it).

        With `chat_template`, the conversation (a text prompt: one user turn) and the response as
        the assistant's turn, through this model's tokenizer (`assay.chat`); else the spec's
        `template`, which takes text only (a conversation: ItemFailure invalid_input)."""
        if self.spec.chat_template:
            assert self.tokenizer is not None, "started"
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            try:
                text = render_exchange(self.tokenizer, messages, response)
                # The response is looked for after the prompt's own rendering when that is a prefix
                # (it is for ChatML-like templates), so text of the prompt is never taken for it.
                head = render_prompt(self.tokenizer, messages)
            except TemplateError as exc:  # a template's raise_exception: roles that must alternate, ...
                why = f"reward {self.name!r}: its chat template refuses this conversation: {exc}"
                raise ItemFailure(ErrorType.invalid_input, why) from None
            start = text.find(response, len(head)) if text.startswith(head) else text.rfind(response)
            if start < 0:
                raise ItemFailure(ErrorType.invalid_input, "the chat template altered the response text")
            return text, start
        if not isinstance(prompt, str):
            raise ItemFailure(
                ErrorType.invalid_input,
                f"reward {self.name!r} reads text through its `template` and has no chat template to render "
                "`messages` with: send the prompt as text in `prompt`, or serve the model with `chat_template: true`",
            )
        return fill_template(self.spec.template, prompt, response)

    def encode(self, items: Sequence[Item]) -> list[_Encoded | ItemFailure]:
        """Each item as the model reads it, or why it cannot be (that item fails, the others go on).
        An item over `max_tokens` (with `truncation: error`) refuses the whole request."""
        rendered: list[tuple[str, int] | ItemFailure] = []
        for it in items:
            try:
                rendered.append(self.render(it.prompt, it.response))
            except ItemFailure as failure:
                rendered.append(failure)
        spans = [
            r if isinstance(r, ItemFailure) else (r[0], (r[1], r[1] + len(it.response)))
            for it, r in zip(items, rendered, strict=True)
        ]
        # a chat template writes its own specials
        return self._tokenize(spans, [it.id for it in items], add_special_tokens=not self.spec.chat_template)

    def encode_texts(self, texts: Sequence[str], add_special_tokens: bool) -> list[_Encoded | ItemFailure]:
        """Whole texts as they are, the model reading all of each (vLLM's pooling requests: the
        client rendered them); the text counts as the response."""
        return self._tokenize(
            [(t, (0, len(t))) for t in texts], [str(i) for i in range(len(texts))], add_special_tokens
        )

    def _tokenize(
        self,
        rendered: Sequence[tuple[str, tuple[int, int]] | ItemFailure],
        ids: Sequence[str],
        add_special_tokens: bool,
    ) -> list[_Encoded | ItemFailure]:
        """(text, response span) per item, or its failure, tokenized in one call."""
        texts = [r[0] for r in rendered if not isinstance(r, ItemFailure)]
        assert self.tokenizer is not None, "started"
        tokenized: Iterator[tuple[Any, Any]] = iter([])  # (ids, offsets) per rendered text
        if texts:
            enc = self.tokenizer(texts, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
            tokenized = iter(zip(enc["input_ids"], enc["offset_mapping"], strict=True))
        out: list[_Encoded | ItemFailure] = []
        for item_id, r in zip(ids, rendered, strict=True):
            if isinstance(r, ItemFailure):
                out.append(r)
                continue
            (text, span), (token_ids, offsets) = r, next(tokenized)
            offsets = [tuple(s) for s in offsets]
            if len(token_ids) > self.max_tokens:
                if self.spec.truncation == "error":
                    raise InvalidRequest(
                        f"item {item_id!r} is {len(token_ids)} tokens for reward {self.name!r}, over its max_tokens "
                        f"{self.max_tokens}; shorten it or set `truncation: left` in the spec"
                    )
                token_ids = token_ids[-self.max_tokens :]  # offsets stay whole: `dropped` maps them
            out.append(_Encoded(list(token_ids), offsets, text, span))
        return out

    # --- scoring -----------------------------------------------------------------------------

    def _run_batch(self, batch: list[tuple[str, list[int]]]) -> list[np.ndarray]:
        """Worker thread: one forward per mode present ("pooled" or "tokens")."""
        assert self.backend is not None, "started"
        out: dict[int, np.ndarray] = {}
        for mode, fn in (("pooled", self.backend.pooled), ("tokens", self.backend.per_token)):
            rows = [i for i, (m, _) in enumerate(batch) if m == mode]
            if rows:
                for i, r in zip(rows, fn([batch[i][1] for i in rows]), strict=True):
                    out[i] = r
        return [out[i] for i in range(len(batch))]

    async def score(self, items: Sequence[Item], granularity: Granularity) -> list[Outcome]:
        if not self.ready():
            raise NotReady(f"reward {self.name!r}: its model worker is restarting", retry_after_s=LOADING_RETRY_AFTER_S)
        # Off the event loop, so that a large request's tokenizing stalls no other request; a fast
        # tokenizer releases the GIL while it encodes a batch, so it overlaps the forward too.
        encoded = await asyncio.get_running_loop().run_in_executor(self._tokenizing, self.encode, items)
        return await self._score_encoded(encoded, granularity)

    async def score_texts(self, texts: Sequence[str], add_special_tokens: bool) -> list[tuple[Outcome, int]]:
        """An outcome model's raw logit for each whole text (no template, no activation: vLLM's
        pooling routes apply theirs), with the tokens it read."""
        if self.process:
            raise InvalidRequest(f"reward {self.name!r} is a process model: it scores steps of a response, not texts")
        if not self.ready():
            raise NotReady(f"reward {self.name!r}: its model worker is restarting", retry_after_s=LOADING_RETRY_AFTER_S)
        encode = functools.partial(self.encode_texts, texts, add_special_tokens)
        encoded = await asyncio.get_running_loop().run_in_executor(self._tokenizing, encode)
        outcomes = await self._score_encoded(encoded, Granularity.outcome, raw=True)
        return [(o, 0 if isinstance(e, ItemFailure) else len(e.ids)) for o, e in zip(outcomes, encoded, strict=True)]

    async def _score_encoded(
        self, encoded: Sequence[_Encoded | ItemFailure], granularity: Granularity, raw: bool = False
    ) -> list[Outcome]:
        """Through the batcher; `raw`: an outcome model's logit, before the spec's activation."""
        todo = [e for e in encoded if not isinstance(e, ItemFailure)]
        mode = "pooled" if not self.process and granularity == Granularity.outcome else "tokens"
        assert self.batcher is not None, "started"
        futures = self.batcher.submit([(mode, e.ids) for e in todo], [len(e.ids) for e in todo]) if todo else []
        # Items still queued at the deadline are cancelled (the batcher drops them); the rest keep
        # their scores. A request cancelled outright (client gone) cancels all of them.
        raws = iter(await until_deadline(futures))
        results: list[Outcome] = []
        for e in encoded:
            if isinstance(e, ItemFailure):
                results.append(e)
                continue
            out = next(raws)
            try:
                if isinstance(out, BaseException):
                    raise out
                results.append(Scored(float(out[0])) if raw else self._finish(e, out, granularity))
            except ItemFailure as exc:
                results.append(exc)
            except OutOfMemory as exc:  # retryable: the same items fit in a smaller batch
                why = (
                    f"reward {self.name!r}: {exc}; retry, and lower the spec's max_batch_tokens "
                    f"({self.spec.batch_tokens()}) or max_batch_items ({self.spec.max_batch_items}) if it recurs"
                )
                results.append(ItemFailure(ErrorType.overloaded, why))
            except (ValueError, RuntimeError) as exc:
                results.append(ItemFailure(ErrorType.internal, f"reward {self.name!r}: {exc}"))
        return results

    def _prob(self, logits: np.ndarray) -> np.ndarray:
        """[seq, labels] -> [seq] P(good) for a process model."""
        if logits.shape[-1] == 1:
            return 1.0 / (1.0 + np.exp(-logits[:, 0]))
        z = logits - logits.max(-1, keepdims=True)
        p = np.exp(z)
        return p[:, 1] / p.sum(-1)

    def _finish(self, e: _Encoded, raw: np.ndarray, granularity: Granularity) -> Scored:
        dropped = len(e.spans) - len(e.ids)  # tokens truncated on the left (0 unless truncation)
        start, end = e.response_span
        response_tokens = [i for i, (s, t) in enumerate(e.spans) if t > s and s >= start and t <= end]
        if isinstance(self.spec, OutcomeModelSpec):
            activation = self.spec.activation
            if granularity == Granularity.outcome:
                return Scored(_activated(float(raw[0]), activation))
            per = [_activated(float(x), activation) for x in raw[:, 0]]
            return Scored(
                per[-1],
                tokens=[
                    (e.text[e.spans[i][0] : e.spans[i][1]], per[i - dropped]) for i in response_tokens if i >= dropped
                ],
            )
        probs = self._prob(raw)
        ends = step_ends(e.text[start:end], self.spec.steps)
        positions = [_token_at(e.spans, start + c - 1) - dropped for c in ends]
        steps = [float(probs[p]) for p in positions if p >= 0]
        if not steps:
            raise ItemFailure(ErrorType.invalid_input, "the response has no steps to score")
        value = {
            "min": min(steps),
            "prod": math.prod(steps),
            "last": steps[-1],
            "mean": sum(steps) / len(steps),
        }[self.spec.aggregate]
        tokens = None
        if granularity == Granularity.tokens:
            tokens = [
                (e.text[e.spans[i][0] : e.spans[i][1]], float(probs[i - dropped]))
                for i in response_tokens
                if i >= dropped
            ]
        return Scored(value, steps=steps if granularity != Granularity.outcome else None, tokens=tokens)
