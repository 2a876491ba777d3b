import pytest

from assay.arith import world

pytestmark = pytest.mark.unit


def test_example_from_the_issue_has_the_documented_shape():
    p = world.Problem((23, 45, 17), ("+", "-"))
    assert p.prompt + p.solution == "Q: 23+45-17 A: 23+45=68 68-17=51 #### 51"
    assert p.answer == 51
    assert p.running_values() == [68, 51]


def test_negative_intermediate_values_are_written_with_a_sign():
    p = world.Problem((12, 40, 5), ("-", "+"))
    assert p.solution == "12-40=-28 -28+5=-23 #### -23"


def test_stream_is_deterministic_per_seed_and_differs_across_seeds():
    a = world.take("train", 50, seed=7)
    b = world.take("train", 50, seed=7)
    c = world.take("train", 50, seed=8)
    assert a == b
    assert a != c
    assert len({p.expression for p in a}) == 50


def test_splits_are_disjoint_and_stable():
    train = {p.expression for p in world.take("train", 2000, seed=0)}
    held = {p.expression for p in world.take("heldout", 300, seed=0)}
    assert not train & held
    assert all(world.split_of(e) == "heldout" for e in held)
    # the split is a property of the problem, not of the seed that drew it
    assert all(p.split == "train" for p in world.take("train", 200, seed=99))


@pytest.mark.parametrize("level", sorted(world.LEVELS))
def test_levels_bound_operands_and_steps(level):
    spec = world.LEVELS[level]
    for p in world.take("train", 100, seed=1, level=level):
        assert spec.min_operands <= len(p.operands) <= spec.max_operands
        assert all(spec.min_value <= x <= spec.max_value for x in p.operands)
        assert len(p.steps()) == len(p.operands) - 1


def test_parse_prompt_round_trips_and_rejects_junk():
    for p in world.take("heldout", 20, seed=3):
        assert world.parse_prompt(p.prompt) == p
        assert world.parse_prompt(p.expression) == p
    for bad in ["Q: 12+ A: ", "hello", "Q: 3*4 A: ", ""]:
        with pytest.raises(ValueError):
            world.parse_prompt(bad)


def test_bad_split_and_level_are_refused():
    with pytest.raises(ValueError, match="split"):
        next(world.problems("test", 0))
    with pytest.raises(ValueError, match="level"):
        next(world.problems("train", 0, level=42))
    with pytest.raises(ValueError):
        world.Level(1, 2, 0, 9)
