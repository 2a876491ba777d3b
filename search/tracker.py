"""The bookkeeping every strategy shares: budgeted generation, scoring, the trace, the result.

A strategy creates one `Tracker` per search and calls the generator and the scorer only through
it, so budget checks, usage counts, seeds, reward-id consistency and the trace are the same
everywhere and the strategy file keeps only its algorithm.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from assay.answers import extract, normalize
from assay.search.base import (
    Candidate,
    Generation,
    Generator,
    GenParams,
    Granularity,
    Score,
    Scorer,
    SearchConfig,
    SearchResult,
    Usage,
    aggregate,
)


class SearchError(RuntimeError):
    """A search that cannot go on: a generator over its limits, a reward that changed mid-search."""


class Tracker:
    def __init__(
        self,
        strategy: str,
        generator: Generator,
        scorer: Scorer | None,
        config: SearchConfig,
        reference: str | None = None,
    ) -> None:
        self.strategy = strategy
        self.generator = generator
        self.scorer = scorer
        self.config = config
        self.reference = reference
        self.usage = Usage()
        self.trace: list[dict[str, Any]] = []
        self.reward_id: str | None = None

    # --- budget ------------------------------------------------------------------------------

    def remaining(self) -> tuple[int | None, int | None]:
        """(candidates, generated tokens) the budget has left; None where it sets no limit."""
        budget = self.config.budget
        return (
            None if budget.max_candidates is None else max(budget.max_candidates - self.usage.candidates, 0),
            None if budget.max_tokens is None else max(budget.max_tokens - self.usage.generated_tokens, 0),
        )

    def affordable(self, want: int, max_tokens: int) -> int:
        """How many of `want` sequences of up to `max_tokens` tokens each the budget still allows."""
        cands, tokens = self.remaining()
        k = want if cands is None else min(want, cands)
        return k if tokens is None else min(k, tokens // max_tokens)

    # --- calls -------------------------------------------------------------------------------

    def generate(
        self, texts: Sequence[str], n: int, max_tokens: int, stop: tuple[str, ...] = ()
    ) -> list[list[Generation]]:
        """n continuations of each text, charged to the budget; refused if the budget cannot cover them."""
        if not texts or n < 1:
            return [[] for _ in texts]
        if self.affordable(len(texts) * n, max_tokens) < len(texts) * n:
            raise SearchError(f"{self.strategy}: {len(texts) * n} sequences of {max_tokens} tokens exceed the budget")
        cfg = self.config
        # every call its own seed, so that re-expanding the same prefix gives new samples
        seed = (cfg.seed * 1_000_003 + self.usage.generate_calls) % 2**31
        params = GenParams(cfg.temperature, cfg.top_p, max_tokens, stop, seed)
        out = self.generator.generate(list(texts), n, params)
        if len(out) != len(texts) or any(len(row) != n for row in out):
            raise SearchError(f"{self.strategy}: the generator returned the wrong number of continuations")
        for g in (g for row in out for g in row):
            if g.num_tokens > max_tokens:
                raise SearchError(
                    f"{self.strategy}: the generator sampled {g.num_tokens} tokens, over max_tokens {max_tokens}"
                )
            self.usage.generated_tokens += g.num_tokens
        self.usage.candidates += len(texts) * n
        self.usage.generate_calls += 1
        return out

    def score(self, prompt: str, responses: Sequence[str], granularity: Granularity = "outcome") -> list[Score]:
        """Score responses to `prompt`; SearchError if the reward's id changes mid-search."""
        if self.scorer is None:
            raise SearchError(f"{self.strategy} needs a scorer")
        if not responses:
            return []
        scores, reward_id = self.scorer.score([(prompt, r) for r in responses], granularity, self.reference)
        if len(scores) != len(responses):
            raise SearchError(f"{self.strategy}: the scorer returned {len(scores)} scores for {len(responses)} items")
        if self.reward_id is not None and reward_id != self.reward_id:
            raise SearchError(f"the reward changed mid-search: {self.reward_id} -> {reward_id}")
        self.reward_id = reward_id
        self.usage.reward_calls += 1
        self.usage.scored_items += len(responses)
        return scores

    def value(self, score: Score) -> float | None:
        """A score as one number: the config's aggregate of its steps, else its value."""
        if score.steps:
            return aggregate(score.steps, self.config.aggregate)
        return score.value

    # --- candidates, trace, result -----------------------------------------------------------

    def candidate(
        self, text: str, score: Score | None = None, num_tokens: int = 0, finish_reason: str = ""
    ) -> Candidate:
        answer = extract(text, self.config.answer)
        # the reference normalised like the answers, so that "2.50" is right for an answer of 2.5
        correct = None if self.reference is None else answer is not None and answer == normalize(self.reference)
        return Candidate(
            text=text,
            score=None if score is None else self.value(score),
            final_answer=answer,
            steps=None if score is None else score.steps,
            num_tokens=num_tokens,
            finish_reason=finish_reason,
            correct=correct,
            error=None if score is None else score.error,
        )

    def event(self, event: str, **data: Any) -> None:
        self.trace.append({"event": event, **data})

    def result(self, candidates: list[Candidate], chosen: int | None) -> SearchResult:
        pick = None if chosen is None else candidates[chosen]
        self.event(
            "chosen",
            index=chosen,
            answer=None if pick is None else pick.final_answer,
            score=None if pick is None else pick.score,
        )
        return SearchResult(
            strategy=self.strategy,
            answer=None if pick is None else pick.final_answer,
            text=None if pick is None else pick.text,
            chosen=chosen,
            candidates=candidates,
            trace=self.trace,
            usage=self.usage,
            reward_id=self.reward_id,
            weight_version=self.generator.weight_version,
        )


def pick(candidates: Sequence[Candidate]) -> int | None:
    """The best-scored candidate among those with a final answer, else among all.

    A response with no final answer cannot be right, and a process reward scores an unfinished
    response high (every step so far is correct): left to the plain argmax, best-of-N with the
    PRM chose such a fragment for 6 of 32 problems (bench/scaling.py)."""
    best = argmax([c.score if c.final_answer is not None else None for c in candidates])
    return best if best is not None else argmax([c.score for c in candidates])


def argmax(values: Sequence[float | None]) -> int | None:
    """Index of the largest value, the first on ties; None values lose to any number. None if all are None."""
    best: int | None = None
    best_value = 0.0  # values[best], once there is one
    for i, v in enumerate(values):
        if v is not None and (best is None or v > best_value):
            best, best_value = i, v
    return best
