"""Pure unit tests of the strategies on hand-made candidates (test doubles from doubles.py)."""

from __future__ import annotations

import inspect

import pytest

from assay import search
from assay.answers import extract
from assay.search import (
    STRATEGIES,
    Budget,
    SearchConfig,
    SearchError,
    beam_search,
    best_of_n,
    dvts,
    majority,
    refine,
    weighted_best_of_n,
)
from assay.search.base import aggregate, step_ends
from tests.search.doubles import ScriptedGenerator, TableScorer, TreeGenerator

pytestmark = pytest.mark.unit

P = "Q: 1+1+1 A: "
GOOD, SLIP, BROKEN = "1+1=2 2+1=3 #### 3", "1+1=2 2+1=4 #### 4", "1+1=2 2+x #### 9"


def test_the_dict_dispatches_every_strategy_by_name():
    assert {
        "best_of_n": best_of_n.run,
        "weighted_best_of_n": weighted_best_of_n.run,
        "majority": majority.run,
        "refine": refine.run,
        "beam_search": beam_search.run,
        "dvts": dvts.run,
    } == STRATEGIES


def test_every_strategy_has_the_same_signature():
    signatures = {name: inspect.signature(fn) for name, fn in STRATEGIES.items()}
    first = signatures["best_of_n"]
    assert list(first.parameters) == ["prompt", "generator", "scorer", "config", "reference"]
    assert first.parameters["reference"].kind is inspect.Parameter.KEYWORD_ONLY
    assert all(str(s) == str(first) for s in signatures.values()), signatures


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_returns_a_full_result(name):
    gen = ScriptedGenerator([GOOD, SLIP, GOOD, BROKEN])
    scorer = TableScorer({GOOD: 0.9, SLIP: 0.6, BROKEN: 0.1}, steps=_steps_of(GOOD, SLIP, BROKEN))
    r = STRATEGIES[name](P, gen, scorer, SearchConfig(n=4, beam_width=2), reference="3")
    assert r.strategy == name and r.weight_version == "scripted:v1"
    assert r.answer == "3" and r.text == GOOD and r.candidates[r.chosen].text == GOOD
    assert r.candidates[r.chosen].correct is True
    assert r.usage.generated_tokens == 10 * r.usage.candidates > 0
    assert r.trace and r.trace[-1]["event"] == "chosen"
    assert r.reward_id == (None if name == "majority" else "table:v1")
    assert r.to_dict()["usage"]["candidates"] == r.usage.candidates


def _steps_of(*responses: str) -> dict[str, float]:
    """Step scores for the doubles: a step is good (0.9) until the first wrong one (0.1)."""
    out = {}
    for r in responses:
        for end in step_ends(r):
            out[r[:end]] = 0.1 if any(bad in r[:end] for bad in ("2+1=4", "x", "#### 4", "#### 9")) else 0.9
    return out


# --- best-of-N and weighted best-of-N --------------------------------------------------------


def test_best_of_n_takes_the_argmax_and_never_a_failed_score():
    gen = ScriptedGenerator(["1+1=2 #### 2", "x #### 5", "1+1=2 2+1=3 #### 3", "unscorable #### 7"])
    scorer = TableScorer({"1+1=2 #### 2": 0.4, "x #### 5": 0.2, "1+1=2 2+1=3 #### 3": 0.7})
    r = best_of_n.run(P, gen, scorer, SearchConfig(n=4))
    assert r.answer == "3" and r.chosen == 2
    assert r.candidates[3].score is None and r.candidates[3].error == "not in the table"


def test_best_of_n_prefers_an_answered_response_and_falls_back_to_any():
    scorer = TableScorer({"1+1=2 ": 0.99, "x #### 5": 0.2})
    assert best_of_n.run(P, ScriptedGenerator(["1+1=2 ", "x #### 5"]), scorer, SearchConfig(n=2)).chosen == 1
    assert best_of_n.run(P, ScriptedGenerator(["1+1=2 "]), scorer, SearchConfig(n=1)).chosen == 0


