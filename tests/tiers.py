"""Test tiers: every test is exactly one of `unit`, `service` or `e2e`, and says which with a marker.

    unit     pure and in-process: no server, no subprocess that serves, no socket beyond an
             in-process ASGI client (`make test-fast` runs this tier)
    service  starts one real service on loopback, in-process or as a subprocess, on the tiny
             checkpoints
    e2e      across services: rm_server and policy_server together, or the trainer against both

A module states its tier once, `pytestmark = pytest.mark.unit`; a test of another tier in it says
its own, `@pytest.mark.service`, and the closest marker wins. `slow` (what a quick loop skips) and
`reliability` (tests/reliability) are not tiers: they go beside one.

A test without a tier fails, in whichever tier's run (`-m unit`, `-m service`, `-m e2e`, or all of
them: `make test`), with a message saying what to add: a new module can neither slip out of the
tiers nor be left out of the quick loop unnoticed. It fails as a test rather than stopping the
collection, because pytest-xdist's workers swallow a collection-time error's message.
tests/conftest.py installs the hooks below.
"""

from __future__ import annotations

import pytest

TIERS = ("unit", "service", "e2e")
UNTIERED = pytest.StashKey[bool]()


@pytest.hookimpl(tryfirst=True)  # before pytest's own `-m` selection reads the markers
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Give each test its closest tier marker and only that one; a test without one gets them all,
    so that every tier's run selects it, and is failed at its setup."""
    tiers = {item: _closest_tier(item) for item in items}
    # `-m unit` matches any marker a test inherits: a module's `unit` would select its service
    # tests too. So the winning tier moves onto the test, and the module or class keeps none.
    for item in items:
        for node in item.listchain():
            node.own_markers[:] = [mark for mark in node.own_markers if mark.name not in TIERS]
    for item, tier in tiers.items():
        if tier is None:
            item.stash[UNTIERED] = True
        for name in TIERS if tier is None else (tier,):
            item.add_marker(name)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.stash.get(UNTIERED, False):
        module = item.nodeid.split("::")[0]
        message = f"{module} has no tier marker: add `pytestmark = pytest.mark.unit` (or service, e2e: tests/tiers.py)"
        pytest.fail(message, pytrace=False)


def _closest_tier(item: pytest.Item) -> str | None:
    # iter_markers walks from the test outwards: its own markers, then its class's, then its module's
    return next((mark.name for mark in item.iter_markers() if mark.name in TIERS), None)
