"""The trainer on a device in mixed precision (`trainer.models`), without the services.

GRPO's and PPO's step math (`grpo.optimize`, `ppo.optimize` and the terms they are made of) runs on
rollouts built here from the arithmetic world: in bfloat16 and float16 autocast on the CPU, with and
without gradient checkpointing, and on the `meta` device, where any tensor the step builds on the CPU
meets the model's and raises. There is no GPU here: `meta` stands in for one. transformers' own models
read their attention masks' values (`mask.all()`), which a meta tensor has not, so the meta tests use
two-layer stand-ins with a causal LM's and a classifier backbone's call signatures (test doubles for
transformers' models, not for our code).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from assay.arith import world
from assay.checkpoints import load_embedded
from assay.trainer import grpo, ppo
from assay.trainer.config import GRPOConfig, Hardware, PPOConfig
from assay.trainer.models import (
    OutOfMemory,
    Precision,
    out_of_memory,
    prepare,
    reference,
    sizes,
)
from assay.trainer.online import Rollout, pack, token_logprobs
from assay.trainer.prompts import from_problem

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_torch_thread")]  # tests/conftest.py

BF16 = Hardware(dtype="bfloat16")


def rollouts(tokenizer, groups: int = 2, size: int = 4) -> list[list[Rollout]]:
    """`groups` x `size` completions: each problem's worked solution, some with a slipped digit."""
    out = []
    for g, problem in enumerate(world.take("train", groups, seed=3)):
        prompt_ids = tokenizer(problem.prompt)["input_ids"]
        group = []
        for j in range(size):
            text = problem.solution if j % 2 == 0 else problem.solution.replace("=", "=1", 1)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            group.append(Rollout(from_problem(problem), prompt_ids, ids, text, [], weight_version=g))
        out.append(group)
    return out


def float32_throughout(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> bool:
    """The master weights and AdamW's moments stay float32 whatever the compute dtype."""
    moments = [t for state in optimizer.state.values() for k, t in state.items() if k != "step"]
    return bool(moments) and all(t.dtype == torch.float32 for t in [*model.parameters(), *moments])


@pytest.fixture(scope="module")
def policy():
    return load_embedded("policy")


def grpo_step(model, tokenizer, config: GRPOConfig):
    """One GRPO `optimize` on the rollouts: (metrics, optimizer)."""
    groups = rollouts(tokenizer)
    flat = [r for g in groups for r in g]
    scores = [1.0 if "=1" not in r.text else 0.0 for r in flat]
    adv, valid = grpo.advantages(groups, scores, config.scale, "cpu")
    batch = pack(flat, tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    ref = reference(model)
    metrics, _ = grpo.optimize(model, ref, optimizer, Precision(config.hardware), batch, adv, valid, config)
    return metrics, optimizer


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_grpo_step_in_mixed_precision_trains_float32_weights(policy, dtype):
    model, tok = policy
    model = prepare(reference(model).requires_grad_(True), Hardware(dtype=dtype))
    before = [p.detach().clone() for p in model.parameters()]
    config = GRPOConfig(mu=3, lr=1e-3, hardware=Hardware(dtype=dtype))
    metrics, optimizer = grpo_step(model, tok, config)
    assert torch.isfinite(torch.tensor([metrics["loss"], metrics["loss_last_pass"], metrics["kl"]])).all()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert float32_throughout(model, optimizer)
    if dtype == "float16":  # a loss scale: the first step may overflow and be skipped, the rest trained
        assert metrics["loss_last_pass"] != metrics["loss"]


def test_the_reference_starts_at_the_policys_logprobs_under_autocast(policy):
    """A float32 reference under the same autocast computes exactly the policy's log-probs: KL 0 at the start."""
    model, tok = policy
    model = prepare(reference(model).requires_grad_(True), BF16)
    batch = pack([r for g in rollouts(tok) for r in g], tok.pad_token_id)
    with torch.no_grad(), Precision(BF16).autocast():
        mine, _ = token_logprobs(model, batch)
        ref, _ = token_logprobs(reference(model), batch)
    assert mine.dtype == torch.float32 and torch.equal(mine, ref)


def test_a_ppo_step_in_bfloat16_trains_actor_and_critic_in_float32(policy):
    model, tok = policy
    model = prepare(reference(model).requires_grad_(True), BF16)
    critic = ppo.Critic(prepare(reference(load_embedded("orm")[0]).requires_grad_(True), BF16))
    before = [p.detach().clone() for p in [*model.parameters(), *critic.parameters()]]
    config = PPOConfig(epochs=2, hardware=BF16)
    flat = [r for g in rollouts(tok) for r in g]
    seq_rewards = torch.tensor([1.0 if "=1" not in r.text else 0.0 for r in flat])
    optimizers = (torch.optim.AdamW(model.parameters(), lr=1e-3), torch.optim.AdamW(critic.parameters(), lr=1e-3))
    batch = pack(flat, tok.pad_token_id)
    metrics, _ = ppo.optimize(model, reference(model), critic, optimizers, Precision(BF16), batch, seq_rewards, config)
    assert all(torch.isfinite(torch.tensor(metrics[k])) for k in ("loss", "policy_loss", "value_loss", "kl"))
    after = [*model.parameters(), *critic.parameters()]
    assert sum(not torch.equal(b, p) for b, p in zip(before, after)) > len(before) // 2  # actor and critic moved
    assert float32_throughout(model, optimizers[0]) and float32_throughout(critic, optimizers[1])


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(policy):
    model, tok = policy
    batch = pack([r for g in rollouts(tok) for r in g], tok.pad_token_id)
    config = GRPOConfig()
    adv = torch.linspace(-1, 1, batch.input_ids.shape[0])
    results = []
    for checkpointing in (False, True):
        net = prepare(reference(model).requires_grad_(True), Hardware(gradient_checkpointing=checkpointing))
        assert net.is_gradient_checkpointing == checkpointing
        loss, *_ = grpo.loss_terms(net, batch, None, None, adv, batch.completion_mask, config)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in net.parameters()]))
    (loss_off, grads_off), (loss_on, grads_on) = results
    assert torch.allclose(loss_off, loss_on, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads_off, grads_on))


