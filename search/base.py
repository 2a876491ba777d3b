"""Shared types of the search strategies: what they call, how they are configured, what they return.

Every strategy is one function with one signature,

    run(prompt, generator, scorer, config, *, reference=None) -> SearchResult

and talks to the world only through two small protocols, so the same strategy runs in-process
(`search.local`) or against the services (`search.remote`):

- a `Generator` samples continuations of texts. To continue a partial response, pass
  `prompt + partial_response` as the text; `stop` ends a continuation at a step boundary
  (`(" ",)` in the arithmetic world, whose steps are space-separated);
- a `Scorer` scores (prompt, response) pairs with one reward, per response or per step, and says
  which reward (`reward_id`) answered. A failed item has a `None` value, never 0.

Nothing here imports torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

from assay.answers import HASHES, Extract

# --- generation ------------------------------------------------------------------------------

FinishReason = Literal["stop", "step", "length"]


@dataclass(frozen=True)
class GenParams:
    """Sampling settings of one generate call."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 48
    stop: tuple[str, ...] = ()  # end a continuation at the first of these (kept in its text)
    seed: int = 0


@dataclass(frozen=True)
class Generation:
    """One sampled continuation.

    `finish_reason`: "stop" the model ended the response (end of sequence), "step" a stop
    string ended it (the text ends with that string), "length" it ran into max_tokens.
    `num_tokens`: tokens the generator sampled for it, the eos token included; the budget is
    charged with these, so a generator that samples past a stop string counts those tokens too.
    """

    text: str
    num_tokens: int
    finish_reason: FinishReason


class Generator(Protocol):
    weight_version: str | None  # the policy weights that produced the samples

    def generate(self, texts: Sequence[str], n: int, params: GenParams) -> list[list[Generation]]:
        """n continuations of each text, as `result[i][j]` = continuation j of text i."""
        ...


# --- scoring ---------------------------------------------------------------------------------

Granularity = Literal["outcome", "steps"]


@dataclass(frozen=True)
class Score:
    """One item's reward: `value` is None exactly when `error` says why it failed."""

    value: float | None
    steps: tuple[float, ...] | None = None  # per-step scores (granularity "steps", process rewards)
    error: str | None = None


class Scorer(Protocol):
    def score(
        self, items: Sequence[tuple[str, str]], granularity: Granularity = "outcome", reference: str | None = None
    ) -> tuple[list[Score], str]:
        """One Score per (prompt, response) item, in order, and the id of the reward that scored them."""
        ...


# --- answers and steps -----------------------------------------------------------------------

ANSWER_MARK = "####"


def step_ends(response: str) -> list[int]:
    """Character offsets (exclusive) where each step ends: space-separated steps, the final
    answer (`#### 51`) one step. `"23+45=68 68-17=51 #### 51"` -> [8, 17, 25]."""
    mark = response.find(ANSWER_MARK)
    work = response if mark < 0 else response[:mark]
    ends = [m.end() for m in re.finditer(r"\S+", work)]
    if mark >= 0:
        ends.append(mark + len(response[mark:].rstrip()))
    return ends


def aggregate(steps: Sequence[float], how: str) -> float:
    """Per-step scores -> one score: min, prod, last or mean."""
    if how == "min":
        return min(steps)
    if how == "prod":
        return math.prod(steps)
    if how == "last":
        return steps[-1]
    return sum(steps) / len(steps)


AGGREGATES = ("min", "prod", "last", "mean")

