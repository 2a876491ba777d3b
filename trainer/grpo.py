"""Online GRPO against the live services (Shao et al. 2024, DeepSeekMath).

Each step: B training prompts -> G completions each from the policy server (tagged with the
weight version that made them) -> one reward per completion from `reward_fn` (rm_server by reward
id, or the same reward in-process) -> group-relative advantages -> `mu` optimisation passes of the
clipped policy-ratio loss with a k3 KL penalty to the frozen reference -> the new weights pushed
to the policy server, whose next version the next rollout must carry.

    loss = -1/|o| sum_t [ min(r_t A, clip(r_t, 1 - eps_low, 1 + eps_high) A) - beta * KL_t ]
    r_t  = pi(o_t | q, o_<t) / pi_old(o_t | q, o_<t)          A = (R - mean_group R) / std_group R
    KL_t = pi_ref/pi - log(pi_ref/pi) - 1                      (k3: unbiased, >= 0)

Variants (`GRPOConfig`): `scale="none"` drops the std normalisation and `loss_norm="constant"`
divides by a constant instead of each sequence's length (Dr. GRPO); `loss_norm="token_mean"`
averages over all tokens of the batch (DAPO); `eps_high > eps_low` is DAPO's clip-higher.

The policy and its frozen reference train on `config.hardware` (`trainer.models`: the device, autocast
in bfloat16 or float16 over float32 weights, gradient checkpointing). A step's tensors are built on the
model's device; `advantages`, `loss_terms` and `optimize` hold the math, apart from the services, so that
the tests run them on any device (on `meta`, where a tensor left on the CPU raises).

With `lora.r > 0` (`--lora-r`) the policy trains a LoRA adapter (`trainer.lora`): the reference is
the policy with its adapter disabled, and each push sends the adapter alone.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from assay.clients.policy import PolicyClient
from assay.trainer import lora, online
from assay.trainer.config import GRPOConfig
from assay.trainer.evaluation import ArithEval
from assay.trainer.models import Precision, device_of, out_of_memory, prepare, reference
from assay.trainer.online import (
    Batch,
    Evaluation,
    OnStep,
    RewardFn,
    Rollout,
    Run,
    pack,
    push_weights,
    server_gap,
    timed,
    token_logprobs,
)
from assay.trainer.prompts import ArithPrompts, PromptSource
from assay.trainer.rl_math import entropy_from_logits, group_advantages, kl_estimate, masked_mean, token_loss
from assay.trainer.rundir import RunDir


def train(
    config: GRPOConfig,
    model,
    tokenizer,
    policy: PolicyClient,
    reward_fn: RewardFn,
    run_dir: RunDir,
    *,
    resume: bool = False,
    on_step: OnStep | None = None,
    prompts: PromptSource | None = None,
    evaluation: Evaluation | None = None,
) -> list[dict[str, Any]]:
    """Run `config.steps` steps (the remaining ones, when resuming); every step's metrics.
    `model` is trained in place, on `config.hardware.device` (`trainer.models.prepare`)."""
    torch.manual_seed(config.seed)
    prompts = prompts if prompts is not None else ArithPrompts()
    evaluation = evaluation if evaluation is not None else ArithEval()
    model = prepare(model, config.hardware)
    ref_model: torch.nn.Module | None = None
    if config.lora.r:  # the reference is then the policy with its adapter off: no copy to hold or save
        model = lora.wrap(model, config.lora)
        ref_model = lora.Reference(model) if config.beta > 0 else None
    elif config.beta > 0:
        ref_model = reference(model)
    ctx = Run(config, model, tokenizer, policy, reward_fn, run_dir, prompts, evaluation)
    optimizer = torch.optim.AdamW(lora.trainable(model), lr=config.lr, weight_decay=0.0)
    modules = {"policy": model, **({"reference": ref_model} if ref_model is not None and not config.lora.r else {})}
    precision = Precision(config.hardware)

    def step_fn(step: int, version: int) -> dict[str, Any]:
        return _step(ctx, step, version, ref_model, optimizer, precision)

    return online.run(ctx, "grpo", step_fn, modules, {"policy": optimizer}, resume=resume, on_step=on_step)


def _step(ctx: Run[GRPOConfig], step: int, version: int, ref_model, optimizer, precision: Precision) -> dict[str, Any]:
    config, model = ctx.config, ctx.model
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    problems = ctx.prompts.draw(step, config.prompts_per_step, config.seed)
    seed = config.seed * 1_000_003 + step
    groups, scores, stale, version = online.rollout(
        ctx, problems, config.group_size, seed=seed, version=version, seconds=t
    )
    rollouts = [r for g in groups for r in g]
    if not rollouts:  # every sample was stale: nothing to learn from, nothing mixed in
        return {
            "step": step,
            "samples": 0,
            "stale_dropped": stale,
            "weight_version": version,
            "seconds": time.perf_counter() - t0,
            **t,
        }
    failed = sum(s is None for s in scores)
    device = device_of(model)
    flat_adv, flat_valid = advantages(groups, scores, config.scale, device)

    where = f"GRPO step {step} (forward and backward over {len(rollouts)} samples of up to {config.max_tokens} tokens)"
    lower = [
        f"--prompts-per-step ({config.prompts_per_step})",
        f"--group-size ({config.group_size})",
        f"--max-tokens ({config.max_tokens})",
    ]
    with timed(t, "train_s"), out_of_memory(where, lower, config.hardware):
        batch = pack(rollouts, ctx.tokenizer.pad_token_id, device)
        trained, old_logp = optimize(model, ref_model, optimizer, precision, batch, flat_adv, flat_valid, config)
        gap = server_gap(rollouts, old_logp)
    with timed(t, "push_s"):
        version = push_weights(ctx.policy, model, version + 1, config.service_timeout_s)

    seconds = time.perf_counter() - t0
    good = [s for s in scores if s is not None]
    tokens = int(batch.completion_mask.sum())
    return {
        "step": step,
        **trained,
        "reward_mean": sum(good) / len(good) if good else None,
        "reward_std": float(torch.tensor(good).std()) if len(good) > 1 else None,
        "reward_failed": failed,
        "stale_dropped": stale,
        "samples": len(rollouts),
        "server_logprob_gap": gap,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "samples_per_s": len(rollouts) / seconds,
        "weight_version": version,
        "seconds": seconds,
        **t,
    }


def advantages(
    groups: list[list[Rollout]], scores: list[float | None], scale: str, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-relative advantages over the samples that have a reward, the rest masked out:
    ([N] advantages, [N] 1.0 where the sample's reward counts), on `device`, in rollout order."""
    width = max(len(g) for g in groups)
    rewards = torch.full((len(groups), width), float("nan"))  # [B, G]
    it = iter(scores)
    for i, g in enumerate(groups):
        for j in range(len(g)):
            v = next(it)
            rewards[i, j] = float("nan") if v is None else v
    rewards = rewards.to(device)
    valid = ~rewards.isnan()
    adv = group_advantages(rewards, valid, scale=scale)  # [B, G]
    flat_adv = torch.cat([adv[i, : len(g)] for i, g in enumerate(groups)])  # [N]
    flat_valid = torch.cat([valid[i, : len(g)] for i, g in enumerate(groups)]).float()  # [N]
    return flat_adv, flat_valid


