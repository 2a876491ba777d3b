"""What the weight store keeps for a replica that starts from its checkpoint (`weight_sync.compact`):
replaying the kept updates in order must leave it where every update in order leaves a replica."""

from __future__ import annotations

import pytest

from assay.deploy.weight_sync import Published, compact

pytestmark = pytest.mark.unit


ADAPTER = object()  # stands for an adapters.Adapter: compact only asks whether there is one


def full(version: int, *names: str) -> Published:
    return Published(version, frozenset(names), None, [])


def adapter(version: int, *targets: str) -> Published:
    return Published(version, frozenset(targets), ADAPTER, [])


def kept(*updates: Published) -> list[int]:
    out: list[Published] = []
    for update in updates:
        out = compact(out, update)
    return [u.version for u in out]


def test_a_full_state_dict_each_step_keeps_one_update():
    names = ("a", "b", "c")
    assert kept(full(1, *names), full(2, *names), full(3, *names)) == [3]


def test_a_subset_update_keeps_what_it_does_not_cover():
    assert kept(full(1, "a", "b"), full(2, "b")) == [1, 2]
    assert kept(full(1, "a", "b"), full(2, "b"), full(3, "a", "b")) == [3]


def test_lora_keeps_the_base_push_and_the_last_adapter_only():
    names = ("a", "b", "c")
    assert kept(full(1, *names), adapter(2, "a"), adapter(3, "a", "b"), adapter(4, "b")) == [1, 4]


def test_a_full_update_of_the_adapted_weights_drops_the_adapter_and_an_adapter_drops_no_full_update():
    assert kept(full(1, "a", "b"), adapter(2, "a"), full(3, "a")) == [1, 3]
    assert kept(full(1, "a", "b"), adapter(2, "a"), full(3, "b")) == [1, 2, 3]
    assert kept(full(1, "a"), adapter(2, "a", "b")) == [1, 2]
