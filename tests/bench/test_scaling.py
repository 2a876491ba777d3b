"""The pure parts of bench/scaling.py on hand-made data: no model is loaded, nothing is sampled."""

from __future__ import annotations

import importlib.util
import itertools
import math
import random
import sys
from fractions import Fraction
from pathlib import Path

import pytest

from assay.search import Generation, GenParams, Score

pytestmark = pytest.mark.unit

_PATH = Path(__file__).resolve().parents[2] / "bench" / "scaling.py"
_spec = importlib.util.spec_from_file_location("bench_scaling", _PATH)
scaling = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = scaling  # dataclasses look their module up there
_spec.loader.exec_module(scaling)

P = "Q: 1+1+1 A: "
PARAMS = GenParams(1.0, 1.0, 48, (), 0)


def method(strategy: str, reward: str | None = "orm"):
    return scaling.Method(strategy, strategy, strategy, reward, "select")


def pool(samples: list[tuple[str, float]], tokens: int = 10) -> scaling.Pooled:
    """(response, orm score) pairs as one problem's pool, reference answer 3."""
    gens = [Generation(text, tokens, "stop") for text, _ in samples]
    return scaling.Pooled(P, "3", gens, {"orm": [Score(v) for _, v in samples]})


# --- pass@k ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("m", "c", "k", "expected"),
    [
        (4, 2, 1, 0.5),  # pass@1 is c / m
        (4, 2, 2, 5 / 6),  # 1 - C(2,2)/C(4,2) = 1 - 1/6
        (4, 2, 3, 1.0),  # fewer than k wrong samples: every k-subset holds a correct one
        (4, 0, 4, 0.0),
        (4, 4, 1, 1.0),
        (64, 1, 16, 0.25),  # 1 - C(63,16)/C(64,16) = 1 - 48/64
        (10, 3, 2, 1 - 21 / 45),  # C(7,2) = 21, C(10,2) = 45
    ],
)
def test_pass_at_k_matches_hand_computed_values(m, c, k, expected):
    assert scaling.pass_at_k(m, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_is_the_share_of_k_subsets_holding_a_correct_sample():
    m = 7
    for c in range(m + 1):
        labels = [True] * c + [False] * (m - c)
        for k in range(1, m + 1):
            subs = list(itertools.combinations(range(m), k))
            exact = Fraction(sum(any(labels[i] for i in s) for s in subs), len(subs))
            assert scaling.pass_at_k(m, c, k) == pytest.approx(float(exact), abs=1e-12)


def test_pass_at_k_rejects_impossible_counts():
    for m, c, k in [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)]:
        with pytest.raises(ValueError):
            scaling.pass_at_k(m, c, k)


def test_gap_closed():
    assert scaling.gap_closed(0.6, 0.2, 0.9) == pytest.approx(4 / 7)
    assert scaling.gap_closed(0.2, 0.2, 0.9) == 0.0
    assert math.isnan(scaling.gap_closed(0.5, 0.5, 0.5))


# --- subsets and replay ---------------------------------------------------------------------


def test_subsets_are_disjoint_blocks_of_permutations():
    rng = random.Random(0)
    assert sorted(i for s in scaling.subsets(rng, 8, 1, 4) for i in s) == list(range(8))  # n=1: each once
    subs = scaling.subsets(rng, 8, 4, 5)  # 2 blocks per permutation: 3 permutations
    assert len(subs) == 6 and all(len(s) == 4 for s in subs)
    for a, b in zip(subs[::2], subs[1::2]):
        assert sorted(a + b) == list(range(8))
    assert len(scaling.subsets(rng, 8, 8, 3)) == 3
    with pytest.raises(ValueError):
        scaling.subsets(rng, 8, 9, 1)


