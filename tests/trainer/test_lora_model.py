"""`trainer.lora` on the embedded policy, no services: the reference is the base, only the adapter
trains (gradient checkpointing included), and a checkpoint of another adapter is refused on resume."""

from __future__ import annotations

import pytest
import torch

from assay.checkpoints import load_embedded
from assay.trainer import lora
from assay.trainer.config import LoRA
from assay.trainer.online import Rollout, pack, token_logprobs
from assay.trainer.prompts import Prompt

pytestmark = pytest.mark.unit

PROMPT = "Q: 37+48-19 A: "


def test_the_reference_is_the_base_model_and_only_the_adapter_trains():
    model, tok = load_embedded("policy")
    base, _ = load_embedded("policy")
    wrapped = lora.wrap(model, LoRA(r=4, alpha=8))
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)  # the adapter now changes the model's outputs
    batch = pack_prompt(tok)
    with torch.no_grad():
        ref = token_logprobs(lora.Reference(wrapped), batch)[0]
        adapted = token_logprobs(wrapped, batch)[0]
        expected = token_logprobs(base, batch)[0]
    assert torch.allclose(ref, expected, atol=1e-6) and not torch.allclose(adapted, expected, atol=1e-3)
    names = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n for n in names)
    assert len(lora.trainable(wrapped)) == len(names)


def pack_prompt(tok):
    ids = tok(PROMPT)["input_ids"]
    return pack([Rollout(Prompt(PROMPT), ids, ids[:5], "", [], 0)], tok.pad_token_id)


def test_with_gradient_checkpointing_the_adapter_gets_its_gradients():
    model, tok = load_embedded("policy")
    model.gradient_checkpointing_enable()
    wrapped = lora.wrap(model, LoRA(r=4, alpha=8))
    wrapped.train()
    batch = pack_prompt(tok)
    logp = token_logprobs(wrapped, batch)[0]
    (logp * batch.completion_mask).sum().backward()
    grads = [p.grad for n, p in wrapped.named_parameters() if "lora_A" in n]  # B is zero: A's grads are 0 too
    assert grads and all(g is not None for g in grads)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in wrapped.named_parameters() if "lora_B" in n)


def test_a_checkpoint_of_another_adapter_is_refused():
    four = lora.wrap(load_embedded("policy")[0], LoRA(r=4, alpha=8))
    eight = lora.wrap(load_embedded("policy")[0], LoRA(r=8, alpha=8))
    qv = lora.wrap(load_embedded("policy")[0], LoRA(r=4, alpha=8, target_modules=("q_proj", "v_proj")))
    state = lora.trainable_state(four)
    for other in (eight, qv):
        with pytest.raises(ValueError, match="another adapter than this run trains"):
            lora.load_trainable(other, state, "step-000001/policy.safetensors")
    again = lora.wrap(load_embedded("policy")[0], LoRA(r=4, alpha=8))
    lora.load_trainable(again, {k: v + 1 for k, v in state.items()}, "here")
    assert all(torch.equal(v + 1, lora.trainable_state(again)[k]) for k, v in state.items())


def test_a_lora_step_builds_every_tensor_on_the_models_device():
    """On `meta` (standing in for a GPU): peft puts the adapter beside the layer it wraps, and the
    reference's and the policy's log-probs, the loss and its backward stay there."""
    from assay.trainer import grpo
    from assay.trainer.config import GRPOConfig
    from tests.trainer.test_models import TinyLM, rollouts

    _, tok = load_embedded("policy")
    wrapped = lora.wrap(TinyLM(len(tok)).to("meta"), LoRA(r=2, alpha=4, target_modules=("head",)))
    assert {p.device.type for p in lora.trainable(wrapped)} == {"meta"}
    groups = rollouts(tok)
    batch = pack([r for g in groups for r in g], tok.pad_token_id, "meta")
    config = GRPOConfig(lora=LoRA(r=2, alpha=4))
    adv, valid = grpo.advantages(groups, [1.0, 0.0, None, 1.0, 0.0, 0.0, 1.0, 1.0], config.scale, "meta")
    with torch.no_grad():
        ref_logp, _ = token_logprobs(lora.Reference(wrapped), batch)
    loss, *_ = grpo.loss_terms(wrapped, batch, None, ref_logp, adv, batch.completion_mask * valid[:, None], config)
    assert loss.device.type == "meta"
    loss.backward()
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in lora.trainable(wrapped))
