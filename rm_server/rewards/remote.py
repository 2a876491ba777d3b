"""Rewards another server computes: a vLLM or SGLang classifier, or any OpenRLHF reward server.

    rm:    {type: remote.vllm_classify, url: "http://10.0.0.5:8000", model: my-orm, use_activation: true}
    math:  {type: remote.openrlhf, url: "http://10.0.0.6:5000/get_reward"}

A team already running `vllm serve --runner pooling` (or an OpenRLHF reward server) points a
reward at it instead of loading the model a second time. Such a reward keeps every promise of a
local one: items of concurrent requests share requests to the server through the same batcher as
a model reward's (`max_batch_items`, `max_wait_ms`, `max_queue` -> 429, and up to
`max_concurrency` batches in flight); the request's deadline bounds every call, retries included;
each item fails typed (`remote_unavailable` when a retry may mend it, `remote_error` when not,
`timeout`), and an answer of the wrong shape or length fails the batch's items naming what was
wrong, never a score. The connection (key, start-up check, retries) is `endpoint.Endpoint`, the
judge's too.

- `remote.vllm_classify`: one `POST {url}/classify` per batch, `{"model", "input": [text, ...],
  "use_activation"}` (vLLM's pooling protocol; SGLang's `/v1/classify` with `url: .../v1`), the
  score being `data[i].probs[index]`, matched by `data[i].index`. With `chat_template: true` each
  item goes alone as `{"model", "messages": [...prompt turns, assistant: response]}`: the server
  renders it with its own model's chat template, as a local `chat_template: true` reward does.
- `remote.openrlhf`: one `POST {url}` per batch, `{"query": [prompt + response, ...], "prompts",
  "labels": [reference, ...]}` (OpenRLHF's remote reward protocol), the score being
  `rewards[i]` (or `scores[i]`, `key: scores`).

The text is the spec's `template` over the prompt text; a conversation (`messages`) has no
text here without the remote model's template, so such an item fails `invalid_input` unless
`chat_template: true` sends it as messages. The reward id covers the URL, model, template and
the other defining fields: it names a server, not the weights it serves (`pinned` is false).
"""

from __future__ import annotations

import asyncio
import math
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from assay.base.batcher import Batcher
from assay.rm_server.protocol import ErrorType, Granularity
from assay.rm_server.rewards.base import (
    DEADLINE,
    Item,
    ItemFailure,
    Outcome,
    Reward,
    Scored,
    check_template,
    fill_template,
    until_deadline,
)
from assay.rm_server.rewards.endpoint import SNIPPET, Endpoint
from assay.rm_server.spec import OpenRLHFSpec, RemoteSpec, VllmClassifySpec


@dataclass(frozen=True)
class _Ask:
    """What one item sends, and until when its request waits."""

    input: str | list[dict[str, str]]  # the template's text, or (chat_template) the conversation and the response
    prompt: str  # the text before the response (chat: empty)
    reference: str | None
    deadline: float | None  # event-loop time; None: none


class RemoteReward(Reward):
    """What both remote types share: rendering, the batcher, the endpoint; the wire shape is theirs."""

    needs_reference = False
    granularities = frozenset({Granularity.outcome})
    pinned = False

    def __init__(self, name: str, reward_id: str, spec: RemoteSpec) -> None:
        super().__init__(name, reward_id)
        self.spec = spec
        self.type = spec.type
        if not self.chat:
            check_template(spec.template)
        self.endpoint = Endpoint(
            f"reward {name!r}",
            f"{spec.type} server",
            api_key_env=spec.api_key_env,
            timeout_s=spec.timeout_s,
            max_concurrency=spec.max_concurrency,
            retries=spec.retries,
        )
        self.batcher: Batcher[_Ask, Outcome] | None = None

    @property
    def chat(self) -> bool:
        return False

    async def start(self) -> None:
        await self.endpoint.start(*self.start_check())
        # Items cost 1 each: a remote batch is bounded by its items (the server has its own token limits).
        n = self.spec.max_batch_items
        self.batcher = Batcher(
            self._run_batch,
            name=self.name,
            max_items=n,
            max_tokens=n,
            max_wait_s=self.spec.max_wait_ms / 1000,
            max_queue=self.spec.max_queue,
            concurrency=self.spec.max_concurrency,
        )
        self.batcher.start()

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.close()
        await self.endpoint.close()

    def queue_depth(self) -> int:
        return self.batcher.depth() if self.batcher else 0

    async def score(self, items: Sequence[Item], granularity: Granularity) -> list[Outcome]:
        if granularity != Granularity.outcome:
            why = f"a remote reward scores outcomes, not {granularity.value}"
            return [ItemFailure(ErrorType.invalid_input, why)] * len(items)
        deadline = DEADLINE.get()
        payloads: list[_Ask | ItemFailure] = []
        for item in items:
            try:
                payloads.append(self._ask(item, deadline))
            except ItemFailure as failure:
                payloads.append(failure)
        todo = [p for p in payloads if not isinstance(p, ItemFailure)]
        assert self.batcher is not None, "started"
        futures = self.batcher.submit(todo, [1] * len(todo)) if todo else []
        done = iter(await until_deadline(futures))
        out: list[Outcome] = []
        for p in payloads:
            o = p if isinstance(p, ItemFailure) else next(done)
            if isinstance(o, BaseException) and not isinstance(o, ItemFailure):
                raise o  # a bug of ours, not the server's: let it show
            out.append(o)
        return out

    def _ask(self, item: Item, deadline: float | None) -> _Ask:
        """The text the server scores (the template's), or the conversation (chat_template)."""
        if self.chat:
            turns = [{"role": "user", "content": item.prompt}] if isinstance(item.prompt, str) else item.prompt
            return _Ask([*turns, {"role": "assistant", "content": item.response}], "", item.reference, deadline)
        if not isinstance(item.prompt, str):
            raise ItemFailure(
                ErrorType.invalid_input,
                f"reward {self.name!r} sends text made by its `template` and cannot render `messages`: send the "
                "prompt as text in `prompt`"
                + (", or set `chat_template: true`" if isinstance(self.spec, VllmClassifySpec) else ""),
            )
        text, start = fill_template(self.spec.template, item.prompt, item.response)
        return _Ask(text, text[:start], item.reference, deadline)

    async def _run_batch(self, batch: list[_Ask]) -> list[Outcome]:
        """One batch: the server's scores, or the same failure for each of its items."""
        deadlines = [a.deadline for a in batch]
        deadline = None if None in deadlines else max(d for d in deadlines if d is not None)  # the latest waiter's
        try:
            return [Scored(v) for v in await self.ask(batch, deadline)]
        except ItemFailure as failure:
            return [failure] * len(batch)

    @abstractmethod
    def start_check(self) -> tuple[str, Any]:
        """The start-up check: the URL and the JSON body to POST there with the key."""

    @abstractmethod
    async def ask(self, batch: list[_Ask], deadline: float | None) -> list[float]:
        """One score per payload, from the server; ItemFailure when it cannot give them."""

    def _wrong(self, url: str, answer: Any, what: str) -> ItemFailure:
        return ItemFailure(
            ErrorType.remote_error, f"{self.spec.type} server {url}: {what} in {str(answer)[:SNIPPET]!r}"
        )

    def _number(self, url: str, answer: Any, value: Any, where: str) -> float:
        """`value` as a finite score, or a remote_error naming where it was."""
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise self._wrong(url, answer, f"{where} is {value!r}, not a finite number")
        return float(value)


