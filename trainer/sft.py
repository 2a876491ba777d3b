"""Supervised fine-tuning of a causal LM on (prompt, completion) pairs.

Loss: mean next-token cross-entropy over completion tokens only (prompt and padding masked),
with the completion closed by the tokenizer's eos token so the model learns to stop. The model
trains on `config.hardware` (`trainer.models`: device, autocast over float32 weights, gradient
checkpointing); `make_update` is the optimizer step every offline trainer here shares.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from assay.trainer.config import SFTConfig
from assay.trainer.models import Precision, device_of, out_of_memory, prepare

IGNORE = -100  # label id that cross-entropy skips


def lr_lambda(config: SFTConfig) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to min_lr_ratio; shared by every trainer here."""

    def f(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        t = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return f


def encode_example(tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """Token ids and labels for one example: labels are IGNORE over the prompt."""
    p = tokenizer(prompt)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return p + c, [IGNORE] * len(p) + c


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad to the longest example: (input_ids, attention_mask, labels), each [batch, seq]."""
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (x, y) in enumerate(batch):
        ids[row, : len(x)] = torch.tensor(x)
        labels[row, : len(y)] = torch.tensor(y)
        mask[row, : len(x)] = 1
    return ids, mask, labels


def sft_loss(
    logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0, smooth_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled positions, optionally label-smoothed.

    logits [batch, seq, vocab] at position t predict labels [batch, seq] at t + 1. With
    smooth_ids, smoothing applies only where the target is one of those tokens and spreads over
    them alone: L = (1 - e) * NLL(target) + e * mean_{j in ids} -log p(j); without, it spreads
    over the whole vocabulary. A smoothed policy keeps its argmax but slips at temperature 1:
    to any token, or with smooth_ids to a wrong token of the same class (a wrong digit).
    """
    logp = logits[:, :-1].float().log_softmax(-1)  # [batch, seq-1, vocab]
    target = labels[:, 1:]
    keep = target != IGNORE
    logp, target = logp[keep], target[keep]  # [n, vocab], [n]
    nll = -logp.gather(-1, target[:, None]).squeeze(-1)  # [n]
    if smoothing == 0.0:
        return nll.mean()
    if smooth_ids is None:
        spread, in_class = -logp.mean(-1), torch.ones_like(nll, dtype=torch.bool)
    else:
        spread, in_class = -logp[:, smooth_ids].mean(-1), torch.isin(target, smooth_ids)
    return torch.where(in_class, (1 - smoothing) * nll + smoothing * spread, nll).mean()


def _token_ids(tokenizer: PreTrainedTokenizerBase, chars: str) -> torch.Tensor | None:
    if not chars:
        return None
    return torch.tensor(sorted({tokenizer.convert_tokens_to_ids(c) for c in chars}))


def make_update(model: torch.nn.Module, config: SFTConfig, precision: Precision) -> Callable[[torch.Tensor], float]:
    """AdamW with warm-up and cosine decay, as one call per step: `update(loss) -> loss value`.

    Shared by every trainer here: backward, clip the gradient norm, step (`precision.step`: with a
    loss scale in float16), advance the schedule.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(config))

    def update(loss: torch.Tensor) -> float:
        precision.step(loss, (opt, config.grad_clip))
        sched.step()
        return loss.item()

    return update


def train_sft(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Iterator[tuple[str, str]],
    config: SFTConfig,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train in place, on `config.hardware`, on `config.steps` batches drawn from `examples`; the step losses."""
    torch.manual_seed(config.seed)
    prepare(model, config.hardware)
    precision = Precision(config.hardware)
    update = make_update(model, config, precision)
    device = device_of(model)
    smooth_ids = _token_ids(tokenizer, config.smoothing_tokens)
    smooth_ids = smooth_ids.to(device) if smooth_ids is not None else None
    losses = []
    for step in range(config.steps):
        batch = [encode_example(tokenizer, *next(examples)) for _ in range(config.batch_size)]
        ids, _, labels = (t.to(device) for t in collate(batch, tokenizer.pad_token_id))
        # Right padding under a causal mask: real tokens never attend to the pads after them,
        # so no attention mask is passed (with one, CPU attention backward is ~8x slower).
        with step_guard("SFT", step, config):
            with precision.autocast():
                logits = model(input_ids=ids, use_cache=False).logits  # [batch, seq, vocab]
                loss = sft_loss(logits, labels, config.label_smoothing, smooth_ids)
            losses.append(update(loss))
        if on_step:
            on_step(step, losses[-1])
    model.eval()
    return losses


def step_guard(name: str, step: int, config: SFTConfig) -> AbstractContextManager:
    """`out_of_memory` around step `step` (from 0) of an offline trainer: no checkpoint to resume from."""
    where = f"{name} step {step + 1} (forward and backward over {config.batch_size} examples)"
    return out_of_memory(where, [f"--batch-size ({config.batch_size})"], config.hardware, resumable=False)


@torch.no_grad()
def eval_loss(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[tuple[str, str]],
    batch_size: int = 32,
) -> float:
    """Mean cross-entropy per completion token over held-out (prompt, completion) examples (every token
    weighs the same, however the batches fall). The model's train/eval mode is kept."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = [encode_example(tokenizer, p, c) for p, c in examples[start : start + batch_size]]
        ids, _, labels = (t.to(device_of(model)) for t in collate(batch, tokenizer.pad_token_id))
        tokens = int((labels[:, 1:] != IGNORE).sum())
        total += sft_loss(model(input_ids=ids, use_cache=False).logits, labels).item() * tokens
        count += tokens
    model.train(was_training)
    return total / count
