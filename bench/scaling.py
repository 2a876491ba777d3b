"""Test-time compute scaling on the arithmetic world: accuracy against N for every search strategy.

    .venv/bin/python bench/scaling.py             # full run: 128 problems, N = 1..64 (11-14 min, 1 core)
    .venv/bin/python bench/scaling.py --quick     # smoke test: 32 problems, N = 1..16 (1.5-2 min)

On a fixed, seeded set of held-out problems (`arith.world.eval_problems`, the set `assay eval`
reports on), for N = 1, 2, 4, ..., max-n:

- pass@N, the oracle ceiling (any of N samples correct), with the unbiased estimator
  1 - C(M-c, N) / C(M, N) from a pool of M = 64 samples per problem (Chen et al. 2021); pass@1 is
  the mean single-sample accuracy, the no-search baseline;
- the sample-then-select strategies: majority vote, best-of-N and weighted best-of-N with the
  outcome RM, best-of-N with the verifier (P(yes)), and as controls weighted best-of-N with the
  verifier and best-of-N with the process RM. The pool is sampled once (temperature 1.0, the
  strategies' defaults), every sample is scored once by each reward through `search.local`'s
  `LocalScorer` (the strategies' own scoring path), and each N is estimated over random subsets
  of N pooled samples (disjoint blocks of random permutations of the pool: every sample once at
  N = 1, at least `--resamples` subsets per problem at larger N; the same subsets for every
  strategy). The selection is the strategies' own code: each subset is *replayed* through the
  strategy's `run()` with a generator that serves the subset's samples in order and a scorer
  that looks up the pooled scores, so tie-breaking (first seen, and the subset order is random),
  early stopping (majority) and token accounting are exactly the strategies';
- beam search and DVTS with the process RM, which are sequential tree searches and so really run
  for each N in-process (`LocalGenerator`, `LocalScorer("prm")`), one seed per problem.
  N is `SearchConfig.n`: beam search samples N first steps and keeps N / beam_width beams, each
  expanded beam_width ways per step; DVTS grows N / beam_width independent subtrees with
  beam_width children per step. beam_width is min(4, N) (4 is the default), so N = 1 and 2 are
  searches over 1 and 2 candidates per step rather than the default's floor of 4.

Also reported: the gap each strategy closes at N = 16, (acc@16 - pass@1) / (pass@16 - pass@1),
and the generated tokens per problem (the strategies' `usage.generated_tokens`). Outputs: a
markdown table on stdout, `<out>/scaling.md` and `<out>/scaling.png` (`scaling-quick.*` with
`--quick`), and `<out>/scaling.json` with every figure.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from assay.answers import extract  # noqa: E402
from assay.search import STRATEGIES, Generation, GenParams, Score, SearchConfig  # noqa: E402

POOL = 64  # samples per problem (M of the pass@k estimator)
BEAM_WIDTH = 4  # SearchConfig's default
MAX_STEP_TOKENS = 12  # tree-search step cap, as tests/search/test_arith.py (a step is <= 10 tokens here)
GAP_N = 16


# --- the pure parts: estimators, subsets, replay ---------------------------------------------


def pass_at_k(m: int, c: int, k: int) -> float:
    """Unbiased pass@k from c correct of m samples: 1 - C(m-c, k) / C(m, k) (Chen et al. 2021)."""
    if not (0 <= c <= m and 1 <= k <= m):
        raise ValueError(f"need 0 <= c <= m and 1 <= k <= m, got m={m} c={c} k={k}")
    if m - c < k:
        return 1.0
    return 1.0 - math.comb(m - c, k) / math.comb(m, k)


def subsets(rng: random.Random, m: int, n: int, at_least: int) -> list[list[int]]:
    """Size-n subsets of range(m), in random order: the m // n disjoint blocks of successive
    random permutations, as many permutations as it takes to reach `at_least` subsets."""
    if not 1 <= n <= m:
        raise ValueError(f"need 1 <= n <= m, got n={n} m={m}")
    out: list[list[int]] = []
    while len(out) < max(at_least, 1):
        perm = rng.sample(range(m), m)
        out.extend(perm[i * n : (i + 1) * n] for i in range(m // n))
    return out


class ReplayGenerator:
    """A `Generator` that serves pooled samples, in order, instead of sampling.

    It refuses a call for another prompt or for other sampling settings than the pool was drawn
    with (the seed aside: the pooled samples are i.i.d. draws), and more samples than it holds.
    """

    weight_version = "replay"

    def __init__(self, prompt: str, generations: Sequence[Generation], params: GenParams) -> None:
        self.prompt = prompt
        self.generations = list(generations)
        self.params = params
        self.served = 0

    def generate(self, texts: Sequence[str], n: int, params: GenParams) -> list[list[Generation]]:
        if list(texts) != [self.prompt]:
            raise ValueError("replay: a call for another prompt than the pooled one")
        want = (params.temperature, params.top_p, params.max_tokens, params.stop)
        have = (self.params.temperature, self.params.top_p, self.params.max_tokens, self.params.stop)
        if want != have:
            raise ValueError(f"replay: the strategy asks for {want}, the pool was sampled with {have}")
        if self.served + n > len(self.generations):
            raise ValueError(f"replay: {n} more samples asked, {len(self.generations) - self.served} left")
        out = self.generations[self.served : self.served + n]
        self.served += n
        return [out]


class ReplayScorer:
    """A `Scorer` that answers from a table of pooled scores, keyed by (prompt, response)."""

    def __init__(self, table: dict[tuple[str, str], Score], reward_id: str) -> None:
        self.table = table
        self.reward_id = reward_id

    def score(self, items, granularity="outcome", reference=None):  # the Scorer protocol's signature
        if granularity != "outcome":
            raise ValueError("replay: only outcome scores were pooled")
        return [self.table[item] for item in items], self.reward_id


@dataclass
class Pooled:
    """One problem's pool: its prompt, reference answer, samples, and each reward's scores."""

    prompt: str
    answer: str
    generations: list[Generation]
    scores: dict[str, list[Score]] = field(default_factory=dict)  # reward -> one Score per sample

    def table(self, reward: str) -> dict[tuple[str, str], Score]:
        return {(self.prompt, g.text): s for g, s in zip(self.generations, self.scores[reward])}


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    strategy: str  # a key of search.STRATEGIES
    reward: str | None  # orm, prm, verifier, or None (no reward)
    kind: str  # "select" (replayed over the pool) or "tree" (run for real)


METHODS = (
    Method("majority", "majority", "majority", None, "select"),
    Method("bon_orm", "BoN orm", "best_of_n", "orm", "select"),
    Method("wbon_orm", "wBoN orm", "weighted_best_of_n", "orm", "select"),
    Method("bon_verifier", "BoN verifier", "best_of_n", "verifier", "select"),
    Method("wbon_verifier", "wBoN verifier", "weighted_best_of_n", "verifier", "select"),
    Method("bon_prm", "BoN prm", "best_of_n", "prm", "select"),
    Method("beam_prm", "beam prm", "beam_search", "prm", "tree"),
    Method("dvts_prm", "DVTS prm", "dvts", "prm", "tree"),
)


def select_curve(
    pools: Sequence[Pooled], method: Method, ns: Sequence[int], params: GenParams, resamples: int, seed: int
) -> dict[int, tuple[list[float], list[float]]]:
    """N -> (per-problem accuracy, per-problem generated tokens), each the mean over subsets.

    Every subset is replayed through the strategy's own `run()`. The subsets depend only on
    (seed, problem, N), so all methods see the same ones.
    """
    run = STRATEGIES[method.strategy]
    out: dict[int, tuple[list[float], list[float]]] = {n: ([], []) for n in ns}
    for i, p in enumerate(pools):
        scorer = None if method.reward is None else ReplayScorer(p.table(method.reward), f"replay:{method.reward}")
        for n in ns:
            config = SearchConfig(n=n, temperature=params.temperature, top_p=params.top_p, max_tokens=params.max_tokens)
            picks = subsets(random.Random(f"scaling/{seed}/{i}/{n}"), len(p.generations), n, resamples)
            hits = tokens = 0
            for sub in picks:
                gen = ReplayGenerator(p.prompt, [p.generations[j] for j in sub], params)
                r = run(p.prompt, gen, scorer, config, reference=p.answer)
                hits += r.answer == p.answer
                tokens += r.usage.generated_tokens
            out[n][0].append(hits / len(picks))
            out[n][1].append(tokens / len(picks))
    return out


def pool_diagnostics(pools: Sequence[Pooled], rewards: Sequence[str]) -> dict[str, float]:
    """What the pool says about the curves' ceilings, measured without any model:

    - plurality_correct: share of problems whose most frequent final answer over the whole pool
      is the right one (majority vote at N = M, ties to the first seen); wrong_plurality_off_by_one:
      of the other problems, the share whose most frequent answer is the right one +- 1;
    - distinct texts per problem: of correct samples, of answered wrong ones, of well-formed wrong
      ones (only plausible slips; `arith.checks.is_well_formed`); unanswered: share of samples
      without a final answer;
    - per reward, pairwise accuracy over (correct, wrong) sample pairs of the same problem, and
      over (correct, well-formed wrong) pairs (ties count half; a failed score loses).
    """
    from assay.arith.checks import is_well_formed

    plural = unanswered = total = off_by_one = 0
    d_ok, d_wrong, d_wf = [], [], []
    wins = {r: [0.0, 0.0, 0, 0] for r in rewards}  # wins all, wins well-formed, pairs all, pairs well-formed
    for p in pools:
        answers = [extract(g.text) for g in p.generations]
        votes = Counter(a for a in answers if a is not None)
        top = votes.most_common(1)[0][0] if votes else None
        plural += top == p.answer
        off_by_one += top is not None and top != p.answer and abs(int(top) - int(p.answer)) == 1
        unanswered += sum(a is None for a in answers)
        total += len(answers)
        ok = [j for j, a in enumerate(answers) if a == p.answer]
        wrong = [j for j, a in enumerate(answers) if a != p.answer]
        wf = {j for j in wrong if is_well_formed(p.generations[j].text)}
        d_ok.append(len({p.generations[j].text for j in ok}))
        d_wrong.append(len({p.generations[j].text for j in wrong if answers[j] is not None}))
        d_wf.append(len({p.generations[j].text for j in wf}))
        for r in rewards:
            v = [-math.inf if s.value is None else s.value for s in p.scores[r]]
            for i in ok:
                for j in wrong:
                    w = 1.0 if v[i] > v[j] else 0.5 if v[i] == v[j] else 0.0
                    wins[r][0] += w
                    wins[r][2] += 1
                    if j in wf:
                        wins[r][1] += w
                        wins[r][3] += 1
    out = {
        "plurality_correct": plural / len(pools),
        "wrong_plurality_off_by_one": off_by_one / max(len(pools) - plural, 1),
        "distinct_correct_texts": mean(d_ok),
        "distinct_wrong_texts": mean(d_wrong),
        "distinct_well_formed_wrong_texts": mean(d_wf),
        "unanswered": unanswered / total,
    }
    for r, (w_all, w_wf, n_all, n_wf) in wins.items():
        out[f"{r}_pairwise"] = w_all / n_all if n_all else float("nan")
        out[f"{r}_pairwise_well_formed"] = w_wf / n_wf if n_wf else float("nan")
    return out


def gap_closed(acc: float, pass1: float, pass_n: float) -> float:
    """(acc@N - pass@1) / (pass@N - pass@1): the share of the oracle's gain a strategy gets."""
    return (acc - pass1) / (pass_n - pass1) if pass_n > pass1 else float("nan")


