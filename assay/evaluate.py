"""`assay eval`: the world's checkpoints measured on a fixed held-out problem set.

- policy: pass@k at temperature 1.0 from n = 64 samples per problem, with the unbiased
  estimator pass@k = 1 - C(n - c, k) / C(n, k) (c correct of n), averaged over problems;
- outcome RM: pairwise accuracy over every (correct, incorrect) pair of samples of the same
  problem (ties count half), the same over pairs whose incorrect side is well formed (only
  plausible slips, no broken token), and AUROC over all scored samples;
- process RM: accuracy of P(step correct) > 0.5 against the rule checker's step labels, beside
  the accuracy of always answering the commoner label;
- verifier: balanced accuracy (mean of the accuracy on correct and on incorrect solutions) of
  P(yes) > 0.5, so a verifier that always says "no" scores 50%.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable

import numpy as np

from assay.arith import world
from assay.arith.checks import is_correct, is_well_formed, segments, step_labels
from assay.arith.verifier import verifier_prompt
from assay.checkpoints import load_embedded
from assay.eval_config import KS, TARGETS, EvalConfig
from assay.generation import SamplingParams, sample
from assay.scoring import score_outcome, score_steps, verifier_yes_prob


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from c correct out of n samples (Chen et al., 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def auroc(scores: list[float], labels: list[bool]) -> float:
    """Probability that a random positive outscores a random negative (ties count half)."""
    pos = np.array([s for s, y in zip(scores, labels) if y])
    neg = np.array([s for s, y in zip(scores, labels) if not y])
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def _pairwise(r: list[float], labels: list[bool], cfg: EvalConfig, use_bad) -> float:
    """Share of (correct, incorrect) pairs of the same problem the scores order right (ties half)."""
    wins, pairs = 0.0, 0
    for i in range(cfg.problems):
        block = range(i * cfg.scored, (i + 1) * cfg.scored)
        good = [r[j] for j in block if labels[j]]
        bad = [r[j] for j in block if not labels[j] and use_bad(j)]
        wins += sum(1.0 if g > b else 0.5 if g == b else 0.0 for g in good for b in bad)
        pairs += len(good) * len(bad)
    return wins / pairs if pairs else float("nan")


def _samples(
    cfg: EvalConfig, on_batch: Callable[[int, int], None] | None = None
) -> tuple[list[world.Problem], list[list[str]], list[list[bool]]]:
    """The held-out problems, the policy's `cfg.samples` texts for each, and whether each is correct."""
    problems = world.eval_problems(cfg.problems)
    policy, tok = load_embedded("policy", cfg.checkpoints)
    params = SamplingParams(temperature=1.0, max_new_tokens=cfg.max_new_tokens)
    samples = sample(policy, tok, [p.prompt for p in problems], params, n=cfg.samples, seed=cfg.seed, on_batch=on_batch)
    texts = [[s.text for s in ss] for ss in samples]
    return problems, texts, [[is_correct(p, t) for t in ts] for p, ts in zip(problems, texts)]


def _scored(problems, texts, correct, cfg: EvalConfig) -> list[tuple[world.Problem, str, bool]]:
    """What the reward models see: the first `scored` samples of every problem, with their labels."""
    return [(p, t, ok) for p, ts, cs in zip(problems, texts, correct) for t, ok in list(zip(ts, cs))[: cfg.scored]]


def heldout_preferences(cfg: EvalConfig | None = None) -> list[dict[str, str]]:
    """The outcome RM's held-out pairs exactly as `evaluate` forms them, as preference rows.

    One row per (correct, incorrect) pair of the scored samples of the same problem, in the order
    `evaluate` visits them; `subset` says whether the incorrect side is well formed (the table's
    second ORM row) or has a broken token. Scored by the served ORM (`assay rm eval`), these rows
    give `orm_pairwise_accuracy` overall (ties half: `accuracy_ties_half`) and
    `orm_pairwise_accuracy_well_formed` on the `well_formed` subset.
    """
    cfg = cfg or EvalConfig()
    scored = _scored(*_samples(cfg), cfg)
    rows = []
    for i in range(cfg.problems):
        block = scored[i * cfg.scored : (i + 1) * cfg.scored]
        good = [t for _, t, ok in block if ok]
        bad = [t for _, t, ok in block if not ok]
        prompt = block[0][0].prompt
        for g in good:
            for b in bad:
                subset = "well_formed" if is_well_formed(b) else "malformed"
                rows.append({"prompt": prompt, "chosen": g, "rejected": b, "subset": subset})
    return rows


