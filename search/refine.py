"""Iterative refinement: draft, score, and while the best draft scores below a threshold, revise it
using the reward's feedback; up to `rounds` revisions.

The generate-feedback-revise loop of Self-Refine (Madaan et al. 2023), with the feedback taken
from a process reward: the first step scoring below `step_threshold` is where the draft went
wrong. How feedback becomes the next generation is `config.reviser`, a `Reviser`:

- `backtrack` (the default; for a policy that only knows the task's prompt format, like the
  arithmetic world's): keep the draft up to the failing step and sample again from there;
- `feedback_prompt(template)`: re-prompt an instruction-following model with the draft and the
  failing step written out, and take its continuation as the revised response.

Each round samples `round_size` continuations, scores them (per step) and keeps the best
candidate seen so far; the search stops as soon as it reaches `threshold`. A revision's
continuation may take up to `max_tokens` tokens on top of the prefix it keeps. Reads `round_size`,
`rounds`, `threshold`, `step_threshold`, `reviser`, `aggregate`, `max_tokens`, `step_ends`, the sampling
fields and `budget`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from assay.search.base import Candidate, Generator, Scorer, SearchConfig, SearchResult
from assay.search.tracker import Tracker, argmax

# (prompt, draft, its step scores or None, config) -> (text to continue, response prefix kept)
Reviser = Callable[[str, str, Sequence[float] | None, SearchConfig], tuple[str, str]]


def first_failing_step(draft: str, steps: Sequence[float] | None, config: SearchConfig) -> int | None:
    """Index of the first step scoring below `step_threshold`; None if no step did (or no steps)."""
    if not steps:
        return None
    return next((i for i, s in enumerate(steps) if s < config.step_threshold), None)


def backtrack(prompt: str, draft: str, steps: Sequence[float] | None, config: SearchConfig) -> tuple[str, str]:
    """Keep the draft before its first failing step (its last step when none failed) and continue from there."""
    ends = config.step_ends(draft)
    bad = first_failing_step(draft, steps, config)
    if bad is None:
        bad = len(ends) - 1 if steps else 0  # no step failed: redo the last; no step scores: redo all
    keep = ""
    if 0 < bad <= len(ends):
        j = ends[bad - 1]
        while j < len(draft) and draft[j].isspace():  # keep the separator before the failing step
            j += 1
        keep = draft[:j]
    return prompt + keep, keep


def feedback_prompt(template: str = "{prompt}{draft}\nStep {step} is wrong: {step_text}\nRevised answer: ") -> Reviser:
    """A reviser that re-prompts with the draft and its first failing step (1-based) in `template`."""

    def revise(prompt: str, draft: str, steps: Sequence[float] | None, config: SearchConfig) -> tuple[str, str]:
        ends = config.step_ends(draft)
        bad = first_failing_step(draft, steps, config)
        bad = max(len(ends) - 1, 0) if bad is None else min(bad, max(len(ends) - 1, 0))
        start = ends[bad - 1] if bad > 0 else 0
        step_text = draft[start : ends[bad]].strip() if ends else draft
        return template.format(prompt=prompt, draft=draft, step=bad + 1, step_text=step_text), ""

    return revise


def run(
    prompt: str, generator: Generator, scorer: Scorer | None, config: SearchConfig, *, reference: str | None = None
) -> SearchResult:
    """Draft, then up to `config.rounds` revisions from the best candidate's first failing step."""
    t = Tracker("refine", generator, scorer, config, reference)
    reviser: Reviser = config.reviser or backtrack
    candidates: list[Candidate] = []
    context, kept = prompt, ""
    for round_ in range(config.rounds + 1):
        k = t.affordable(config.round_size, config.max_tokens)
        if k == 0:
            t.event("stop", reason="budget")
            break
        gens = t.generate([context], k, config.max_tokens)[0]
        texts = [kept + g.text for g in gens]
        scores = t.score(prompt, texts, "steps")
        candidates += [t.candidate(x, s, g.num_tokens, g.finish_reason) for x, g, s in zip(texts, gens, scores)]
        best = argmax([c.score for c in candidates])
        best_score = None if best is None else candidates[best].score
        t.event("round", round=round_, kept_prefix=kept, samples=k, best=best, best_score=best_score)
        if best is None:
            context, kept = prompt, ""  # nothing could be scored: start over
            continue
        if best_score is not None and best_score >= config.threshold:
            t.event("stop", reason="threshold")
            break
        if round_ < config.rounds:
            draft = candidates[best]
            context, kept = reviser(prompt, draft.text, draft.steps, config)
            t.event("revise", draft=best, failing_step=first_failing_step(draft.text, draft.steps, config))
    return t.result(candidates, argmax([c.score for c in candidates]))