# --- the model parts --------------------------------------------------------------------------


def tree_curve(
    problems, method: Method, generator, scorer, ns: Sequence[int], seed: int, log
) -> tuple[dict[int, tuple[list[float], list[float]]], dict[int, float]]:
    """Run the tree search for real at each N; (N -> per-problem (accuracy, tokens), N -> seconds)."""
    run = STRATEGIES[method.strategy]
    out: dict[int, tuple[list[float], list[float]]] = {}
    seconds: dict[int, float] = {}
    for n in ns:
        base = SearchConfig(n=n, beam_width=min(BEAM_WIDTH, n), max_step_tokens=MAX_STEP_TOKENS)
        t0 = time.perf_counter()
        acc, tok = [], []
        for i, p in enumerate(problems):
            r = run(p.prompt, generator, scorer, replace(base, seed=seed * 100_003 + i), reference=str(p.answer))
            acc.append(float(r.answer == str(p.answer)))
            tok.append(float(r.usage.generated_tokens))
        seconds[n] = time.perf_counter() - t0
        out[n] = (acc, tok)
        log(
            f"  {method.label:<10} N={n:<3} acc {statistics.mean(acc):.3f}  {statistics.mean(tok):7.0f} tok/problem  "
            f"{seconds[n]:6.1f} s ({seconds[n] / len(problems) * 1000:.0f} ms/problem)"
        )
    return out, seconds


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def sem(xs: Sequence[float]) -> float:
    """Standard error of the mean over problems."""
    return statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[k]) for r in rows)) for k, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(header), "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|", *map(line, rows)])


