"""The one signature every reward has: a batch of items in, one outcome per item out.

A reward never turns a failure into a number. Each item comes back as a `Scored` (a value, and
per-step or per-token scores when asked) or an `ItemFailure` with a type and a message.
"""

from __future__ import annotations

import asyncio
import math
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from assay.data import Text
from assay.rm_server.protocol import ErrorType, Granularity


@dataclass(frozen=True)
class Item:
    """One item to score. A reward that reads text must handle a conversation itself (render it,
    or fail the item `invalid_input`): flattening it quietly would score text nobody sent."""

    prompt: Text  # text, or a conversation: the turns before the response
    response: str
    reference: str | None = None
    id: str = ""  # the request's item id, for error messages
    metadata: dict[str, Any] | None = None  # the dataset row's other columns, as the client sent them


@dataclass(frozen=True)
class Scored:
    value: float
    steps: list[float] | None = None
    tokens: list[tuple[str, float]] | None = None  # (token text, score of the prefix ending there)

    def __post_init__(self) -> None:
        # A NaN or infinite score is a failure of the reward, never a value to hand out.
        if not math.isfinite(self.value):
            raise ValueError(f"reward produced a non-finite score {self.value!r}")


class ItemFailure(Exception):
    """One item could not be scored; the others in its batch still are."""

    def __init__(self, type: ErrorType, message: str) -> None:
        super().__init__(message)
        self.type = type
        self.message = message


Outcome = Scored | ItemFailure


@dataclass(frozen=True)
class Compared:
    """P(a better than b), with the two pointwise scores when the reward has them."""

    prob_a: float
    scores: tuple[float, float] | None = None


class Reward(ABC):
    """A named, content-addressed reward. Subclasses implement `score` (and maybe `compare`)."""

    type: str = ""
    needs_reference: bool = False
    granularities: frozenset[Granularity] = frozenset({Granularity.outcome})
    pairwise: bool = False
    # Whether the reward id pins everything the score depends on. A reward another server computes
    # (judge, remote.*) has an id naming that server, model and template, never the weights behind it.
    pinned: bool = True

    def __init__(self, name: str, reward_id: str) -> None:
        self.name = name
        self.reward_id = reward_id

    @abstractmethod
    async def score(self, items: Sequence[Item], granularity: Granularity) -> list[Outcome]:
        """One outcome per item, in order. Must not block the event loop."""

    async def compare(self, items: Sequence[tuple[Item, Item]]) -> list[Compared | ItemFailure]:
        """Default for pointwise rewards: score both sides, P(a) = sigmoid(score_a - score_b)."""
        flat = [side for pair in items for side in pair]
        outcomes = await self.score(flat, Granularity.outcome)
        out: list[Compared | ItemFailure] = []
        for a, b in zip(outcomes[0::2], outcomes[1::2], strict=True):
            if isinstance(a, ItemFailure):
                out.append(a)
            elif isinstance(b, ItemFailure):
                out.append(b)
            else:
                out.append(Compared(sigmoid(a.value - b.value), (a.value, b.value)))
        return out

    def check(self, items: Sequence[Item]) -> None:
        """Refuse a request before any work (raise `errors.InvalidRequest`), e.g. too-long items."""

    def ready(self) -> bool:
        """Whether it can score now (a model reward: its model is loaded; false while a worker restarts)."""
        return True

    def queue_depth(self) -> int:
        """Items waiting for this reward's backend (0 for rewards without a queue)."""
        return 0

    async def start(self) -> None:
        """Load models, open pools and connections."""

    async def close(self) -> None:
        """Release what `start` took."""


def sigmoid(x: float) -> float:
    """The logistic function, without overflow for large |x|."""
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def check_template(template: str) -> None:
    """A text reward's `template` must hold `{prompt}` and `{response}` once each (ValueError otherwise)."""
    if template.count("{prompt}") != 1 or template.count("{response}") != 1:
        raise ValueError("template must contain {prompt} and {response} once each")


def fill_template(template: str, prompt: str, response: str) -> tuple[str, int]:
    """The text a reward reads: `template` with the prompt and response in; and where the response starts."""
    head = template[: template.index("{response}")].format(prompt=prompt)
    return template.format(prompt=prompt, response=response), len(head)


# The request's deadline, in event-loop time; set by the serving layer for each request.
DEADLINE: ContextVar[float | None] = ContextVar("assay_request_deadline", default=None)


async def until_deadline(work: Sequence[Awaitable[Any]]) -> list[Any]:
    """Await each item's work until the request's deadline (`DEADLINE`).

    Work still pending then is cancelled (queued model items leave the queue) and reported as a
    `timeout` failure; work that finished keeps its result, so a deadline never throws away a
    score already computed. Exceptions are returned in place, like `gather(return_exceptions=True)`.
    """
    tasks = [asyncio.ensure_future(w) for w in work]
    deadline = DEADLINE.get()
    timeout = None if deadline is None else max(0.0, deadline - asyncio.get_running_loop().time())
    try:
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
    except asyncio.CancelledError:
        for t in tasks:
            t.cancel()
        raise
    out: list[Any] = []
    for t in tasks:
        if not t.done():
            t.cancel()
            out.append(ItemFailure(ErrorType.timeout, "the request deadline passed before this item was scored"))
        elif t.cancelled():
            out.append(ItemFailure(ErrorType.timeout, "this item's work was cancelled"))
        else:
            out.append(t.exception() or t.result())
    return out