def test_replay_generator_serves_in_order_and_refuses_other_settings():
    gens = [Generation(f"#### {i}", 5, "stop") for i in range(3)]
    g = scaling.ReplayGenerator(P, gens, PARAMS)
    assert g.generate([P], 2, GenParams(1.0, 1.0, 48, (), 7)) == [gens[:2]]  # any seed
    with pytest.raises(ValueError):
        g.generate([P], 2, PARAMS)  # only one left
    for texts, params in [
        (["other"], PARAMS),
        ([P], GenParams(0.7, 1.0, 48, (), 0)),
        ([P], GenParams(1.0, 1.0, 48, (" ",), 0)),
    ]:
        with pytest.raises(ValueError):
            scaling.ReplayGenerator(P, gens, PARAMS).generate(texts, 1, params)


GOOD, SLIP = "1+1=2 2+1=3 #### 3", "1+1=2 2+1=4 #### 4"


def test_best_of_n_over_subsets_of_a_hand_built_pool():
    # A correct 0.9, B wrong 0.8, C correct 0.5, D wrong 0.1
    p = pool([(GOOD, 0.9), (SLIP, 0.8), (GOOD + " ", 0.5), ("1+1=3 #### 5", 0.1)])
    curve = scaling.select_curve([p], method("best_of_n"), [1, 2, 4], PARAMS, resamples=4000, seed=0)
    # N=1: every sample once, exactly the share of correct samples
    assert curve[1] == ([0.5], [10.0])
    # N=4: the whole pool, argmax A is correct whatever the order
    assert curve[4][0] == [1.0] and curve[4][1] == [40.0]
    # N=2: of the 6 pairs, AB AC AD CD pick a correct one, BC BD a wrong one: 4/6
    assert curve[2][0][0] == pytest.approx(2 / 3, abs=0.02)
    assert curve[2][1] == [20.0]


def test_the_replayed_selection_is_each_strategys_own():
    # "4" holds the single best score, "3" the most votes and the most reward in total
    p = pool([(GOOD, 0.6), (SLIP, 0.9), (GOOD, 0.6), ("1+1=2 2+1=5 #### 5", 0.1)])
    ns = [4]
    assert scaling.select_curve([p], method("best_of_n"), ns, PARAMS, 8, 0)[4][0] == [0.0]
    assert scaling.select_curve([p], method("weighted_best_of_n"), ns, PARAMS, 8, 0)[4][0] == [1.0]
    assert scaling.select_curve([p], method("majority", None), ns, PARAMS, 8, 0)[4][0] == [1.0]


def test_majority_tokens_count_its_early_stop():
    # 16 samples all answering 3: in rounds of 4, the vote is decided after 12 (12 votes > 4 left)
    p = pool([(GOOD, 0.5)] * 16)
    acc, tokens = scaling.select_curve([p], method("majority", None), [16], PARAMS, 2, 0)[16]
    assert acc == [1.0] and tokens == [120.0]


def test_markdown_table_lines_up():
    out = scaling.markdown_table(["N", "acc"], [["1", "0.25"], ["16", "0.5"]]).splitlines()
    assert out[0] == "|  N |  acc |" and out[1] == "|---:|-----:|" and out[3] == "| 16 |  0.5 |"


def test_pool_diagnostics_on_a_hand_built_pool():
    # right answer 3: two copies of the solution, one well-formed slip (4), one broken (9), one unanswered
    p = pool([(GOOD, 0.9), (GOOD, 0.9), (SLIP, 0.95), ("1+x=2 #### 9", 0.1), ("1+1=2", 0.5)])
    d = scaling.pool_diagnostics([p], ["orm"])
    assert d["plurality_correct"] == 1.0 and d["unanswered"] == pytest.approx(1 / 5)
    assert (
        d["distinct_correct_texts"] == 1
        and d["distinct_wrong_texts"] == 2
        and d["distinct_well_formed_wrong_texts"] == 1
    )
    # pairs: each of the 2 correct against SLIP (lose), broken (win), unanswered (win): 4 of 6
    assert d["orm_pairwise"] == pytest.approx(4 / 6) and d["orm_pairwise_well_formed"] == 0.0
    # the plurality is wrong and off by one: 4 twice against 3 once
    q = pool([(SLIP, 0.5), (SLIP, 0.5), (GOOD, 0.5)])
    d = scaling.pool_diagnostics([q], ["orm"])
    assert d["plurality_correct"] == 0.0 and d["wrong_plurality_off_by_one"] == 1.0
