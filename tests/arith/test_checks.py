import pytest

from assay.arith.checks import final_answer, is_correct, segments, step_labels
from assay.arith.world import Problem

pytestmark = pytest.mark.unit

P = Problem((23, 45, 17), ("+", "-"))


def test_reference_solution_is_correct_at_every_step():
    assert is_correct(P, P.solution)
    assert step_labels(P, P.solution) == [True, True, True]


def test_segments_split_equations_and_final_answer_with_spans():
    text = "23+45=68 68-17=51 #### 51"
    segs = segments(text)
    assert [s.text for s in segs] == ["23+45=68", "68-17=51", "#### 51"]
    assert all(text[s.start : s.end] == s.text for s in segs)
    assert [s.is_final for s in segs] == [False, False, True]


def test_an_arithmetic_slip_fails_that_step_and_everything_after():
    text = "23+45=67 67-17=50 #### 50"
    assert not is_correct(P, text)
    assert step_labels(P, text) == [False, False, False]


def test_a_late_slip_keeps_earlier_steps_correct():
    text = "23+45=68 68-17=52 #### 52"
    assert step_labels(P, text) == [True, False, False]


def test_miscopied_operand_is_a_wrong_step_even_if_the_sum_is_right():
    assert step_labels(P, "23+46=69 69-17=52 #### 52")[0] is False


def test_right_answer_after_wrong_work_is_outcome_correct_but_not_process_correct():
    text = "23+45=60 60-17=51 #### 51"
    assert is_correct(P, text)
    assert step_labels(P, text) == [False, False, False]


def test_missing_or_malformed_final_answer():
    assert final_answer("23+45=68 68-17=51") is None
    assert not is_correct(P, "23+45=68 68-17=51")
    assert final_answer("#### -12") == -12
    assert final_answer("#### 51 and more") is None
    assert step_labels(P, "23+45=68 68-17=51") == [True, True]
    assert step_labels(P, "23+45=68 #### 68") == [True, False]
    assert step_labels(P, "garbage") == [False]
    assert segments("") == []


def test_well_formed_means_every_segment_parses():
    from assay.arith.checks import is_well_formed

    assert is_well_formed(P.solution)
    assert is_well_formed("23+45=67 67-17=50 #### 50")  # wrong, but only a plausible slip
    assert not is_well_formed("23+45=6$ 68-17=51 #### 51")
    assert not is_well_formed("23+45=68 68-17=51")
    assert not is_well_formed("23+45=68 68-17=51 #### 51 extra")
    assert not is_well_formed("")