class VllmClassifyReward(RemoteReward):
    """`remote.vllm_classify`: a classifier behind vLLM's or SGLang's `/classify`."""

    spec: VllmClassifySpec

    @property
    def chat(self) -> bool:
        return self.spec.chat_template

    @property
    def url(self) -> str:
        return f"{self.spec.url}/classify"

    def start_check(self) -> tuple[str, Any]:
        return self.url, {"model": self.spec.model, "input": ["check"], "use_activation": self.spec.use_activation}

    async def ask(self, batch: list[_Ask], deadline: float | None) -> list[float]:
        base = {"model": self.spec.model, "use_activation": self.spec.use_activation}
        if not self.chat:
            texts = [a.input for a in batch]
            return await self._classify({**base, "input": texts}, len(texts), deadline)
        asks = [self._classify({**base, "messages": a.input}, 1, deadline) for a in batch]
        return [score for [score] in await asyncio.gather(*asks)]

    async def _classify(self, body: dict[str, Any], n: int, deadline: float | None) -> list[float]:
        """POST one classify request of `n` inputs; the score of each, in input order."""
        url = self.url
        answer = await self.endpoint.post(url, body, deadline)
        data = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(data, list) or len(data) != n:
            got = f"{len(data)} results" if isinstance(data, list) else "no `data` list"
            raise self._wrong(url, answer, f"{got} for {n} inputs")
        scores: list[float | None] = [None] * n
        for k, row in enumerate(data):
            i = row.get("index", k) if isinstance(row, dict) else None
            probs = row.get("probs") if isinstance(row, dict) else None
            if not isinstance(i, int) or not 0 <= i < n or scores[i] is not None:
                raise self._wrong(url, answer, f"data[{k}].index is {i!r}, not a distinct input index below {n}")
            if not isinstance(probs, list) or len(probs) <= self.spec.index:
                classes = f"{len(probs)} classes" if isinstance(probs, list) else "no `probs` list"
                raise self._wrong(url, answer, f"data[{k}] has {classes}; the spec's index is {self.spec.index}")
            scores[i] = self._number(url, answer, probs[self.spec.index], f"data[{k}].probs[{self.spec.index}]")
        return [s for s in scores if s is not None]


class OpenRLHFReward(RemoteReward):
    """`remote.openrlhf`: any server speaking OpenRLHF's remote reward protocol."""

    spec: OpenRLHFSpec

    def start_check(self) -> tuple[str, Any]:
        return self.spec.url, {"query": [], "prompts": [], "labels": []}  # an empty batch: the protocol allows it

    async def ask(self, batch: list[_Ask], deadline: float | None) -> list[float]:
        url, key, n = self.spec.url, self.spec.key, len(batch)
        body = {
            "query": [a.input for a in batch],
            "prompts": [a.prompt for a in batch],  # the start of each query, as OpenRLHF sends it
            "labels": [a.reference for a in batch],
        }
        answer = await self.endpoint.post(url, body, deadline)
        values = answer.get(key) if isinstance(answer, dict) else None
        if n == 1 and isinstance(values, int | float) and not isinstance(values, bool):
            values = [values]  # a bare number for one query, as OpenRLHF's own reward functions may return
        if not isinstance(values, list) or len(values) != n:
            got = f"{len(values)} {key}" if isinstance(values, list) else f"no `{key}` list"
            raise self._wrong(url, answer, f"{got} for {n} queries")
        return [self._number(url, answer, v, f"{key}[{k}]") for k, v in enumerate(values)]
