"""In-process scoring with the world's reward models: outcome, process and verifier.

Part of the models base (torch, nothing of ours above it). `outcome_scores` and
`step_token_positions` are the forward pass and the step read-out themselves: reward-model
training (`trainer.reward_model`) calls them with gradients. The `score_*` functions batch them
with no gradients for the evaluation (`assay eval`) and in-process search (`search.local`). The
reward service's transformers backend runs its own batched passes on the same checkpoints; its
tests check that it answers exactly what these give, so a score means the same thing everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from assay.arith.verifier import NO, YES

# --- the forward passes (with gradients when the caller trains: trainer.reward_model) ---------


def outcome_scores(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], add_special_tokens: bool = True
) -> torch.Tensor:
    """[len(texts)] one scalar per text, read at its last token (the model pools there).

    Text a chat template rendered holds its own special tokens: pass add_special_tokens=False for it,
    as rm_server does for a `chat_template: true` reward, so a BOS is not added twice."""
    enc = tokenizer(
        list(texts), return_tensors="pt", padding=True, padding_side="right", add_special_tokens=add_special_tokens
    )
    # Right padding under a causal mask needs no attention mask (and CPU attention is much
    # faster without one); the classifier finds each row's last real token by the pad id.
    return model(input_ids=enc["input_ids"].to(model.device), use_cache=False).logits[:, 0]


def step_token_positions(
    tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, step_ends: Sequence[int]
) -> tuple[list[int], list[int]]:
    """Token ids of prompt+response and, per step, the index of the token holding its last char."""
    enc = tokenizer(prompt + response, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    positions = []
    for end in step_ends:
        last_char = len(prompt) + end - 1
        idx = next(i for i, (s, e) in enumerate(offsets) if s <= last_char < e)
        positions.append(idx)
    return enc["input_ids"], positions


# --- batched scores, no gradients --------------------------------------------------------------


@torch.inference_mode()
def score_outcome(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    batch_size: int = 256,
    add_special_tokens: bool = True,
) -> list[float]:
    """One raw logit per text (higher is better)."""
    out: list[float] = []
    for start in range(0, len(texts), batch_size):
        out.extend(outcome_scores(model, tokenizer, texts[start : start + batch_size], add_special_tokens).tolist())
    return out


@torch.inference_mode()
def score_steps(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[tuple[str, str, Sequence[int]]],
    batch_size: int = 256,
) -> list[list[float]]:
    """P(step correct) for each step of each (prompt, response, step_ends) item."""
    out: list[list[float]] = []
    for start in range(0, len(items), batch_size):
        chunk = [step_token_positions(tokenizer, p, r, ends) for p, r, ends in items[start : start + batch_size]]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        for row, (x, _) in enumerate(chunk):
            ids[row, : len(x)] = torch.tensor(x)
        # right padding: no attention mask needed under the causal mask
        probs = model(input_ids=ids, use_cache=False).logits[..., 0].sigmoid()  # [batch, seq]
        out.extend(probs[row, pos].tolist() for row, (_, pos) in enumerate(chunk))
    return out


@torch.inference_mode()
def verifier_yes_prob(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    batch_size: int = 256,
) -> list[float]:
    """P(yes) from the first answer token, renormalised over the yes and no tokens."""
    yes = tokenizer(YES, add_special_tokens=False)["input_ids"][0]
    no = tokenizer(NO, add_special_tokens=False)["input_ids"][0]
    out: list[float] = []
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer(
            list(prompts[start : start + batch_size]), return_tensors="pt", padding=True, padding_side="left"
        )
        logits = model(**enc, use_cache=False).logits[:, -1, :]  # [batch, vocab] at the last prompt token
        pair = logits[:, [yes, no]].softmax(-1)
        out.extend(pair[:, 0].tolist())
    return out
