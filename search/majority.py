"""Majority vote (self-consistency): sample responses, answer with the most frequent final answer.

Wang et al. 2022, "Self-Consistency Improves Chain of Thought Reasoning in Language Models". No
reward model: the scorer is ignored (it may be None). Samples are drawn in rounds of `round_size`
up to `n`, and the vote stops early when its outcome is settled (the leader cannot be caught by
the samples left) or, with `consensus` set, once one answer holds that share of the votes cast
(adaptive consistency, Aggarwal et al. 2023). A response's final answer is what `answer` finds
in it (`assay.answers`: `#### n` by default, or `\\boxed{}`, the last number, a regex), normalised,
so `2.50` and `2.5` are one vote. Responses without a final answer do not vote; tied answers go to
the one seen first, and the chosen candidate is that answer's first sample. Reads `n`,
`round_size`, `consensus`, `answer`, `max_tokens`, `temperature`, `top_p`, `seed` and `budget`.
"""

from __future__ import annotations

from collections import Counter

from assay.search.base import Candidate, Generator, Scorer, SearchConfig, SearchResult
from assay.search.tracker import Tracker


def run(
    prompt: str, generator: Generator, scorer: Scorer | None, config: SearchConfig, *, reference: str | None = None
) -> SearchResult:
    """Self-consistency over up to `config.n` samples, in rounds, with early stop."""
    t = Tracker("majority", generator, None, config, reference)
    candidates: list[Candidate] = []
    while len(candidates) < config.n:
        k = t.affordable(min(config.round_size, config.n - len(candidates)), config.max_tokens)
        if k == 0:
            t.event("stop", reason="budget")
            break
        for g in t.generate([prompt], k, config.max_tokens)[0]:
            candidates.append(t.candidate(g.text, None, g.num_tokens, g.finish_reason))
        votes = tally(candidates)
        t.event("round", samples=len(candidates), votes=dict(votes))
        reason = settled(votes, config.n - len(candidates), config.consensus)
        if reason:
            t.event("stop", reason=reason)
            break
    return t.result(candidates, select(candidates))


def tally(candidates: list[Candidate]) -> Counter[str]:
    """Votes per final answer, in first-seen order."""
    return Counter(c.final_answer for c in candidates if c.final_answer is not None)


def settled(votes: Counter[str], left: int, consensus: float | None) -> str | None:
    """Why the vote can stop now ("decided", "consensus"), or None to keep sampling."""
    if not votes:
        return None
    ranked = votes.most_common(2)
    lead = ranked[0][1]
    runner_up = ranked[1][1] if len(ranked) > 1 else 0
    if left > 0 and lead > runner_up + left:
        return "decided"  # no outcome of the remaining samples changes the winner
    if consensus is not None and left > 0 and lead >= consensus * sum(votes.values()):
        return "consensus"
    return None


def select(candidates: list[Candidate]) -> int | None:
    """Index of the first candidate with the most frequent answer; None when no candidate has one."""
    votes = tally(candidates)
    if not votes:
        return None
    top = votes.most_common(1)[0][0]  # most_common keeps first-seen order among equal counts
    return next(i for i, c in enumerate(candidates) if c.final_answer == top)
