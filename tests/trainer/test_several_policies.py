"""GRPO against two policy servers named in one `--policy-url` (comma-separated): every version the
trainer pushes reaches both, samples come from either, and none is stale.

Two real policy servers of the embedded policy on loopback (in this process), the trainer's own loop
and `PolicyClient` over HTTP, the reward over rm_server's in-process transport (the same code and id).
One server restarted mid-run is h3's clients' test (tests/clients/); this one checks the trainer's side."""

from __future__ import annotations

import pytest

from assay.checkpoints import EMBEDDED, load_embedded
from assay.clients import PolicyClient, RewardClient
from assay.policy_server.config import ServerConfig
from assay.policy_server.server import BackgroundServer
from assay.rm_server.local import LocalTransport
from assay.trainer.grpo import GRPOConfig, train
from assay.trainer.rundir import RunDir

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def two_servers(one_torch_thread):
    config = ServerConfig(port=0, models={"policy": EMBEDDED["policy"][1]}, rm_check_interval_s=3600)
    with BackgroundServer(config) as a, BackgroundServer(config) as b:
        yield a.http_url, b.http_url


def test_grpo_pushes_every_version_to_every_server_and_samples_from_either(two_servers, tmp_path):
    model, tok = load_embedded("policy")
    config = GRPOConfig(steps=2, prompts_per_step=2, group_size=4, max_tokens=24, checkpoint_every=10)
    with (
        PolicyClient.http(",".join(two_servers), timeout_s=300) as policy,
        RewardClient(LocalTransport(rewards=["correct"]), timeout_s=300) as rm,
    ):
        history = train(config, model, tok, policy, rm.as_reward_fn("correct"), RunDir(tmp_path))
        versions = policy.weight_versions()
    assert len(versions) == 2 and set(versions.values()) == {history[-1]["weight_version"]}
    assert [m["weight_version"] for m in history] == [history[0]["weight_version"], history[0]["weight_version"] + 1]
    assert all(m["samples"] == 8 and m["stale_dropped"] == 0 for m in history), history
    assert all(m["server_logprob_gap"] < 1e-3 for m in history)  # both serve exactly the trainer's weights
