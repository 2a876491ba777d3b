"""Diverse verifier tree search (DVTS): independent subtrees, each grown greedily by a process reward.

From HF search-and-learn (Beeching, Tunstall, Rush 2024, "Scaling test-time compute with open
models"). Beam search spends its budget on the few prefixes the reward likes best and so tends to
collapse onto one line of reasoning; DVTS splits the `n` budget into `n // beam_width` subtrees
that never compete. Each subtree keeps one prefix, expands it with `beam_width` continuations up
to the next step boundary and keeps the best-scored child (greedy by the process reward), until
its response finishes or `max_steps` is reached. The answer is the best-scored of the subtrees'
responses. Reads `n`, `beam_width`, `max_steps`, `max_step_tokens`, `max_tokens`, `stop`,
`aggregate`, the sampling fields and `budget`. The scorer should give per-step scores.
"""

from __future__ import annotations

from assay.search.base import Generator, Scorer, SearchConfig, SearchResult
from assay.search.beams import Beam, expand, ranked, to_candidate
from assay.search.tracker import Tracker, pick


def run(
    prompt: str, generator: Generator, scorer: Scorer | None, config: SearchConfig, *, reference: str | None = None
) -> SearchResult:
    """`config.n // config.beam_width` greedy subtrees, each expanding `beam_width` children per step."""
    t = Tracker("dvts", generator, scorer, config, reference)
    trees = [Beam() for _ in range(max(1, config.n // config.beam_width))]
    for depth in range(config.max_steps):
        open_ = [i for i, b in enumerate(trees) if not b.done]
        if not open_:
            break
        # the budget goes to the best subtrees first
        open_.sort(key=lambda i: (trees[i].value is None, -(trees[i].value or 0.0)))
        for i, children in zip(open_, expand(t, prompt, [trees[i] for i in open_], config.beam_width)):
            if children:
                trees[i] = ranked(children)[0]
            else:
                trees[i].finish_reason = "budget"
        t.event(
            "step",
            depth=depth,
            trees=[round(b.value, 4) if b.value is not None else None for b in trees],
            done=sum(b.done for b in trees),
        )
    candidates = [to_candidate(t, b) for b in trees]
    return t.result(candidates, pick(candidates))