def test_weighted_best_of_n_sums_reward_per_answer():
    # "4" has the single best score, but "3" has more reward in total: 0.5 + 0.45 + 0.3 > 0.9
    responses = ["a #### 4", "b #### 3", "c #### 3", "d #### 3", "e", "f #### 4"]
    table = {"a #### 4": 0.9, "b #### 3": 0.3, "c #### 3": 0.5, "d #### 3": 0.45, "e": 0.99, "f #### 4": 0.0}
    gen, scorer = ScriptedGenerator(responses), TableScorer(table)
    assert best_of_n.run(P, gen, scorer, SearchConfig(n=6)).answer == "4"  # "e" scores best but has no answer
    gen = ScriptedGenerator(responses)
    r = weighted_best_of_n.run(P, gen, scorer, SearchConfig(n=6))
    assert r.answer == "3" and r.chosen == 2  # the best-scored candidate with that answer
    weights = next(e for e in r.trace if e["event"] == "weighted_vote")["weights"]
    assert weights == pytest.approx({"4": 0.9, "3": 1.25})


def test_weighted_selection_by_hand():
    cands = [_cand("2", 0.5), _cand("3", 0.2), _cand("2", None), _cand(None, 0.9), _cand("3", 0.3)]
    assert weighted_best_of_n.select(cands) == (0, pytest.approx({"2": 0.5, "3": 0.5}))  # tie: first seen
    cands.append(_cand("3", 0.1))
    assert weighted_best_of_n.select(cands)[0] == 4
    assert weighted_best_of_n.select([_cand(None, 1.0), _cand("1", None)]) == (None, {})
    with pytest.raises(SearchError, match="must be >= 0"):
        weighted_best_of_n.select([_cand("1", -2.0)])


def _cand(answer, score):
    return search.Candidate(text=f"#### {answer}" if answer else "?", score=score, final_answer=answer)


# --- majority vote ---------------------------------------------------------------------------


def test_majority_votes_without_a_scorer_and_ignores_unanswered():
    gen = ScriptedGenerator(["x #### 5", "y", "z #### 7", "w #### 7", "v", "u #### 5", "t #### 5", "s"])
    r = majority.run(P, gen, None, SearchConfig(n=8, round_size=8))
    assert r.answer == "5" and r.chosen == 0 and r.reward_id is None
    assert majority.tally(r.candidates) == {"5": 3, "7": 2}


def test_majority_tie_goes_to_the_answer_seen_first():
    cands = [_cand("7", None), _cand("5", None), _cand("5", None), _cand("7", None)]
    assert majority.select(cands) == 0
    assert majority.select([_cand(None, None)]) is None


def test_majority_stops_early_once_the_vote_is_decided():
    gen = ScriptedGenerator(["#### 4"] * 3 + ["#### 9"] + ["#### 4"] * 12)
    r = majority.run(P, gen, None, SearchConfig(n=16, round_size=4))
    # after 12 samples "4" leads 11 to 1 with 4 left: nothing can change the winner
    assert r.answer == "4" and r.usage.candidates == 12 and len(gen.calls) == 3
    assert {"event": "stop", "reason": "decided"} in r.trace


def test_majority_consensus_threshold_stops_after_the_first_round():
    gen = ScriptedGenerator(["#### 4", "#### 4", "#### 4", "#### 9"])
    r = majority.run(P, gen, None, SearchConfig(n=16, round_size=4, consensus=0.75))
    assert r.answer == "4" and r.usage.candidates == 4
    assert {"event": "stop", "reason": "consensus"} in r.trace
    assert majority.settled(majority.tally([_cand("4", None), _cand("9", None)]), 10, 0.75) is None


# --- refinement ------------------------------------------------------------------------------