# --- device cleanliness: every tensor of a step on the model's device ------------------------------


class TinyLM(torch.nn.Module):
    """A causal LM's call (`input_ids`, `attention_mask`, `labels` -> `.logits`, `.loss`) in two layers."""

    def __init__(self, vocab: int, width: int = 8) -> None:
        super().__init__()
        self.embed, self.head = torch.nn.Embedding(vocab, width), torch.nn.Linear(width, vocab)

    def forward(self, input_ids, attention_mask=None, use_cache=None, labels=None):
        hidden = self.embed(input_ids)
        if attention_mask is not None:  # used, so a mask on another device raises
            hidden = hidden * attention_mask[..., None]
        return SimpleNamespace(logits=self.head(hidden), last_hidden_state=hidden)


def critic_double(vocab: int, width: int = 8):
    """What `ppo.Critic` reads of a sequence classifier: one label, a backbone and a scalar head."""
    return SimpleNamespace(
        config=SimpleNamespace(num_labels=1), model=TinyLM(vocab, width), score=torch.nn.Linear(width, 1)
    )


def test_a_grpo_and_a_ppo_step_build_every_tensor_on_the_models_device(policy):
    _, tok = policy
    vocab = len(tok)
    model = TinyLM(vocab).to("meta")
    critic = ppo.Critic(critic_double(vocab)).to("meta")
    groups = rollouts(tok)
    flat = [r for g in groups for r in g]
    batch = pack(flat, tok.pad_token_id, "meta")
    assert {t.device.type for t in (batch.input_ids, batch.attention_mask, batch.completion_mask)} == {"meta"}

    # GRPO: advantages, the reference's and the policy's log-probs, the loss, its backward
    config = GRPOConfig()
    adv, valid = grpo.advantages(groups, [1.0, 0.0, None, 1.0, 0.0, 0.0, 1.0, 1.0], config.scale, "meta")
    ref_logp, _ = token_logprobs(model, batch)
    loss, *_ = grpo.loss_terms(
        model, batch, None, ref_logp.detach(), adv, batch.completion_mask * valid[:, None], config
    )
    assert loss.device.type == "meta"
    loss.backward()
    assert model.head.weight.grad is not None and model.head.weight.grad.device.type == "meta"

    # PPO: the rollout's log-probs, values, KL-shaped rewards, GAE; the pass's losses and backward
    seq_rewards = torch.zeros(len(flat), device="meta")
    old_logp, _, old_values, ppo_adv, returns = ppo.rollout_terms(model, model, critic, batch, seq_rewards, PPOConfig())
    policy_loss, value_loss, _, _ = ppo.loss_terms(
        model, critic, batch, old_logp, old_values, ppo_adv, returns, PPOConfig()
    )
    (policy_loss + value_loss).backward()
    assert critic.head.weight.grad is not None and critic.head.weight.grad.device.type == "meta"


def test_a_batch_left_on_the_cpu_is_caught_on_meta(policy):
    """The check above can fail: a CPU batch meeting a meta model raises."""
    _, tok = policy
    model = TinyLM(len(tok)).to("meta")
    batch = pack([r for g in rollouts(tok) for r in g], tok.pad_token_id)  # the CPU, the default
    with pytest.raises((RuntimeError, NotImplementedError), match=r"device|meta"):
        token_logprobs(model, batch)


# --- sizes, out of memory --------------------------------------------------------------------


def test_sizes_count_weights_once_and_adamw_state_for_what_trains(policy):
    model, _ = policy
    model = prepare(reference(model).requires_grad_(True), BF16)
    ref = reference(model)
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    trainable = sum(p.numel() * 4 for p in model.parameters())
    lines = sizes({"policy": model, "reference": ref}, BF16)
    assert lines[0].startswith("policy: 1.08M parameters") and "float32 on cpu" in lines[0]
    assert lines[2].startswith("policy: gradients")
    total = 2 * weights + 3 * trainable  # policy and reference weights, gradients, two AdamW moments
    assert f"total {total / 2**20:.1f} MiB on cpu" in lines[-1] and "bfloat16 autocast" in lines[-1]


def test_out_of_memory_in_a_step_says_where_and_what_to_lower():
    """torch.OutOfMemoryError raised by hand: the error a CUDA allocation failure raises (no GPU here)."""
    where, lower = "GRPO step 7 (forward and backward)", ["--group-size (8)"]
    with pytest.raises(OutOfMemory) as caught, out_of_memory(where, lower, Hardware(device="cuda")):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    message = str(caught.value)
    assert message.startswith("out of memory on cuda in GRPO step 7 (forward and backward) (CUDA out of memory.")
    for advice in ("--group-size (8)", "--gradient-checkpointing", "--lora-r", "--dtype bfloat16", "--resume"):
        assert advice in message
    with pytest.raises(RuntimeError, match="unrelated"), out_of_memory("x", [], Hardware()):
        raise RuntimeError("unrelated")  # other errors pass through untouched
