"""Step-level expansion shared by beam search and DVTS: grow partial responses one step at a time.

A `Beam` is a partial (or finished) response. `expand` samples continuations of each beam up to
the next step boundary (`config.stop`), charges them to the budget, and scores every new prefix
per step with the process reward, so the caller only decides which beams to keep.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from assay.search.base import Candidate, Score
from assay.search.tracker import Tracker


@dataclass
class Beam:
    text: str = ""  # the response so far
    num_tokens: int = 0  # tokens generated along this path
    steps: int = 0  # step continuations taken
    score: Score | None = None
    value: float | None = None  # the score as one number (config.aggregate of its steps)
    finish_reason: str = ""  # "" while open; "stop", "length", "depth" or "budget" once done

    @property
    def done(self) -> bool:
        return self.finish_reason != ""


def expand(t: Tracker, prompt: str, beams: list[Beam], width: int) -> list[list[Beam]]:
    """Up to `width` scored children per open beam, one step longer, as `result[i]` for beams[i].

    The budget is spent in list order: put the most promising beams first. A beam the budget
    cannot cover gets no children.
    """
    cfg = t.config
    cands, tokens = t.remaining()
    plan: dict[int, list[int]] = defaultdict(list)  # step token cap -> beam indices; each gets `counts`
    counts = [0] * len(beams)
    for i, b in enumerate(beams):
        cap = min(cfg.max_step_tokens, cfg.max_tokens - b.num_tokens)
        k = 0 if b.done or cap < 1 else width
        if cands is not None:
            k = min(k, cands)
            cands -= k
        if tokens is not None and k:
            k = min(k, tokens // cap)
            tokens -= k * cap
        counts[i] = k
        if k:
            plan[cap].append(i)
    children: list[list[Beam]] = [[] for _ in beams]
    for cap, idx in plan.items():
        # one generate call per (cap, count) group: usually a single call for all beams
        for k in sorted({counts[i] for i in idx}):
            group = [i for i in idx if counts[i] == k]
            outs = t.generate([prompt + beams[i].text for i in group], k, cap, cfg.stop)
            for i, gens in zip(group, outs):
                parent = beams[i]
                for g in gens:
                    child = Beam(parent.text + g.text, parent.num_tokens + g.num_tokens, parent.steps + 1)
                    if g.finish_reason == "stop":
                        child.finish_reason = "stop"
                    elif child.num_tokens >= cfg.max_tokens:
                        child.finish_reason = "length"
                    elif child.steps >= cfg.max_steps:
                        child.finish_reason = "depth"
                    children[i].append(child)
    flat = [c for cs in children for c in cs]
    for c, s in zip(flat, t.score(prompt, [c.text for c in flat], "steps")):
        c.score, c.value = s, t.value(s)
    return children


def to_candidate(t: Tracker, b: Beam) -> Candidate:
    return t.candidate(b.text, b.score, b.num_tokens, b.finish_reason or "budget")


def ranked(beams: list[Beam]) -> list[Beam]:
    """Best value first, unscored beams last; stable, so equal values keep their order."""
    return sorted(beams, key=lambda b: (b.value is None, -(b.value or 0.0)))
