"""Shared pure math for the RL trainers (GRPO, PPO): masked reductions, advantages, KL, GAE.

Every function is a plain torch expression over tensors the trainers already hold, so each can
be unit-tested against numbers worked by hand. Masks may be bool or float (1 = real token); a
masked-out entry never reaches a result, even when it holds NaN or padding garbage.
"""

from __future__ import annotations

import torch
from torch import Tensor

# --- masked reductions ----------------------------------------------------------------------


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of x where mask is set; masked entries are replaced by 0 first so NaNs cannot leak."""
    kept = torch.where(mask.bool(), x, torch.zeros_like(x))
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of x over the masked entries; an empty mask (or an empty row, for dim) gives 0.

    0 rather than NaN because an all-padding row (e.g. an empty completion) must add nothing to
    a loss instead of poisoning the whole batch.
    """
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1).to(x.dtype)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Scalar variance over the masked entries; with Bessel's correction when unbiased.

    Fewer than two entries give 0 (the unbiased estimate is undefined there), so callers can
    divide by sqrt(var + eps) without special cases.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.bool().sum().to(x.dtype)
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries (unbiased var); masked-out give 0.

    Follows TRL's `masked_whiten`: with shift_mean=False the mean is added back, so only the scale
    changes (used for PPO rewards, whose sign carries meaning).
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.bool(), out, torch.zeros_like(out))


# --- advantages and losses ------------------------------------------------------------------


def group_advantages(rewards: Tensor, valid: Tensor, *, scale: str = "std", eps: float = 1e-4) -> Tensor:
    """GRPO group-relative advantages (Shao et al. 2024, DeepSeekMath, eq. in sec. 4.1.2).

    A_i = (r_i - mean(r_group)) / (std + eps), with mean and std over the group's valid members
    only; invalid members (failed rewards, may be NaN) get 0 and never enter any statistic.
    std is the unbiased sample std (torch.std), eps=1e-4 added to it, as in TRL's GRPOTrainer.

    scale: "std"   divide by the group std (original GRPO);
           "none"  no division (Dr. GRPO, Liu et al. 2025, "Understanding R1-Zero-Like Training");
           "batch" divide by the std of all valid rewards in the batch, centring still per group
                   (REINFORCE++ / TRL scale_rewards="batch").
    A group with a single valid member has nothing to compare against, so it gets 0.

    rewards [groups, G] float, valid [groups, G] bool -> [groups, G]
    """
    if scale not in ("std", "none", "batch"):
        raise ValueError(f"unknown scale {scale!r}; use 'std', 'none' or 'batch'")
    valid = valid.bool()
    r = torch.where(valid, rewards, torch.zeros_like(rewards))
    n = valid.sum(dim=1, keepdim=True)  # [groups, G] -> [groups, 1]
    mean = r.sum(dim=1, keepdim=True) / n.clamp(min=1)
    dev = torch.where(valid, r - mean, torch.zeros_like(r))  # [groups, G]
    if scale == "none":
        return dev
    if scale == "std":
        std = (dev.pow(2).sum(dim=1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()  # [groups, 1]
    else:
        std = masked_var(rewards, valid, unbiased=True).sqrt()  # scalar
    return dev / (std + eps)


def token_loss(
    per_token: Tensor, mask: Tensor, *, kind: str = "sequence_mean", max_tokens: int | None = None
) -> Tensor:
    """Reduce a per-token loss to a scalar; the variants differ in how length weights tokens.

    "sequence_mean": mean over each sequence's tokens, then over sequences (original GRPO);
                     long answers' tokens count less. An empty sequence contributes 0 (as TRL).
    "token_mean":    sum over all tokens / number of tokens (DAPO, Yu et al. 2025): every token
                     weighs the same.
    "constant":      sum over all tokens / (batch * max_tokens) (Dr. GRPO, Liu et al. 2025): no
                     length-dependent normaliser at all; max_tokens defaults to the seq size.

    per_token [batch, seq], mask [batch, seq] -> scalar
    """
    if kind == "sequence_mean":
        return masked_mean(per_token, mask, dim=1).mean()  # [batch, seq] -> [batch] -> scalar
    if kind == "token_mean":
        return masked_mean(per_token, mask)
    if kind == "constant":
        width = per_token.size(1) if max_tokens is None else max_tokens
        return masked_sum(per_token, mask) / (per_token.size(0) * width)
    raise ValueError(f"unknown kind {kind!r}; use 'sequence_mean', 'token_mean' or 'constant'")


def kl_estimate(logp: Tensor, ref_logp: Tensor, kind: str = "k3") -> Tensor:
    """Per-token estimators of KL(pi || pi_ref) from tokens sampled from pi (Schulman 2020,
    "Approximating KL Divergence"). With log-ratio lr = ref_logp - logp:

    k1 = -lr             unbiased, high variance, can be negative;
    k2 = lr**2 / 2       biased, low variance, >= 0;
    k3 = exp(lr) - lr - 1  unbiased, low variance, >= 0 (the GRPO penalty; expm1 for precision).

    logp, ref_logp [...] -> [...]
    """
    lr = ref_logp - logp
    if kind == "k1":
        return -lr
    if kind == "k2":
        return 0.5 * lr**2
    if kind == "k3":
        return torch.expm1(lr) - lr
    raise ValueError(f"unknown kind {kind!r}; use 'k1', 'k2' or 'k3'")


@torch.no_grad()
def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016), for right-padded responses.

    delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = delta_t + gamma * lam * A_{t+1},
    returns_t = A_t + V_t. Past a sequence's last real token both V and A are 0 (the episode
    ends there), so padding never bootstraps. Masked positions come back as 0. Computed without
    grad: PPO uses advantages and returns as fixed targets.

    rewards, values, mask [batch, seq] -> (advantages [batch, seq], returns [batch, seq])
    """
    m = mask.bool()
    zeros = torch.zeros_like(values)
    rewards = torch.where(m, rewards, zeros)
    values = torch.where(m, values, zeros)  # V = 0 on padding and past the end
    advantages = torch.zeros_like(values)
    next_value = next_adv = zeros[:, 0]  # [batch]
    for t in reversed(range(values.size(1))):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = torch.where(m[:, t], delta + gamma * lam * next_adv, zeros[:, 0])
        advantages[:, t] = adv_t
        next_value, next_adv = values[:, t], adv_t
    returns = torch.where(m, advantages + values, zeros)
    return advantages, returns


# --- logits ---------------------------------------------------------------------------------


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits): H = logsumexp(z) - sum_v p_v z_v.

    z is shifted by its max first: H is shift-invariant, and without the shift large logits
    (say 1000) lose the O(1) entropy to float32 cancellation between the two ~1000 terms.

    logits [..., vocab] -> [...]
    """
    z = logits - logits.amax(dim=-1, keepdim=True)
    p = torch.softmax(z, dim=-1)
    pz = torch.where(p > 0, p * z, torch.zeros_like(p))  # 0 * -inf (masked vocab) -> 0
    return torch.logsumexp(z, dim=-1) - pz.sum(dim=-1)


def gather_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """log softmax(logits)[token] as the gathered logit minus logsumexp, one row at a time.

    Never materialises the [batch, seq, vocab] log-softmax (the largest tensor in RL training);
    the logsumexp runs per batch row, at least in float32, as TRL's selective_log_softmax does.

    logits [batch, seq, vocab], tokens [batch, seq] -> [batch, seq]
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).to(dtype)  # [batch, seq]
    lse = torch.stack([torch.logsumexp(row.to(dtype), dim=-1) for row in logits])  # [batch, seq]
    return picked - lse
