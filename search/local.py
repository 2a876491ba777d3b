"""In-process adapters: the policy and reward models loaded in this process, for tests and benches.

    gen = LocalGenerator.embedded()                 # the arithmetic world's policy
    prm = LocalScorer.embedded("prm")               # reward_id "local:prm"
    STRATEGIES["beam_search"](prompt, gen, prm, SearchConfig())

torch and transformers are imported when an adapter is built, not when this module is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from assay.search.base import Generation, GenParams, Granularity, Score, aggregate, step_ends


class LocalGenerator:
    """`assay.generation.sample` behind the `Generator` protocol.

    `sample` has no stop strings, so a continuation is cut after the first stop string in its
    text (the string kept). Honest accounting: `num_tokens` is every token sampled, those past
    the cut included, since the model really generated them; keep `max_tokens` of step calls
    small (the strategies use `max_step_tokens`) so that little is wasted.
    """

    def __init__(
        self, model: Any, tokenizer: Any, *, weight_version: str | None = "local:policy", batch_size: int = 512
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.weight_version = weight_version
        self.batch_size = batch_size

    @classmethod
    def embedded(cls, name: str = "policy") -> LocalGenerator:
        from assay.checkpoints import load_embedded

        model, tokenizer = load_embedded(name)
        return cls(model, tokenizer, weight_version=f"local:{name}")

    def generate(self, texts: Sequence[str], n: int, params: GenParams) -> list[list[Generation]]:
        from assay.generation import SamplingParams, sample

        sp = SamplingParams(temperature=params.temperature, top_p=params.top_p, max_new_tokens=params.max_tokens)
        out = sample(self.model, self.tokenizer, list(texts), sp, n=n, seed=params.seed, batch_size=self.batch_size)
        return [[_cut(s.text, len(s.logprobs), s.finish_reason, params.stop) for s in row] for row in out]


def _cut(text: str, num_tokens: int, finish_reason: str, stop: tuple[str, ...]) -> Generation:
    """The text up to and including its first stop string (finish "step"), else as sampled."""
    hits = [(i, s) for s in stop if (i := text.find(s)) >= 0]
    if hits:
        i, s = min(hits)
        return Generation(text[: i + len(s)], num_tokens, "step")
    return Generation(text, num_tokens, "stop" if finish_reason == "stop" else "length")


class LocalScorer:
    """An outcome RM, process RM or verifier, in-process, behind the `Scorer` protocol.

    - `orm`: sigmoid of the outcome model's logit on prompt + response (a probability, so the
      weighted vote can sum it); no step scores;
    - `prm`: P(step correct) at the end of each step (`step_ends`), aggregated into the value;
    - `verifier`: P(yes) of the generative verifier on `verifier_template` (no step scores).

    A response with no steps (empty) fails for the process model: value None, with an error.
    """

    KINDS = ("orm", "prm", "verifier")

    def __init__(
        self,
        kind: str,
        model: Any,
        tokenizer: Any,
        *,
        name: str | None = None,
        step_ends: Callable[[str], list[int]] = step_ends,
        aggregate: str = "min",
        verifier_template: str = "{prompt}{response}\nCorrect? ",
        batch_size: int = 256,
    ) -> None:
        if kind not in self.KINDS:
            raise ValueError(f"kind must be one of {self.KINDS}, got {kind!r}")
        self.kind = kind
        self.model = model
        self.tokenizer = tokenizer
        self.reward_id = f"local:{name or kind}"
        self.step_ends = step_ends
        self.aggregate = aggregate
        self.verifier_template = verifier_template
        self.batch_size = batch_size

    @classmethod
    def embedded(cls, kind: str, **kw: Any) -> LocalScorer:
        """The arithmetic world's checkpoint of that kind (orm, prm, verifier)."""
        from assay.checkpoints import load_embedded

        model, tokenizer = load_embedded(kind)
        return cls(kind, model, tokenizer, **kw)

    def score(
        self, items: Sequence[tuple[str, str]], granularity: Granularity = "outcome", reference: str | None = None
    ) -> tuple[list[Score], str]:
        from assay import scoring

        if not items:
            return [], self.reward_id
        if self.kind == "orm":
            logits = scoring.score_outcome(self.model, self.tokenizer, [p + r for p, r in items], self.batch_size)
            return [Score(1.0 / (1.0 + math.exp(-x))) for x in logits], self.reward_id
        if self.kind == "verifier":
            texts = [self.verifier_template.format(prompt=p, response=r.replace("\n", " ")) for p, r in items]
            probs = scoring.verifier_yes_prob(self.model, self.tokenizer, texts, self.batch_size)
            return [Score(q) for q in probs], self.reward_id
        ends = [self.step_ends(r) for _, r in items]
        ok = [i for i, e in enumerate(ends) if e]
        steps = scoring.score_steps(self.model, self.tokenizer, [(*items[i], ends[i]) for i in ok], self.batch_size)
        out = [Score(None, error="the response has no steps to score")] * len(items)
        for i, s in zip(ok, steps):
            out[i] = Score(aggregate(s, self.aggregate), tuple(s) if granularity == "steps" else None)
        return out, self.reward_id
