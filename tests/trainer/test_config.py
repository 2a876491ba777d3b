"""The trainer's configs: the base's fields and checks hold for every online algorithm, each adds its own."""

from __future__ import annotations

from dataclasses import fields

import pytest

from assay.trainer.config import DPOConfig, GRPOConfig, OnlineConfig, PPOConfig, RLConfig

pytestmark = pytest.mark.unit

ALGORITHMS = (GRPOConfig, PPOConfig, DPOConfig)


@pytest.mark.parametrize("cls", ALGORITHMS)
def test_the_bases_checks_hold_for_every_algorithm(cls):
    for bad, said in (
        ({"service_timeout_s": 0}, "service_timeout_s must be > 0"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"grad_clip": 0}, "grad_clip > 0"),
        ({"temperature": -1}, "temperature >= 0"),
    ):
        with pytest.raises(ValueError, match=said):
            cls(**bad)
    if issubclass(cls, RLConfig):
        with pytest.raises(ValueError, match="steps, checkpoint_every and eval_problems must be >= 1"):
            cls(checkpoint_every=0)


def test_each_algorithm_declares_only_its_own_fields_besides_the_bases():
    shared = {f.name for f in fields(OnlineConfig)}
    steps = {f.name for f in fields(RLConfig)} - shared
    for cls in ALGORITHMS:
        own = set(cls.__dataclass_fields__) - shared - (steps if issubclass(cls, RLConfig) else set())
        declared = set(cls.__annotations__)  # what the class body itself writes
        assert declared - own <= {"reward"}, cls  # DPO scores with the ORM by default: its one redeclared field
    assert DPOConfig().reward == "orm" and GRPOConfig().reward == PPOConfig().reward == "correct"
