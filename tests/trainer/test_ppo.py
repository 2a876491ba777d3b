"""Online PPO: the critic starts as the outcome RM, and short real runs against both services."""

from __future__ import annotations

import math

import pytest
import torch

from assay.checkpoints import load_embedded
from assay.trainer.ppo import Critic, PPOConfig, train
from assay.trainer.rundir import RunDir

pytestmark = pytest.mark.e2e

SMALL = dict(prompts_per_step=4, samples_per_prompt=2, max_tokens=40, checkpoint_every=1)


@pytest.mark.unit
def test_the_critic_reads_the_reward_models_head_at_every_position():
    orm, tok = load_embedded("orm")
    critic = Critic(orm)
    batch = tok(["Q: 12+3 A: 12+3=15 #### 15", "Q: 11+4 A: 11+4=16 #### 16"], return_tensors="pt")  # one length
    with torch.no_grad():
        values = critic(batch["input_ids"], batch["attention_mask"])  # [2, length]
        pooled = orm(**batch).logits[:, 0]  # the ORM's score: its head at the last token
    assert values.shape == batch["input_ids"].shape
    assert torch.allclose(values[:, -1], pooled, atol=1e-5)


def test_ppo_steps_train_actor_and_critic_and_push_the_actor(policy, reward_fn, tmp_path):
    model, tok = load_embedded("policy")
    orm, _ = load_embedded("orm")
    head_before = orm.score.weight.clone()
    history = train(PPOConfig(steps=2, gamma_ptx=0.5, **SMALL), model, tok, orm, policy, reward_fn, RunDir(tmp_path))
    for m in history:
        assert m["samples"] == 8 and m["reward_failed"] == 0 and m["server_logprob_gap"] < 1e-3
        assert all(math.isfinite(m[k]) for k in ("loss", "policy_loss", "value_loss", "kl", "entropy"))
        assert m["ptx_loss"] > 0  # the SFT term is in the loss
    assert history[0]["kl"] == 0.0 < history[1]["kl"]  # the actor left the reference after step 1
    assert policy.weight_version() == history[-1]["weight_version"]
    assert torch.equal(orm.score.weight, head_before)  # the critic trains a copy, not the reward model
    saved = sorted(p.name for p in (tmp_path / "checkpoints" / "step-000002").iterdir())
    assert saved == [
        "critic.optimizer.pt",
        "critic.safetensors",
        "policy.optimizer.pt",
        "policy.safetensors",
        "reference.safetensors",
        "state.json",
    ]