# --- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """The most compute one search may spend; None means no limit.

    A candidate is one sequence sampled from the generator: a whole response for best-of-N,
    majority and refinement, one step continuation for beam search and DVTS. Generated tokens
    are the generator's `num_tokens`. A strategy plans each call against the worst case
    (every sequence running to max_tokens), so it never goes over either limit.
    """

    max_candidates: int | None = None
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_candidates", "max_tokens"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ValueError(f"budget {name} must be >= 0 or None, got {v}")


@dataclass(frozen=True)
class SearchConfig:
    """Settings shared by every strategy; each reads the fields it needs (named in its docstring)."""

    n: int = field(default=8, metadata={"help": "candidates (best-of-N, majority), beams (beam search, DVTS)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (0: greedy)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass"})
    max_tokens: int = field(default=48, metadata={"help": "most tokens in one response"})
    stop: tuple[str, ...] = field(default=(" ",), metadata={"help": "step boundaries (beam search, DVTS)"})
    beam_width: int = field(default=4, metadata={"help": "continuations per beam and step (beam search, DVTS)"})
    max_steps: int = field(default=8, metadata={"help": "depth: most steps per response (beam search, DVTS)"})
    max_step_tokens: int = field(default=16, metadata={"help": "most tokens in one step continuation"})
    round_size: int = field(default=4, metadata={"help": "samples per round (majority, refinement)"})
    consensus: float | None = field(
        default=None, metadata={"help": "majority: stop once one answer holds this share of the votes"}
    )
    rounds: int = field(default=2, metadata={"help": "refinement: revisions after the first draft"})
    threshold: float = field(default=0.5, metadata={"help": "refinement: accept a candidate scoring >= this"})
    step_threshold: float = field(default=0.5, metadata={"help": "refinement: a step scoring below this failed"})
    aggregate: str = field(
        default="min",
        metadata={"help": "per-step scores -> one score (min|prod|last|mean), where a reward gives steps"},
    )
    seed: int = field(default=0, metadata={"help": "base seed; each generate call gets its own derived seed"})
    budget: Budget = field(default_factory=Budget, metadata={"help": "compute limit of one search"})
    answer: Extract = field(
        default=HASHES,
        metadata={"help": "how a response's final answer is found (assay.answers: hashes, boxed, last_number, regex)"},
    )
    step_ends: Callable[[str], list[int]] = field(
        default=step_ends, metadata={"help": "response -> character offsets where its steps end"}
    )
    reviser: Callable[..., tuple[str, str]] | None = field(
        default=None, metadata={"help": "refinement: how feedback becomes the next prompt (None: refine.backtrack)"}
    )

    def __post_init__(self) -> None:
        for name in ("n", "max_tokens", "beam_width", "max_steps", "max_step_tokens", "round_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.consensus is not None and not 0 < self.consensus <= 1:
            raise ValueError(f"consensus must be in (0, 1] or None, got {self.consensus}")
        if self.rounds < 0:
            raise ValueError(f"rounds must be >= 0, got {self.rounds}")
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {AGGREGATES}, got {self.aggregate!r}")


# --- results ---------------------------------------------------------------------------------


@dataclass
class Candidate:
    """One response the search considered: its text, reward and final answer."""

    text: str
    score: float | None  # None: not scored, or the reward failed on it (see `error`)
    final_answer: str | None
    steps: tuple[float, ...] | None = None
    num_tokens: int = 0  # tokens generated for it: a beam's whole path; a revision's continuation only
    finish_reason: str = ""  # a Generation's, or "depth" for a beam cut off at max_steps
    correct: bool | None = None  # final_answer == reference, when a reference was given
    error: str | None = None


@dataclass
class Usage:
    generated_tokens: int = 0
    candidates: int = 0  # sequences sampled (see Budget)
    generate_calls: int = 0
    reward_calls: int = 0
    scored_items: int = 0


@dataclass
class SearchResult:
    """What a strategy returns: the chosen answer, every candidate, a trace and the spend."""

    strategy: str
    answer: str | None  # the chosen candidate's final answer
    text: str | None  # the chosen candidate's response
    chosen: int | None  # its index in `candidates`
    candidates: list[Candidate]
    trace: list[dict[str, Any]]
    usage: Usage
    reward_id: str | None  # None when no reward was asked (majority vote)
    weight_version: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
