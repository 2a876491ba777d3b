"""Best-of-N: sample N responses, score each with the reward, answer with the highest-scored one
(among those that reach a final answer, when any does: see `tracker.pick`).

The baseline of inference-time search (rejection sampling with a reward model): its quality is
bounded by the reward's ability to rank, and pass@N is its ceiling. Reads `n`, `max_tokens`,
`temperature`, `top_p`, `seed`, `aggregate` (for process rewards) and `budget`.
"""

from __future__ import annotations

from assay.search.base import Generator, Scorer, SearchConfig, SearchResult
from assay.search.tracker import Tracker, pick


def run(
    prompt: str, generator: Generator, scorer: Scorer | None, config: SearchConfig, *, reference: str | None = None
) -> SearchResult:
    """Argmax-reward selection over up to `config.n` samples (fewer when the budget says so)."""
    t = Tracker("best_of_n", generator, scorer, config, reference)
    k = t.affordable(config.n, config.max_tokens)
    gens = t.generate([prompt], k, config.max_tokens)[0] if k else []
    scores = t.score(prompt, [g.text for g in gens])
    candidates = [t.candidate(g.text, s, g.num_tokens, g.finish_reason) for g, s in zip(gens, scores)]
    t.event("sampled", candidates=len(candidates), failed=sum(c.score is None for c in candidates))
    return t.result(candidates, pick(candidates))