def test_refine_backtracks_to_the_first_failing_step_and_stops_at_the_threshold():
    # first draft slips at step 2; the revision continues from "1+1=2 " and gets it right
    gen = ScriptedGenerator([SLIP, "2+1=3 #### 3"])
    scorer = TableScorer({}, steps=_steps_of(GOOD, SLIP))
    r = refine.run(P, gen, scorer, SearchConfig(round_size=1, rounds=3, threshold=0.8))
    assert [c.text for c in r.candidates] == [SLIP, GOOD] and r.answer == "3"
    assert gen.calls[1][0] == [P + "1+1=2 "]  # the kept prefix is continued
    assert [e["event"] for e in r.trace] == ["round", "revise", "round", "stop", "chosen"]
    assert scorer.calls[0][1] == "steps"


def test_backtrack_and_feedback_prompt_revisers():
    cfg = SearchConfig(step_threshold=0.5)
    assert refine.backtrack(P, SLIP, (0.9, 0.2, 0.1), cfg) == (P + "1+1=2 ", "1+1=2 ")
    assert refine.backtrack(P, SLIP, (0.2, 0.2, 0.1), cfg) == (P, "")
    assert refine.backtrack(P, SLIP, (0.9, 0.9, 0.9), cfg) == (P + "1+1=2 2+1=4 ", "1+1=2 2+1=4 ")
    assert refine.backtrack(P, SLIP, None, cfg) == (P, "")
    revise = refine.feedback_prompt("{prompt}{draft} | step {step}: {step_text} | ")
    assert revise(P, SLIP, (0.9, 0.2, 0.1), cfg) == (f"{P}{SLIP} | step 2: 2+1=4 | ", "")


def test_refine_uses_the_configured_reviser():
    gen = ScriptedGenerator([SLIP, GOOD])
    scorer = TableScorer({}, steps=_steps_of(GOOD, SLIP))
    cfg = SearchConfig(round_size=1, rounds=1, reviser=refine.feedback_prompt("{prompt}{draft} step {step}? "))
    r = refine.run(P, gen, scorer, cfg)
    assert gen.calls[1][0] == [f"{P}{SLIP} step 2? "] and r.answer == "3"


# --- beam search and DVTS --------------------------------------------------------------------

TREE = {
    "": ["1+1=2 ", "1+1=5 ", "1+1=5 ", "1+1=5 "],
    "1+1=2 ": ["2+1=3 ", "2+1=4 "],
    "1+1=5 ": ["5+1=6 "],
    "1+1=2 2+1=3 ": ["#### 3"],
    "1+1=2 2+1=4 ": ["#### 4"],
    "1+1=5 5+1=6 ": ["#### 6"],
}
TREE_STEPS = {
    "1+1=2": 0.9,
    "1+1=5": 0.2,
    "1+1=2 2+1=3": 0.8,
    "1+1=2 2+1=4": 0.3,
    "1+1=5 5+1=6": 0.2,
    "1+1=2 2+1=3 #### 3": 0.8,
    "1+1=2 2+1=4 #### 4": 0.3,
    "1+1=5 5+1=6 #### 6": 0.2,
}


def test_beam_search_follows_the_process_reward_through_the_tree():
    gen = TreeGenerator(P, TREE)
    r = beam_search.run(P, gen, TableScorer({}, TREE_STEPS), SearchConfig(n=4, beam_width=2))
    assert r.answer == "3" and r.text == GOOD
    assert r.candidates[r.chosen].steps == (0.9, 0.8, 0.8)
    # depth 0: 4 first steps; keep 2 distinct beams; each grows 2 children per step
    assert [e["expanded"] for e in r.trace if e["event"] == "step"] == [4, 4, 4]
    assert r.usage.candidates == 12 and r.usage.generated_tokens == 48


