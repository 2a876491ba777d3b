"""The order test files run in: the long ones first, so that two workers finish together.

`make test` runs two pytest-xdist workers that take whole test files from one queue (`--dist loadgroup`:
a file is its own group, but the Ray tests share one, `xdist_group("ray")`, so one worker runs them all on
one Ray cluster), each taking the next file when it is done with one. The queue's order decides how the run ends: a
long file taken last keeps one worker busy while the other has nothing left. xdist's own order (the
files with the most tests first) put the files of one or two long tests last: the GPU check's CPU run
(about 2 minutes), the score bench's smoke run, the sustained load and the kill tests.

So the files are queued longest first, as far as the suite says how long they are:

1. the first file that uses the `tiny_chat` fixture (tests/conftest.py): its worker builds the fixture
   (minutes) while the other worker runs everything else, and any file that needs it later finds it built;
2. every other file with a test marked `slow` (over about 10 s) or `reliability` (load, kills, drains:
   tens of seconds each), that does not use `tiny_chat`;
3. the rest, the files with the most tests first (xdist's own order), the tiny-chat users among them.

Each file keeps its tests in their own order, together. Makefile's `test` passes `--no-loadscope-reorder`
so xdist keeps this order; a run without xdist runs in it too, to no harm.
"""

from __future__ import annotations

import pytest

TINY_CHAT = "tiny_chat"
LONG = ("slow", "reliability")  # markers of the tests that take tens of seconds or more


@pytest.hookimpl(trylast=True)  # after `-m` and `-k` have deselected: only what runs is ordered
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    files: dict[str, list[pytest.Item]] = {}
    for item in items:
        files.setdefault(item.nodeid.split("::")[0], []).append(item)
    builder = next((f for f, tests in files.items() if _uses_tiny_chat(tests)), None)

    def rank(name: str) -> tuple[int, int]:
        tests = files[name]
        if name == builder:
            return (0, 0)
        if not _uses_tiny_chat(tests) and any(t.get_closest_marker(m) for t in tests for m in LONG):
            return (1, 0)
        return (2, -len(tests))

    items[:] = [item for name in sorted(files, key=rank) for item in files[name]]  # sorted is stable


def _uses_tiny_chat(tests: list[pytest.Item]) -> bool:
    return any(TINY_CHAT in getattr(t, "fixturenames", ()) for t in tests)
