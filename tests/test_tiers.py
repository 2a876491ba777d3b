"""The tier check (tests/tiers.py) in a pytest run of its own: `-m` selects by the closest tier
marker only, and a test without a tier fails in every tier's run, naming its module."""

import pytest

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.unit

INI = "[pytest]\nmarkers =\n    unit\n    service\n    e2e\naddopts = --strict-markers -p no:cacheprovider\n"
CONFTEST = "from tests.tiers import pytest_collection_modifyitems, pytest_runtest_setup  # noqa: F401\n"
MIXED = """
import pytest

pytestmark = pytest.mark.unit

def test_pure():
    pass

@pytest.mark.service
def test_serves():
    pass

class TestGroup:
    pytestmark = pytest.mark.e2e

    def test_across(self):
        pass
"""


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeini(INI)
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_mixed=MIXED)
    return pytester


@pytest.mark.parametrize(
    ("tier", "selected"),
    [
        ("unit", ["test_mixed.py::test_pure"]),
        ("service", ["test_mixed.py::test_serves"]),
        ("e2e", ["test_mixed.py::TestGroup::test_across"]),
        ("not unit", ["test_mixed.py::test_serves", "test_mixed.py::TestGroup::test_across"]),
    ],
)
def test_the_closest_tier_marker_is_the_only_one_m_sees(suite, tier, selected):
    result = suite.runpytest("-m", tier, "--collect-only", "-q")
    assert result.ret == pytest.ExitCode.OK
    assert [line for line in result.outlines if line.startswith("test_mixed.py")] == selected


@pytest.mark.parametrize("tier", ["unit", "service", "e2e"])
def test_a_test_without_a_tier_fails_in_every_tiers_run_naming_its_module(suite, tier):
    suite.makepyfile(test_untiered="def test_forgotten():\n    pass\n")
    result = suite.runpytest("-m", tier)
    result.assert_outcomes(passed=1, errors=1)  # failed at its setup
    result.stdout.fnmatch_lines(["*test_untiered.py has no tier marker: add `pytestmark = pytest.mark.unit`*"])
