"""Weighted best-of-N: sum the reward over candidates that reach the same final answer, pick the
answer with the largest sum, and return its best-scored candidate.

Majority vote where each vote weighs its reward (Li et al. 2023, "Making Large Language Models
Better Reasoners with Step-Aware Verifier"; the `weighted` selection of HF search-and-learn). It
beats plain best-of-N when the reward is noisy but right on average: one lucky high score on a
wrong answer is outvoted by several good scores on the right one. Scores must be >= 0 (use a
probability: a sigmoid outcome reward or a process reward); candidates without a final answer or
with a failed score carry no weight. Final answers are found and normalised as majority vote
finds them (`answer`). Reads the same fields as best-of-N, and `answer`.
"""

from __future__ import annotations

from collections import defaultdict

from assay.search.base import Candidate, Generator, Scorer, SearchConfig, SearchResult
from assay.search.tracker import SearchError, Tracker, argmax


def run(
    prompt: str, generator: Generator, scorer: Scorer | None, config: SearchConfig, *, reference: str | None = None
) -> SearchResult:
    """Reward-weighted vote over up to `config.n` samples."""
    t = Tracker("weighted_best_of_n", generator, scorer, config, reference)
    k = t.affordable(config.n, config.max_tokens)
    gens = t.generate([prompt], k, config.max_tokens)[0] if k else []
    scores = t.score(prompt, [g.text for g in gens])
    candidates = [t.candidate(g.text, s, g.num_tokens, g.finish_reason) for g, s in zip(gens, scores)]
    chosen, weights = select(candidates)
    t.event("weighted_vote", weights=weights)
    return t.result(candidates, chosen)


def select(candidates: list[Candidate]) -> tuple[int | None, dict[str, float]]:
    """(index of the best-scored candidate of the answer with the largest reward sum, the sums).

    Ties between answers go to the answer seen first. None when no candidate has both an answer
    and a score.
    """
    weights: dict[str, float] = defaultdict(float)
    for c in candidates:
        if c.final_answer is not None and c.score is not None:
            if c.score < 0:
                raise SearchError(
                    f"weighted best-of-N sums scores, which must be >= 0; got {c.score} "
                    "(use a probability-valued reward)"
                )
            weights[c.final_answer] += c.score
    if not weights:
        return None, {}
    top = max(weights, key=lambda a: weights[a])  # max keeps the first of equal sums: first seen
    scores = [c.score if c.final_answer == top else None for c in candidates]
    return argmax(scores), dict(weights)
