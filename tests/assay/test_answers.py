"""Answer extraction (assay.answers): each way of finding an answer, normalisation, refusals."""

from __future__ import annotations

import pytest

from assay.answers import Extract, extract, last_boxed, normalize

pytestmark = pytest.mark.unit

BOXED, LAST, HASHES = Extract("boxed"), Extract("last_number"), Extract("hashes")


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("23+45=68 68-17=51 #### 51", "51"),  # the arithmetic world's format, unchanged
        ("#### -07 ", "-7"),
        ("The total is 1,234 dollars.\n#### 1,234", "1234"),  # GSM8K's
        ("#### 2.50", "2.5"),
        ("#### 5 and more", None),  # anchored at the end: trailing text is no answer
        ("23+45=68 68-17=51", None),
        ("#### 5,1", None),  # not a number as people write one
        ("52+97=149 149+26=177 ####+77", None),  # a slip of the embedded policy's, no answer as before
    ],
)
def test_hashes(text, answer):
    assert extract(text) == answer and extract(text, HASHES) == answer


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        (r"so $\boxed{\frac{1}{2}}$", r"\frac{1}{2}"),  # nested braces kept whole
        (r"first \boxed{3}, then \boxed{ 4 }", "4"),  # the last one counts
        (r"\boxed{3} and a cut-off \boxed{\frac{1}{", "3"),  # an unclosed box is not an answer
        (r"\boxed {x^{2} + 1}", "x^{2} + 1"),
        (r"\boxed{1,234.50}", "1234.5"),
        ("no box here: 12", None),
    ],
)
def test_boxed(text, answer):
    assert extract(text, BOXED) == answer


def test_last_boxed_is_the_raw_content():
    assert last_boxed(r"\boxed{ a  b }") == " a  b "


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("She pays $1,234.50.", "1234.5"),
        ("23+45=68 68-17=51", "51"),  # `-` between digits is an operator, not a sign
        ("x = -3", "-3"),
        ("It is +0.0", "0"),
        ("step2 has none", None),  # digits inside a word are not a number
        ("no numbers", None),
    ],
)
def test_last_number(text, answer):
    assert extract(text, LAST) == answer


def test_regex_takes_group_one_of_the_last_match():
    how = Extract("regex", r"[Aa]nswer:\s*(\S+)")
    assert extract("answer: 3, no, Answer: 004", how) == "4"
    assert extract("nothing", how) is None
    assert extract("Final: Paris", Extract("regex", r"Final: (\w+)|Other: (\w+)")) == "Paris"
    assert extract("Other: Rome", Extract("regex", r"Final: (\w+)|Other: (\w+)")) is None  # group 1 did not take part


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("1,234", "1234"),
        ("+1,234.500", "1234.5"),
        ("-07", "-7"),
        ("-0.00", "0"),
        ("2.50", "2.5"),
        ("10", "10"),
        ("100.0", "100"),
        ("  \\frac{1}{2}\n", "\\frac{1}{2}"),
        ("x  +\t1", "x + 1"),
    ],
)
def test_normalize(raw, canonical):
    assert normalize(raw) == canonical


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"how": "regex"}, "needs a `pattern`"),
        ({"how": "regex", "pattern": "(unclosed"}, "not a valid regular expression"),
        ({"how": "regex", "pattern": r"####\s*\d+"}, "capturing group"),
        ({"how": "boxed", "pattern": "(x)"}, "takes none"),
        ({"how": "boxd"}, "hashes, boxed, last_number, regex"),
    ],
)
def test_bad_configs_are_refused_with_the_reason(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Extract(**kwargs)