def plot(path: Path, ns, curves, pass_n, pass1, methods, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5.5))
    ax.plot(ns, [pass_n[n] for n in ns], "k--", marker="o", label="pass@N (oracle)")
    ax.axhline(pass1, color="grey", linestyle=":", label=f"pass@1 = {pass1:.3f}")
    for m in methods:
        xs = [n for n in ns if n in curves[m.key]]
        style = "-" if m.kind == "select" else "-."
        ax.plot(xs, [curves[m.key][n] for n in xs], style, marker="s" if m.kind == "tree" else "o", label=m.label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("N (samples / beams)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--problems", type=int, default=128, help="held-out problems (default 128)")
    ap.add_argument("--max-n", type=int, default=64, help="largest N, a power of two <= 64 (default 64)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (pool, subsets, tree searches)")
    ap.add_argument("--resamples", type=int, default=16, help="at least this many subsets per problem and N")
    ap.add_argument("--tree-problems", type=int, default=None, help="problems for beam search/DVTS (default: all)")
    ap.add_argument("--quick", action="store_true", help="32 problems, N <= 16, 8 resamples (~2 min)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="folder for scaling.{md,png,json}")
    args = ap.parse_args(argv)
    if args.quick:
        args.problems, args.max_n, args.resamples = min(args.problems, 32), min(args.max_n, 16), min(args.resamples, 8)
    if args.max_n < 1 or args.max_n > POOL or args.max_n & (args.max_n - 1):
        ap.error(f"--max-n must be a power of two between 1 and {POOL}")
    ns = [2**k for k in range(args.max_n.bit_length())]
    tree_problems = min(args.tree_problems or args.problems, args.problems)
    command = " ".join([".venv/bin/python bench/scaling.py", *(sys.argv[1:] if argv is None else argv)])

    import torch

    torch.set_num_threads(1)
    from assay.arith import world
    from assay.search.local import LocalGenerator, LocalScorer

    t_start = time.perf_counter()
    walls: dict[str, float] = {}
    log = lambda s: print(s, flush=True)

    problems = world.eval_problems(args.problems)
    log(
        f"{len(problems)} held-out problems (arith.world.eval_problems), pool M={POOL}, N in {ns}, "
        f"resamples >= {args.resamples}, tree search on {tree_problems} problems, seed {args.seed}, torch threads 1"
    )

    # 1. the pool: the exact GenParams best-of-N / majority use with SearchConfig's defaults
    t0 = time.perf_counter()
    generator = LocalGenerator.embedded()
    cfg = SearchConfig()
    params = GenParams(cfg.temperature, cfg.top_p, cfg.max_tokens, (), args.seed)
    rows = generator.generate([p.prompt for p in problems], POOL, params)
    pools = [Pooled(p.prompt, str(p.answer), row) for p, row in zip(problems, rows)]
    walls["pool sampling"] = time.perf_counter() - t0
    log(f"pool: {len(problems)} x {POOL} samples in {walls['pool sampling']:.1f} s")

    # 2. every pooled sample scored once by each reward, through LocalScorer (the strategies' path)
    scorers = {}
    for reward in ("orm", "verifier", "prm"):
        t0 = time.perf_counter()
        scorers[reward] = LocalScorer.embedded(reward)
        items = [(p.prompt, g.text) for p in pools for g in p.generations]
        scores, _ = scorers[reward].score(items, "outcome")
        for k, p in enumerate(pools):
            p.scores[reward] = scores[k * POOL : (k + 1) * POOL]
        walls[f"scoring ({reward})"] = time.perf_counter() - t0
        log(f"scored {len(items)} samples with {reward} in {walls[f'scoring ({reward})']:.1f} s")

    correct = [sum(extract(g.text) == p.answer for g in p.generations) for p in pools]
    pass_n = {n: mean([pass_at_k(POOL, c, n) for c in correct]) for n in ns}
    pass_n_per = {n: [pass_at_k(POOL, c, n) for c in correct] for n in ns}
    pass1 = pass_n[1]
    mean_tokens = mean([g.num_tokens for p in pools for g in p.generations])
    log(f"pass@1 {pass1:.3f}, pass@{ns[-1]} {pass_n[ns[-1]]:.3f}, {mean_tokens:.1f} tokens per sample")
    diag = pool_diagnostics(pools, list(scorers))
    log("pool: " + ", ".join(f"{k} {v:.3f}" for k, v in diag.items()))

    # 3. sample-then-select, replayed through the strategies
    curves: dict[str, dict[int, float]] = {}
    per_problem: dict[str, dict[int, list[float]]] = {}
    tokens: dict[str, dict[int, float]] = {}
    for m in (m for m in METHODS if m.kind == "select"):
        t0 = time.perf_counter()
        res = select_curve(pools, m, ns, params, args.resamples, args.seed)
        curves[m.key] = {n: mean(a) for n, (a, _) in res.items()}
        per_problem[m.key] = {n: a for n, (a, _) in res.items()}
        tokens[m.key] = {n: mean(t) for n, (_, t) in res.items()}
        walls[f"replay ({m.label})"] = time.perf_counter() - t0
        log(
            f"{m.label:<14} "
            + "  ".join(f"N={n}: {curves[m.key][n]:.3f}" for n in ns)
            + f"   ({walls[f'replay ({m.label})']:.1f} s)"
        )

    # 4. tree searches, for real
    tree_seconds: dict[str, dict[int, float]] = {}
    for m in (m for m in METHODS if m.kind == "tree"):
        t0 = time.perf_counter()
        log(f"{m.label} on {tree_problems} problems:")
        res, tree_seconds[m.key] = tree_curve(
            problems[:tree_problems], m, generator, scorers["prm"], ns, args.seed, log
        )
        curves[m.key] = {n: mean(a) for n, (a, _) in res.items()}
        per_problem[m.key] = {n: a for n, (a, _) in res.items()}
        tokens[m.key] = {n: mean(t) for n, (_, t) in res.items()}
        walls[f"tree search ({m.label})"] = time.perf_counter() - t0
    wall = time.perf_counter() - t_start

    # 5. tables
    header = ["N", "pass@N", *(m.label for m in METHODS)]
    acc_rows = [[str(n), f"{pass_n[n]:.3f}", *(f"{curves[m.key][n]:.3f}" for m in METHODS)] for n in ns]
    acc_table = markdown_table(header, acc_rows)
    tok_rows = [[str(n), f"{n * mean_tokens:.0f}", *(f"{tokens[m.key][n]:.0f}" for m in METHODS)] for n in ns]
    tok_table = markdown_table(header, tok_rows)
    gap_n = GAP_N if GAP_N in ns else ns[-1]
    gaps = {m.key: gap_closed(curves[m.key][gap_n], pass1, pass_n[gap_n]) for m in METHODS}
    # the tree searches ran on the first tree_problems problems: compare them against that subset's oracle
    sub_pass1 = mean(pass_n_per[1][:tree_problems])
    sub_pass_n = mean(pass_n_per[gap_n][:tree_problems])
    for m in METHODS:
        if m.kind == "tree" and tree_problems < len(problems):
            gaps[m.key] = gap_closed(curves[m.key][gap_n], sub_pass1, sub_pass_n)
    best = max(METHODS, key=lambda m: gaps[m.key] if not math.isnan(gaps[m.key]) else -math.inf)
    gap_rows = [
        [m.label, f"{curves[m.key][gap_n]:.3f} ± {sem(per_problem[m.key][gap_n]):.3f}", f"{gaps[m.key] * 100:.0f}%"]
        for m in METHODS
    ]
    gap_table = markdown_table(["strategy", f"acc@{gap_n} ± s.e.", "gap closed"], gap_rows)
    verdict = (
        f"Best at N={gap_n}: **{best.label}** closes **{gaps[best.key] * 100:.0f}%** of the gap between "
        f"pass@1 ({pass1:.3f}) and pass@{gap_n} ({pass_n[gap_n]:.3f}); the issue's target is >= 70%: "
        f"{'met' if gaps[best.key] >= 0.70 else 'not met'}."
    )
    if tree_problems < len(problems):
        verdict += (
            f" The tree searches ran on the first {tree_problems} problems only; their gap is against those "
            f"problems' pass@1 ({sub_pass1:.3f}) and pass@{gap_n} ({sub_pass_n:.3f})."
        )
    time_rows = [[k, f"{v:.1f}"] for k, v in walls.items()] + [["total", f"{wall:.1f}"]]
    tree_rows = [
        [str(n), *(f"{tree_seconds[m.key][n] / tree_problems * 1000:.0f}" for m in METHODS if m.kind == "tree")]
        for n in ns
    ]
    tree_table = markdown_table(["N", *(f"{m.label} ms/problem" for m in METHODS if m.kind == "tree")], tree_rows)

    model = "arith policy (Llama, 4 layers, hidden 128, 1.07M params)"
    title = (
        f"Test-time compute scaling, {len(problems)} held-out arithmetic problems "
        f"(tree search: {tree_problems})\n{model}; RMs: orm, verifier, prm; T=1.0, pool M={POOL}"
    )
    stem = "scaling-quick" if args.quick else "scaling"
    args.out.mkdir(parents=True, exist_ok=True)
    plot(args.out / f"{stem}.png", ns, curves, pass_n, pass1, METHODS, title)

    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    notes = [
        f"- Problems: the first {len(problems)} of `arith.world.eval_problems` (held-out split, EVAL_SEED 1234, "
        f"level 2); tree searches on the first {tree_problems}.",
        f"- Pool: M={POOL} samples per problem at T={params.temperature}, top_p={params.top_p}, max_tokens="
        f"{params.max_tokens}, seed {args.seed} ({mean_tokens:.1f} generated tokens per sample on average).",
        "- pass@N: unbiased estimator from the pool. Select columns: mean over >= "
        f"{args.resamples} random size-N subsets of the pool per problem (all 64 samples once at N=1), replayed "
        "through the strategies' `run()`; the same subsets for every column.",
        "- BoN = `best_of_n`, wBoN = `weighted_best_of_n` (sum of scores per final answer); orm = sigmoid of the "
        "outcome RM; verifier = P(yes); prm = min over step scores. beam = `beam_search`, DVTS = `dvts`, with the prm, "
        f"beam_width = min(4, N), max_step_tokens = {MAX_STEP_TOKENS}, seed {args.seed} * 100003 + problem index; at "
        "N = 1 the two are the same search (one beam, one child per step), and they differ little up to N = 4.",
        "- Tokens: generated tokens per problem (`usage.generated_tokens`); the pass@N column is N x the mean sample "
        "length. Tree searches count every token `LocalGenerator` sampled, including those past a step's stop string "
        "(it samples up to max_step_tokens and cuts).",
    ]
    rm_lines = "; ".join(
        f"{r} {diag[f'{r}_pairwise'] * 100:.0f}% ({diag[f'{r}_pairwise_well_formed'] * 100:.0f}% against "
        "well-formed wrong ones)"
        for r in scorers
    )
    peak = lambda key: max(ns, key=lambda n: curves[key][n])
    peaks = ", ".join(
        f"{m.label} at N={peak(m.key)}" for m in METHODS if m.strategy not in ("majority", "weighted_best_of_n")
    )
    why = [
        f"- The most frequent final answer of all {POOL} samples is the right one for "
        f"{diag['plurality_correct'] * 100:.0f}% of the problems; where it is not, it is the right answer +- 1 in "
        f"{diag['wrong_plurality_off_by_one'] * 100:.0f}% of cases (the policy's slips are systematic, mostly one "
        "off). Majority vote, and weighted votes with rewards that cannot see such slips, level off near that share, "
        "far below pass@N.",
        f"- Correct samples are nearly one string per problem ({diag['distinct_correct_texts']:.2f} distinct correct "
        f"texts on average), wrong ones are many ({diag['distinct_wrong_texts']:.1f} distinct answered wrong texts, "
        f"{diag['distinct_well_formed_wrong_texts']:.1f} of them well formed); {diag['unanswered'] * 100:.0f}% of "
        "samples have no final answer.",
        f"- Pairwise accuracy of each reward on (correct, wrong) sample pairs of the same problem (wrong: any other "
        f"final answer or none): {rm_lines}. Best-of-N takes the maximum of a reward that is near chance on "
        "well-formed slips over more and more distinct wrong variants, so the larger N, the likelier its pick is one "
        "of them; weighted best-of-N sums over the duplicates of the right answer instead and tracks majority vote. "
        "Beam search and DVTS rank with the process reward too. Peaks of the argmax-style curves: "
        f"{peaks}.",
    ]
    md = "\n".join(
        [
            f"# Test-time compute scaling on the arithmetic world ({'quick' if args.quick else 'full'} run)",
            "",
            f"`{command}` on {when}, wall time {wall / 60:.1f} min ({platform.node()}, {platform.machine()}, "
            f"torch {torch.__version__}, 1 thread).",
            "",
            f"{model}. {len(problems)} held-out problems; pass@1 = {pass1:.3f}.",
            "",
            "## Accuracy",
            "",
            acc_table,
            "",
            f"## Gap closed at N={gap_n}: (acc@{gap_n} - pass@1) / (pass@{gap_n} - pass@1)",
            "",
            gap_table,
            "",
            verdict,
            "",
            "## Why the curves look like this (measured on the pool, no model)",
            "",
            *why,
            "",
            "## Generated tokens per problem",
            "",
            tok_table,
            "",
            "## Setup",
            "",
            *notes,
            "",
            "## Wall time (s)",
            "",
            markdown_table(["part", "seconds"], time_rows),
            "",
            tree_table,
            "",
        ]
    )
    (args.out / f"{stem}.md").write_text(md)
    (args.out / f"{stem}.json").write_text(
        json.dumps(
            {
                "command": command,
                "date": when,
                "wall_s": round(wall, 1),
                "problems": len(problems),
                "tree_problems": tree_problems,
                "pool": POOL,
                "ns": ns,
                "seed": args.seed,
                "resamples": args.resamples,
                "pass_at_n": pass_n,
                "accuracy": curves,
                "tokens": tokens,
                "gap_closed": {k: gaps[k] for k in gaps},
                "gap_n": gap_n,
                "walls_s": walls,
                "tree_seconds": tree_seconds,
                "pool_diagnostics": diag,
            },
            indent=1,
        )
    )

    print()
    print(md)
    print(f"wrote {args.out / (stem + '.md')}, {args.out / (stem + '.png')}, {args.out / (stem + '.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
