"""Both services on loopback for the online trainers' tests: one pair per session (subprocesses)."""

from __future__ import annotations

import pytest

from assay.clients.policy import PolicyClient
from assay.clients.reward import RewardClient
from assay.services import LocalServices


@pytest.fixture(scope="session")
def services():
    with LocalServices.start() as svc:
        yield svc


@pytest.fixture
def policy(services, one_torch_thread):
    with PolicyClient.http(services.policy_url, timeout_s=300) as client:
        yield client


@pytest.fixture
def reward_fn(services):
    with RewardClient.http(services.rm_url, timeout_s=300) as rm:
        yield rm.as_reward_fn("correct")