def loss_terms(
    model,
    batch: Batch,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    adv: torch.Tensor,
    mask: torch.Tensor,
    config: GRPOConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass: (loss, logp, logits, ratio, kl) of the clipped objective with the k3 KL (module
    docstring). `old_logp` None: pi_old is this forward's own weights (detached), as with mu = 1."""
    logp, logits = token_logprobs(model, batch)  # [N, L-1], float32
    old = logp.detach() if old_logp is None else old_logp
    ratio = (logp - old).exp()  # [N, L-1]
    a = adv[:, None]
    surrogate = torch.min(ratio * a, ratio.clamp(1 - config.eps_low, 1 + config.eps_high) * a)
    kl = kl_estimate(logp, ref_logp, "k3") if ref_logp is not None else torch.zeros_like(logp)
    per_token = -(surrogate - config.beta * kl)
    loss = token_loss(per_token, mask, kind=config.loss_norm, max_tokens=config.max_tokens)
    return loss, logp, logits, ratio, kl


def optimize(
    model,
    ref_model,
    optimizer: torch.optim.Optimizer,
    precision: Precision,
    batch: Batch,
    adv: torch.Tensor,
    valid: torch.Tensor,
    config: GRPOConfig,
) -> tuple[dict[str, Any], torch.Tensor]:
    """`config.mu` passes over one batch ([N] advantages, [N] valid); (the passes' metrics, pi_old's
    logprobs [N, L-1]). Forwards and losses under autocast, updates on the float32 weights."""
    mask = batch.completion_mask * valid[:, None]  # [N, L-1]
    with torch.no_grad(), precision.autocast():
        ref_logp = token_logprobs(ref_model, batch)[0] if ref_model is not None else None
        # pi_old: the weights that sampled (version `version`). With one pass they are the
        # weights of that pass's forward, whose detached logprobs serve: no extra forward.
        old_logp = token_logprobs(model, batch)[0] if config.mu > 1 else None
    losses = []
    for _ in range(config.mu):
        with precision.autocast():
            loss, logp, logits, ratio, kl = loss_terms(model, batch, old_logp, ref_logp, adv, mask, config)
        if old_logp is None:
            old_logp = logp.detach()
        (grad_norm,) = precision.step(loss, (optimizer, config.grad_clip))
        losses.append(loss.item())
    assert old_logp is not None  # set by the first of config.mu (>= 1) passes
    with torch.no_grad():
        clipped = ((ratio < 1 - config.eps_low) | (ratio > 1 + config.eps_high)).float()
        entropy = masked_mean(entropy_from_logits(logits), mask)
    metrics = {
        "loss": losses[0],
        "loss_last_pass": losses[-1],
        "kl": masked_mean(kl.detach(), mask).item(),
        "entropy": entropy.item(),
        "clip_frac": masked_mean(clipped, mask).item(),
        "grad_norm": grad_norm,
    }
    return metrics, old_logp