def test_dvts_grows_independent_greedy_subtrees():
    gen = TreeGenerator(P, TREE)
    r = dvts.run(P, gen, TableScorer({}, TREE_STEPS), SearchConfig(n=4, beam_width=2))
    # subtree 1 draws "1+1=2 ", "1+1=5 " (keeps the first); subtree 2 draws "1+1=5 " twice
    assert [c.final_answer for c in r.candidates] == ["3", "6"]
    assert r.answer == "3" and r.candidates[0].finish_reason == "stop"


def test_beam_search_marks_responses_cut_at_max_steps():
    gen = TreeGenerator(P, TREE)
    r = beam_search.run(P, gen, TableScorer({}, TREE_STEPS), SearchConfig(n=4, beam_width=2, max_steps=2))
    assert {c.finish_reason for c in r.candidates} == {"depth"}
    assert r.answer is None and r.text == "1+1=2 2+1=3 "  # no finished response: the best prefix


# --- budget and bookkeeping ------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(STRATEGIES))
@pytest.mark.parametrize("budget", [Budget(max_candidates=3), Budget(max_tokens=25), Budget(0, 0)])
def test_no_strategy_spends_more_than_its_budget(name, budget):
    gen = ScriptedGenerator([GOOD, SLIP, BROKEN], tokens=10)
    scorer = TableScorer({GOOD: 0.9, SLIP: 0.6, BROKEN: 0.1}, steps=_steps_of(GOOD, SLIP, BROKEN))
    r = STRATEGIES[name](
        P, gen, scorer, SearchConfig(n=8, beam_width=2, max_tokens=10, max_step_tokens=10, budget=budget)
    )
    sampled = sum(len(texts) * n for texts, n, _ in gen.calls)
    assert r.usage.candidates == sampled and r.usage.generated_tokens == 10 * sampled
    assert sampled <= (budget.max_candidates if budget.max_candidates is not None else 99)
    assert r.usage.generated_tokens <= (budget.max_tokens if budget.max_tokens is not None else 999)
    if budget.max_candidates == 0:
        assert r.answer is None and r.usage.candidates == 0


def test_a_reward_that_changes_mid_search_stops_it():
    class Flipping(TableScorer):  # test double: a reward whose id changes between calls
        def score(self, items, granularity="outcome", reference=None):
            out = super().score(items, granularity, reference)
            self.reward_id += "+"
            return out

    with pytest.raises(SearchError, match="reward changed mid-search"):
        refine.run(
            P, ScriptedGenerator([SLIP, "2+1=4 #### 4"]), Flipping({}, _steps_of(SLIP)), SearchConfig(round_size=1)
        )


def test_each_generate_call_gets_its_own_seed():
    gen = ScriptedGenerator(["#### 1", "#### 2"])
    majority.run(P, gen, None, SearchConfig(n=8, round_size=2, seed=5))
    seeds = [params.seed for _, _, params in gen.calls]
    assert len(seeds) == 4 and len(set(seeds)) == 4


def test_config_refuses_nonsense_with_the_field_named():
    for kw, field in [
        ({"n": 0}, "n"),
        ({"temperature": -1}, "temperature"),
        ({"consensus": 1.5}, "consensus"),
        ({"aggregate": "max"}, "aggregate"),
        ({"rounds": -1}, "rounds"),
    ]:
        with pytest.raises(ValueError, match=field):
            SearchConfig(**kw)
    with pytest.raises(ValueError, match="max_tokens"):
        Budget(max_tokens=-1)


def test_answer_and_step_helpers():
    assert extract("23+45=68 68-17=51 #### 51") == "51" and extract("#### -07 ") == "-7"
    assert extract("no answer") is None and extract("#### 5 and more") is None
    assert step_ends("23+45=68 68-17=51 #### 51") == [8, 17, 25]
    assert step_ends("23+45=68 ") == [8] and step_ends("") == []
    assert [aggregate([0.5, 0.8], h) for h in ("min", "prod", "last", "mean")] == pytest.approx([0.5, 0.4, 0.8, 0.65])