Progress = Callable[[str, int, int], None]
"""`progress(stage, done, total)`: what `evaluate` has done of each stage (a progress bar's hook)."""
STAGES = ("policy samples", "outcome RM", "process RM", "verifier")


def evaluate(cfg: EvalConfig | None = None, progress: Progress | None = None) -> dict[str, float]:
    """The figures of the module docstring; `progress` hears of each stage (`STAGES`) as it goes."""
    cfg = cfg or EvalConfig()  # a fresh default each call: EvalConfig is mutable
    say: Progress = progress or (lambda stage, done, total: None)
    t0 = time.perf_counter()
    problems, texts, correct = _samples(cfg, functools.partial(say, STAGES[0]))
    out: dict[str, float] = {
        f"pass@{k}": float(np.mean([pass_at_k(cfg.samples, sum(c), k) for c in correct])) for k in KS
    }

    scored = _scored(problems, texts, correct, cfg)
    labels = [ok for _, _, ok in scored]

    say(STAGES[1], 0, len(scored))
    orm, tok = load_embedded("orm", cfg.checkpoints)
    r = score_outcome(orm, tok, [p.prompt + text for p, text, _ in scored])
    out["orm_pairwise_accuracy"] = _pairwise(r, labels, cfg, lambda j: True)
    # the same against wrong answers with no broken token: the slips that are hard to see
    out["orm_pairwise_accuracy_well_formed"] = _pairwise(r, labels, cfg, lambda j: is_well_formed(scored[j][1]))
    out["orm_auroc"] = auroc(r, labels)
    say(STAGES[1], len(scored), len(scored))

    say(STAGES[2], 0, len(scored))
    prm, tok = load_embedded("prm", cfg.checkpoints)
    items = [(p.prompt, text, [s.end for s in segments(text)]) for p, text, _ in scored]
    keep = [i for i, it in enumerate(items) if it[2]]  # a response with no steps has nothing to score
    probs = score_steps(prm, tok, [items[i] for i in keep])
    step_truth = [step_labels(scored[i][0], scored[i][1]) for i in keep]
    hits = [(q > 0.5) == y for qs, ys in zip(probs, step_truth) for q, y in zip(qs, ys)]
    out["prm_step_accuracy"] = float(np.mean(hits))
    # what always answering the commoner label would score, to read the accuracy against
    share_ok = float(np.mean([y for ys in step_truth for y in ys]))
    out["prm_step_majority_baseline"] = max(share_ok, 1 - share_ok)
    say(STAGES[2], len(scored), len(scored))

    say(STAGES[3], 0, len(scored))
    verifier, tok = load_embedded("verifier", cfg.checkpoints)
    yes = verifier_yes_prob(verifier, tok, [verifier_prompt(p.expression, text) for p, text, _ in scored])
    on_good = [q > 0.5 for q, y in zip(yes, labels) if y]
    on_bad = [q <= 0.5 for q, y in zip(yes, labels) if not y]
    out["verifier_accuracy"] = float((np.mean(on_good) + np.mean(on_bad)) / 2)
    say(STAGES[3], len(scored), len(scored))

    out["heldout_problems"] = cfg.problems
    out["samples_per_problem"] = cfg.samples
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def meets_targets(figures: dict[str, float]) -> dict[str, bool]:
    return {k: lo <= figures[k] <= hi for k, (lo, hi) in TARGETS.items()}
