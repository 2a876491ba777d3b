"""Beam search with a process reward model: grow responses step by step, keeping the best prefixes.

The step-level search of Snell et al. 2024 ("Scaling LLM Test-Time Compute Optimally...") and HF
search-and-learn's `beam_search`: the first step is sampled `n` times from the prompt; then each
of the `n // beam_width` best open prefixes (by the process reward of the prefix, `aggregate` of
its step scores) is expanded with `beam_width` continuations up to the next step boundary
(`stop`), so every step samples about `n` continuations. A continuation that ends the response
(end of sequence, `max_tokens`, or `max_steps` reached) joins the finished pool; duplicate open
prefixes are kept once. The search stops
when no prefix is left open or the budget runs out, and answers with the best-scored finished
response. Reads `n`, `beam_width`, `max_steps`, `max_step_tokens`, `max_tokens`, `stop`,
`aggregate`, the sampling fields and `budget`. The scorer should give per-step scores.
"""

from __future__ import annotations

from assay.search.base import Generator, Scorer, SearchConfig, SearchResult
from assay.search.beams import Beam, expand, ranked, to_candidate
from assay.search.tracker import Tracker, pick


def distinct(beams: list[Beam]) -> list[Beam]:
    """The beams with duplicate texts dropped (the first kept): equal prefixes would spend the
    beam slots on one line of reasoning (search-and-learn's `filter_duplicates`)."""
    first: dict[str, Beam] = {}
    for b in beams:
        first.setdefault(b.text, b)
    return list(first.values())


def run(
    prompt: str, generator: Generator, scorer: Scorer | None, config: SearchConfig, *, reference: str | None = None
) -> SearchResult:
    """Step-level beam search over `config.n // config.beam_width` beams scored by a process reward."""
    t = Tracker("beam_search", generator, scorer, config, reference)
    keep = max(1, config.n // config.beam_width)
    active, finished = [Beam()], []
    for depth in range(config.max_steps):
        width = config.n if depth == 0 else config.beam_width
        children = [c for cs in expand(t, prompt, active, width) for c in cs]
        if not children:
            t.event("stop", reason="budget", depth=depth)
            break
        finished += [c for c in children if c.done]
        active = distinct(ranked([c for c in children if not c.done]))[:keep]
        t.event(
            "step",
            depth=depth,
            expanded=len(children),
            finished=len(finished),
            kept=[round(b.value, 4) if b.value is not None else None for b in active],
        )
        if not active:
            break
    leftover = [b for b in active if not b.done]  # open beams the budget stopped
    candidates = [to_candidate(t, b) for b in finished + leftover]
    return t.result(candidates, pick(candidates))
