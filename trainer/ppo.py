"""Online PPO with the four models of the RLHF recipe (Ouyang et al. 2022, InstructGPT):

- actor: the policy being trained, initialised from the SFT policy; the policy server samples
  from its latest weights;
- reference: a frozen copy of the SFT policy (with LoRA, the actor with its adapter disabled);
- critic: a value model initialised from the outcome reward model (its backbone and its scalar
  head, read at every position: V(s_t) = head(h_t)); with LoRA, its backbone carries an adapter too;
- reward: rm_server, remote, by reward id (or the same reward in-process).

Per step: B prompts -> n samples each -> sequence rewards -> per-token rewards with the KL
penalty folded in -> GAE -> `epochs` passes of the clipped surrogate + value loss (+ ptx) ->
actor weights pushed to the policy server.

    r_t   = -beta * (log pi_old(o_t) - log pi_ref(o_t))  + [t = last] * R        (per-token KL penalty)
    A_t   = GAE(r, V; gamma, lambda), whitened over the batch;   returns_t = A_t + V_t
    L_pi  = -mean_t min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t),   rho_t = pi / pi_old
    L_V   = 0.5 * mean_t max((V_t - ret_t)^2, (clip(V_t, V_old_t +- eps_v) - ret_t)^2)
    L_ptx = -mean log pi(solution | problem) on SFT data (PPO-ptx)
    loss  = L_pi + c1 * L_V + gamma_ptx * L_ptx

The ptx data are the arithmetic world's worked solutions on the world's prompts; on a user's
prompts (`prompts` other than `ArithPrompts`) they must be the user's demonstrations (`ptx_data`,
`assay train ppo --ptx-data FILE`), or `gamma_ptx` 0: never arithmetic mixed silently into a
user's run.

Actor, reference and critic train on `config.hardware` (`trainer.models`: the device, autocast over
float32 weights, gradient checkpointing). `rollout_terms`, `loss_terms` and `optimize` hold a step's
math apart from the services, so that the tests run them on any device (`meta` included).
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from assay.arith import world
from assay.clients.policy import PolicyClient
from assay.trainer import lora, online
from assay.trainer.config import PPOConfig
from assay.trainer.evaluation import ArithEval
from assay.trainer.models import Precision, device_of, out_of_memory, prepare, reference
from assay.trainer.online import (
    Batch,
    Evaluation,
    OnStep,
    RewardFn,
    Run,
    pack,
    push_weights,
    server_gap,
    timed,
    token_logprobs,
)
from assay.trainer.prompts import ArithPrompts, PromptSource
from assay.trainer.rl_math import entropy_from_logits, gae, kl_estimate, masked_mean, masked_whiten
from assay.trainer.rundir import RunDir
from assay.trainer.sft import collate, encode_example


class Critic(torch.nn.Module):
    """V(s_t) at every position: a sequence-classification model's backbone and scalar head,
    applied per token instead of pooled at the last one."""

    def __init__(self, reward_model) -> None:
        super().__init__()
        if reward_model.config.num_labels != 1:
            raise ValueError(f"the critic needs a 1-label reward model, got {reward_model.config.num_labels} labels")
        self.backbone, self.head = reward_model.model, reward_model.score

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return self.head(hidden)[..., 0].float()  # [rows, length]


def initial_critic(model_path: str | Path | None, critic_path: str | Path | None, tokenizer):
    """The critic's start: `critic_path` (a 1-label sequence classifier on the policy's tokenizer);
    else the embedded ORM for the embedded policy (`model_path` None); else the policy checkpoint
    itself with a new value head, since the embedded ORM reads another tokenizer than a user's policy.
    Float32 on the CPU: `train` prepares it (`trainer.models.prepare`)."""
    from transformers import AutoModelForSequenceClassification

    from assay.checkpoints import EMBEDDED, load_model

    if critic_path is not None or model_path is None:
        path = critic_path if critic_path is not None else EMBEDDED["orm"][1]
        return load_model(path, "sequence_classification")[0]
    critic = AutoModelForSequenceClassification.from_pretrained(str(model_path), num_labels=1)
    critic.config.pad_token_id = tokenizer.pad_token_id  # each row's last real token is found through it
    return critic


def train(
    config: PPOConfig,
    model,
    tokenizer,
    reward_model,
    policy: PolicyClient,
    reward_fn: RewardFn,
    run_dir: RunDir,
    *,
    resume: bool = False,
    on_step: OnStep | None = None,
    prompts: PromptSource | None = None,
    evaluation: Evaluation | None = None,
    ptx_data: Sequence[tuple[str, str]] | None = None,
) -> list[dict[str, Any]]:
    """`model`: the SFT policy (becomes the actor); `reward_model`: the ORM the critic starts from
    (or any 1-label sequence classifier on the policy's tokenizer); `ptx_data`: (prompt, completion)
    demonstrations for the ptx term, as the policy reads them (default: the world's solutions).
    `model` trains in place on `config.hardware`; the critic is a prepared copy of `reward_model`."""
    if config.gamma_ptx > 0 and ptx_data is None and not (prompts is None or isinstance(prompts, ArithPrompts)):
        raise ValueError(
            "gamma_ptx > 0 trains on demonstrations, and without ptx data those are the arithmetic world's: "
            "give your own (--ptx-data FILE) or set gamma_ptx to 0"
        )
    if ptx_data is not None and not ptx_data:
        raise ValueError("ptx_data holds no demonstrations")
    torch.manual_seed(config.seed)
    prompts = prompts if prompts is not None else ArithPrompts()
    evaluation = evaluation if evaluation is not None else ArithEval()
    model = prepare(model, config.hardware)
    critic = Critic(prepare(copy.deepcopy(reward_model), config.hardware))
    ref_model: torch.nn.Module
    if config.lora.r:  # adapters on the actor and the critic's backbone; the reference is the actor's base
        model = lora.wrap(model, config.lora)
        critic = lora.wrap_backbone(critic, config.lora)
        ref_model = lora.Reference(model)
    else:
        ref_model = reference(model)
    ctx = Run(config, model, tokenizer, policy, reward_fn, run_dir, prompts, evaluation)
    actor_opt = torch.optim.AdamW(lora.trainable(model), lr=config.lr, weight_decay=0.0)
    critic_opt = torch.optim.AdamW(lora.trainable(critic), lr=config.critic_lr, weight_decay=0.0)
    modules = {"policy": model, "critic": critic}
    if not config.lora.r:
        modules["reference"] = ref_model
    optimizers = {"policy": actor_opt, "critic": critic_opt}
    precision = Precision(config.hardware)

    def step_fn(step: int, version: int) -> dict[str, Any]:
        return _step(ctx, step, version, ref_model, critic, (actor_opt, critic_opt), precision, ptx_data)

    return online.run(ctx, "ppo", step_fn, modules, optimizers, resume=resume, on_step=on_step)


def _step(
    ctx: Run[PPOConfig],
    step: int,
    version: int,
    ref_model,
    critic: Critic,
    optimizers: tuple[torch.optim.Optimizer, torch.optim.Optimizer],
    precision: Precision,
    ptx_data: Sequence[tuple[str, str]] | None,
) -> dict[str, Any]:
    config, model, tokenizer = ctx.config, ctx.model, ctx.tokenizer
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    problems = ctx.prompts.draw(step, config.prompts_per_step, config.seed)
    seed = config.seed * 1_000_003 + step
    groups, scores, stale, version = online.rollout(
        ctx, problems, config.samples_per_prompt, seed=seed, version=version, seconds=t
    )
    # Samples whose reward failed are dropped whole: no reward, no return to learn from.
    pairs = [(r, s) for r, s in zip((r for g in groups for r in g), scores, strict=True) if s is not None]
    failed = len(scores) - len(pairs)
    if not pairs:
        return {
            "step": step,
            "samples": 0,
            "stale_dropped": stale,
            "reward_failed": failed,
            "weight_version": version,
            "seconds": time.perf_counter() - t0,
            **t,
        }
    rollouts = [r for r, _ in pairs]
    device = device_of(model)
    seq_rewards = torch.tensor([s for _, s in pairs], device=device)  # [N]

    where = (
        f"PPO step {step} (actor, reference and critic forwards, backward over {len(rollouts)} samples "
        f"of up to {config.max_tokens} tokens)"
    )
    lower = [
        f"--prompts-per-step ({config.prompts_per_step})",
        f"--samples-per-prompt ({config.samples_per_prompt})",
        f"--max-tokens ({config.max_tokens})",
    ]
    if config.gamma_ptx > 0:
        lower.append(f"--ptx-batch ({config.ptx_batch})")
    with timed(t, "train_s"), out_of_memory(where, lower, config.hardware):
        batch = pack(rollouts, tokenizer.pad_token_id, device)

        def ptx() -> torch.Tensor:
            return _ptx_loss(ctx, _ptx_examples(config, step, ptx_data))

        trained, old_logp = optimize(
            model,
            ref_model,
            critic,
            optimizers,
            precision,
            batch,
            seq_rewards,
            config,
            ptx if config.gamma_ptx > 0 else None,
        )
        gap = server_gap(rollouts, old_logp)
    with timed(t, "push_s"):
        version = push_weights(ctx.policy, model, version + 1, config.service_timeout_s)

    seconds = time.perf_counter() - t0
    tokens = int(batch.completion_mask.sum())
    return {
        "step": step,
        **trained,
        "reward_mean": seq_rewards.mean().item(),
        "reward_std": seq_rewards.std().item() if len(pairs) > 1 else None,
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


@torch.no_grad()
def rollout_terms(
    model, ref_model, critic: Critic, batch: Batch, seq_rewards: torch.Tensor, config: PPOConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the rollout fixes before the passes, each [N, L-1]: (log pi_old, log pi_ref, V_old,
    whitened GAE advantages, returns). `seq_rewards` [N]: the reward model's score of each sample."""
    mask = batch.completion_mask  # [N, L-1]: positions whose next token is a completion token
    old_logp = token_logprobs(model, batch)[0]
    ref_logp = token_logprobs(ref_model, batch)[0]
    old_values = critic(batch.input_ids, batch.attention_mask)[:, :-1] * mask  # V(s_t), s_t = tokens <= t
    # Per-token reward: the KL penalty everywhere, the reward model's score on the last token.
    rewards = -config.beta * (old_logp - ref_logp) * mask
    last = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & mask.bool()  # [N, L-1]
    rewards = rewards + last.float() * seq_rewards[:, None]
    adv, returns = gae(rewards, old_values, mask, config.gamma, config.lam)
    return old_logp, ref_logp, old_values, masked_whiten(adv, mask), returns


def loss_terms(
    model,
    critic: Critic,
    batch: Batch,
    old_logp: torch.Tensor,
    old_values: torch.Tensor,
    adv: torch.Tensor,
    returns: torch.Tensor,
    config: PPOConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass: (clipped surrogate L_pi, clipped value loss L_V, ratio [N, L-1], logits) (module docstring)."""
    mask = batch.completion_mask
    logp, logits = token_logprobs(model, batch)
    ratio = (logp - old_logp).exp()
    policy_loss = -masked_mean(torch.min(ratio * adv, ratio.clamp(1 - config.eps, 1 + config.eps) * adv), mask)
    values = critic(batch.input_ids, batch.attention_mask)[:, :-1]
    clipped_v = old_values + (values - old_values).clamp(-config.eps_value, config.eps_value)
    value_loss = 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped_v - returns) ** 2), mask)
    return policy_loss, value_loss, ratio, logits


def optimize(
    model,
    ref_model,
    critic: Critic,
    optimizers: tuple[torch.optim.Optimizer, torch.optim.Optimizer],
    precision: Precision,
    batch: Batch,
    seq_rewards: torch.Tensor,
    config: PPOConfig,
    ptx: Callable[[], torch.Tensor] | None = None,
) -> tuple[dict[str, Any], torch.Tensor]:
    """`config.epochs` passes of L_pi + c1 L_V (+ gamma_ptx `ptx()`) over one batch, actor and critic
    stepped together; (the metrics, log pi_old [N, L-1]). Forwards under autocast."""
    actor_opt, critic_opt = optimizers
    mask = batch.completion_mask
    with precision.autocast():
        old_logp, ref_logp, old_values, adv, returns = rollout_terms(
            model, ref_model, critic, batch, seq_rewards, config
        )
    for _ in range(config.epochs):
        with precision.autocast():
            policy_loss, value_loss, ratio, logits = loss_terms(
                model, critic, batch, old_logp, old_values, adv, returns, config
            )
            ptx_loss = ptx() if ptx is not None else torch.zeros((), device=policy_loss.device)
            loss = policy_loss + config.c1 * value_loss + config.gamma_ptx * ptx_loss
        grad_norm, _ = precision.step(loss, (actor_opt, config.grad_clip), (critic_opt, config.grad_clip))
    with torch.no_grad():
        clip_frac = masked_mean(((ratio - 1).abs() > config.eps).float(), mask)
        entropy = masked_mean(entropy_from_logits(logits), mask)
        kl = masked_mean(kl_estimate(old_logp, ref_logp, "k3"), mask)
    metrics = {
        "loss": loss.item(),
        "policy_loss": policy_loss.item(),
        "value_loss": value_loss.item(),
        "ptx_loss": ptx_loss.item(),
        "kl": kl.item(),
        "entropy": entropy.item(),
        "clip_frac": clip_frac.item(),
        "grad_norm": grad_norm,
    }
    return metrics, old_logp


def _ptx_examples(config: PPOConfig, step: int, data: Sequence[tuple[str, str]] | None) -> list[tuple[str, str]]:
    """The step's `ptx_batch` (prompt, completion) demonstrations, a pure function of (seed, step):
    from `data`, or worked solutions to the world's training problems."""
    rng = random.Random(config.seed * 7_919 + step)
    if data is None:
        return [(p.prompt, p.solution) for p in world.take("train", config.ptx_batch, seed=rng.randrange(2**31))]
    return [data[rng.randrange(len(data))] for _ in range(config.ptx_batch)]


def _ptx_loss(ctx: Run[PPOConfig], examples: Sequence[tuple[str, str]]) -> torch.Tensor:
    """Mean next-token NLL of the demonstrations' completions: the SFT data's own objective."""
    tokenizer = ctx.tokenizer
    ids, attn, labels = collate([encode_example(tokenizer, p, c) for p, c in examples], tokenizer.pad_token_id)
    device = device_of(ctx.model)
    return ctx.model(
        input_ids=ids.to(device), attention_mask=attn.to(device), labels=labels.to(device), use_cache=False
    ).loss
