"""Every strategy on the embedded arithmetic world, in-process, on a fixed held-out problem set.

The claim under test: with the same seeds and temperature, search never does worse than its
no-search baseline, the pass@1 of single samples. `pytest tests/search/test_arith.py -s` prints
the accuracy of each strategy beside the baseline.
"""

from __future__ import annotations

import pytest

from assay.answers import extract
from assay.arith import world
from assay.search import STRATEGIES, Budget, GenParams, SearchConfig
from assay.search.local import LocalGenerator, LocalScorer

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_torch_thread")]

PROBLEMS = world.eval_problems(24)
CONFIG = SearchConfig(n=8, temperature=1.0, max_tokens=48, max_step_tokens=12, seed=0)
REWARD = {  # which embedded reward each strategy searches with (None: no reward model)
    "best_of_n": "orm",
    "weighted_best_of_n": "orm",
    "majority": None,
    "refine": "prm",
    "beam_search": "prm",
    "dvts": "prm",
}


@pytest.fixture(scope="module")
def generator():
    return LocalGenerator.embedded()


@pytest.fixture(scope="module")
def scorers():
    return {kind: LocalScorer.embedded(kind) for kind in ("orm", "prm", "verifier")}


@pytest.fixture(scope="module")
def baseline(generator):
    """pass@1 at the search's temperature: the share of correct single samples, n per problem."""
    params = GenParams(CONFIG.temperature, CONFIG.top_p, CONFIG.max_tokens, (), CONFIG.seed)
    rows = generator.generate([p.prompt for p in PROBLEMS], CONFIG.n, params)
    correct = [extract(g.text, CONFIG.answer) == str(p.answer) for p, row in zip(PROBLEMS, rows) for g in row]
    return sum(correct) / len(correct)


def test_strategies_cover_the_dict():
    assert set(REWARD) == set(STRATEGIES)


@pytest.mark.slow  # every strategy on 24 problems with the real policy
@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_search_beats_or_equals_single_sample_accuracy(name, generator, scorers, baseline):
    scorer = scorers[REWARD[name]] if REWARD[name] else None
    results = [STRATEGIES[name](p.prompt, generator, scorer, CONFIG, reference=str(p.answer)) for p in PROBLEMS]
    accuracy = sum(r.answer == str(p.answer) for r, p in zip(results, PROBLEMS)) / len(PROBLEMS)
    tokens = sum(r.usage.generated_tokens for r in results) / len(PROBLEMS)
    samples = sum(r.usage.candidates for r in results) / len(PROBLEMS)
    print(
        f"\n{name:>20} ({REWARD[name] or 'no reward'}): accuracy {accuracy:.3f} vs pass@1 {baseline:.3f}, "
        f"{tokens:.0f} tokens and {samples:.1f} samples per problem"
    )
    assert accuracy >= baseline, f"{name}: {accuracy:.3f} < pass@1 {baseline:.3f}"
    for r, p in zip(results, PROBLEMS):
        assert r.weight_version == "local:policy"
        assert r.reward_id == (f"local:{REWARD[name]}" if REWARD[name] else None)
        assert all(c.correct == (c.final_answer == str(p.answer)) for c in r.candidates)


class Counting:
    """Wraps a generator and counts what it really sampled, independently of the strategies."""

    def __init__(self, inner):
        self.inner, self.weight_version = inner, inner.weight_version
        self.sequences = self.tokens = 0

    def generate(self, texts, n, params):
        out = self.inner.generate(texts, n, params)
        self.sequences += sum(len(row) for row in out)
        self.tokens += sum(g.num_tokens for row in out for g in row)
        return out


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_budget_holds_with_the_real_policy(name, generator, scorers):
    budget = Budget(max_candidates=6, max_tokens=120)
    counting = Counting(generator)
    scorer = scorers[REWARD[name] or "orm"]
    for p in PROBLEMS[:2]:
        r = STRATEGIES[name](p.prompt, counting, scorer, SearchConfig(n=8, max_step_tokens=12, budget=budget))
        assert r.usage.candidates <= 6 and r.usage.generated_tokens <= 120
    assert 0 < counting.sequences <= 2 * 6 and counting.tokens <= 2 * 120


def test_local_generator_stops_at_a_step_and_counts_every_sampled_token(generator):
    prompt = PROBLEMS[0].prompt
    params = GenParams(1.0, 1.0, 12, (" ",), 0)
    steps = generator.generate([prompt], 4, params)[0]
    full = generator.generate([prompt], 4, GenParams(1.0, 1.0, 12, (), 0))[0]
    for step, whole in zip(steps, full):
        # the same seed samples the same tokens; the step is the text up to its first space
        assert whole.text.startswith(step.text) and step.num_tokens == whole.num_tokens
        if step.finish_reason == "step":
            assert step.text.endswith(" ") and " " not in step.text[:-1]
        assert step.num_tokens >= len(generator.tokenizer(step.text, add_special_tokens=False)["input_ids"])


def test_local_scorers_give_probabilities_and_steps(scorers):
    p = PROBLEMS[0]
    items = [(p.prompt, p.solution), (p.prompt, p.solution.replace("=", "x", 1)), (p.prompt, "")]
    for kind, scorer in scorers.items():
        scores, reward_id = scorer.score(items, "steps")
        assert reward_id == f"local:{kind}" and len(scores) == 3
        if kind == "prm":
            assert len(scores[0].steps) == len(p.steps()) + 1 and scores[0].value == min(scores[0].steps)
            assert scores[2].value is None and scores[2].error  # no steps: failed, not 0
        else:
            assert scores[0].steps is None
        good, broken = scores[0].value, scores[1].value
        assert 0 <= broken < good <= 1, (kind, good, broken)
