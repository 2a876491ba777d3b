"""LoRA runs of GRPO and PPO against both services on loopback: only the adapter is trained and
pushed, the server's greedy output equals the trainer's merged model's, the reference is the base
model, and a killed run resumes from its adapter-only checkpoint."""

from __future__ import annotations

import re

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

from assay.checkpoints import load_embedded
from assay.trainer import lora
from assay.trainer.config import LoRA
from assay.trainer.grpo import GRPOConfig, train
from assay.trainer.ppo import PPOConfig
from assay.trainer.ppo import train as train_ppo
from assay.trainer.rundir import RunDir

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SMALL = dict(prompts_per_step=4, group_size=4, max_tokens=40, lr=3e-3, checkpoint_every=1, lora=LoRA(r=4, alpha=8))
PROMPT = "Q: 37+48-19 A: "


def pushed(url: str) -> tuple[float, float]:
    """(updates, bytes) the policy server has taken for `policy` so far, from its /metrics."""
    text = httpx.get(f"{url}/metrics").text
    count = re.search(r'^assay_policy_weight_update_seconds_count\{model="policy"\} (\S+)$', text, re.M)
    size = re.search(r'^assay_policy_weight_update_bytes_total\{model="policy"\} (\S+)$', text, re.M)
    return float(count.group(1)) if count else 0.0, float(size.group(1)) if size else 0.0


def test_a_lora_grpo_run_pushes_the_adapter_only_and_serves_the_merged_model(policy, reward_fn, services, tmp_path):
    model, tok = load_embedded("policy")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    full_bytes = sum(v.numel() * v.element_size() for v in base.values())
    policy.update_weights({k: v + 0.05 for k, v in base.items()})  # the server holds other weights than the base
    updates, size = pushed(services.policy_url)
    history = train(GRPOConfig(steps=2, **SMALL), model, tok, policy, reward_fn, RunDir(tmp_path))
    assert [m["samples"] for m in history] == [16, 16]
    assert all(m["server_logprob_gap"] < 1e-3 for m in history)  # served = trainer's weights, adapter merged
    more, more_bytes = pushed(services.policy_url)
    assert more - updates == 4  # the base in full at the start, then the adapter alone: the start's sync and a step's
    per_push = (more_bytes - size - full_bytes) / 3  # (the base's header is a few kB over its data)
    assert 0 < per_push < 0.1 * full_bytes, (per_push, full_bytes)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()  # the run's merged policy
    assert any(not torch.equal(base[k], v) for k, v in merged.state_dict().items())
    served = policy.complete(PROMPT, max_tokens=40, temperature=0.0, return_token_ids=True).choices[0]
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    local = merged.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=tok.pad_token_id)
    assert local[0, ids.shape[1] :].tolist() == served.token_ids
    saved = (tmp_path / "checkpoints" / "step-000002" / "policy.safetensors").stat().st_size
    assert saved < 0.1 * full_bytes  # a checkpoint holds the adapter, not the base


def test_a_lora_run_resumes_from_its_adapter_checkpoint(policy, reward_fn, tmp_path):
    config = GRPOConfig(steps=2, **SMALL)
    model, tok = load_embedded("policy")
    straight = train(config, model, tok, policy, reward_fn, RunDir(tmp_path / "straight"))

    model, tok = load_embedded("policy")
    train(GRPOConfig(steps=1, **SMALL), model, tok, policy, reward_fn, RunDir(tmp_path / "resumed"))
    model, tok = load_embedded("policy")  # a new process: the base from --model, the adapter from the checkpoint
    resumed = train(config, model, tok, policy, reward_fn, RunDir(tmp_path / "resumed"), resume=True)
    assert [m["step"] for m in resumed] == [2]
    assert resumed[0]["loss"] == pytest.approx(straight[1]["loss"], abs=1e-5)
    assert resumed[0]["reward_mean"] == straight[1]["reward_mean"]


def test_ppo_with_a_lora_actor_and_critic(policy, reward_fn, tmp_path):
    model, tok = load_embedded("policy")
    orm, _ = load_embedded("orm")
    config = PPOConfig(steps=1, prompts_per_step=4, samples_per_prompt=2, max_tokens=40, lora=LoRA(r=4, alpha=8))
    (m,) = train_ppo(config, model, tok, orm, policy, reward_fn, RunDir(tmp_path))
    assert m["samples"] == 8 and m["server_logprob_gap"] < 1e-3
    assert m["kl"] == pytest.approx(0.0, abs=1e-6)  # the adapter starts at zero: actor = reference
    state = tmp_path / "checkpoints" / "step-000001"
    assert {p.name for p in state.glob("*.safetensors")} == {"policy.safetensors", "critic.safetensors"}


def test_iterative_dpo_with_lora_pushes_the_adapter_and_serves_the_merged_model(policy, services, tmp_path):
    from assay.arith import world
    from assay.trainer.config import DPOConfig
    from assay.trainer.dpo import iterative_dpo
    from assay.trainer.online import sync_weights
    from assay.trainer.prompts import from_problem

    config = DPOConfig(
        rounds=1, prompts_per_round=4, n=4, max_tokens=24, batch_size=4, epochs=2, lr=3e-3, lora=LoRA(r=4, alpha=8)
    )
    model, tok = load_embedded("policy")
    problems = [from_problem(p) for p in world.take("train", 4, seed=0)]
    with pytest.raises(ValueError, match="pass the policy wrapped"):
        iterative_dpo(model, tok, policy, config, [p.text for p in problems])
    version = sync_weights(policy, model, None)  # the full base first: the adapter merges into it
    wrapped = lora.wrap(model, config.lora)
    updates, size = pushed(services.policy_url)
    (m,) = iterative_dpo(
        wrapped, tok, policy, config, [p.text for p in problems], references=[p.reference for p in problems]
    )
    assert m["pairs"] > 0 and m["steps"] > 0 and m["weight_version"] == version + 1
    more, more_bytes = pushed(services.policy_url)
    assert more - updates == 1 and more_bytes - size < 0.1 * sum(p.numel() * 4 for p in model.parameters())
    served = policy.complete(PROMPT, max_tokens=40, temperature=0.0, return_token_ids=True).choices[0]
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    local = lora.merged(wrapped).eval().generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=tok.pad_token_id)
    assert local[0, ids.shape[1] :].tolist() == served.token_ids
