"""Batched sampling from a Hugging Face causal LM with a KV cache and left padding.

This is the in-process generation path: the world's build and evaluation use it, and the
policy server's transformers backend is built on it. Each sample carries the log-probability of
every generated token under the model at temperature 1 (what RL needs), whatever temperature it
was sampled at.

Degenerate parameters mean greedy decoding: a temperature or top_p below `GREEDY_BELOW` (1e-5,
vLLM's threshold for temperature) takes the argmax. Below it, the logits divided by the temperature
overflow float32 (5e-324 is 0 in float32, and x/0 is inf), and such a top_p keeps only the most
likely token of any vocabulary under 100k tokens. Whatever top_p is, the most likely token always
stays in the nucleus.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from assay.checkpoints import decode_text

GREEDY_BELOW = 1e-5


def is_greedy(temperature: float, top_p: float) -> bool:
    """Whether these parameters decode greedily: temperature 0, or a temperature or top_p below
    `GREEDY_BELOW`. Written so that NaN, which no comparison holds for, is greedy too."""
    return not (temperature >= GREEDY_BELOW and top_p >= GREEDY_BELOW)


@dataclass
class Sample:
    text: str
    token_ids: list[int]
    logprobs: list[float]  # one per generated token, under the untempered model
    finish_reason: str  # "stop" (eos) or "length"


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    max_new_tokens: int = 64

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0 (0 means greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0 or self.max_new_tokens < 1:
            raise ValueError("top_k must be >= 0 and max_new_tokens >= 1")


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    # [batch, vocab] -> [batch, vocab] with the excluded tokens at -inf
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # keep the smallest prefix whose mass reaches top_p
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        # The first token always stays: a top_p that is 0 in float32 (below ~1e-45) would drop it too.
        drop_sorted[..., 0] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.inference_mode()
def sample_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    params: SamplingParams,
    generator: torch.Generator | None = None,
) -> list[Sample]:
    """Sample one continuation per prompt, all in one batch, on the model's device (`generator`, when
    given, must be on that device too: `torch.multinomial` draws there)."""
    eos = tokenizer.eos_token_id
    device = model.device
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    batch = ids.shape[0]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    cache = out.past_key_values
    next_logits = out.logits[:, -1, :].float()  # [batch, vocab]
    next_pos = positions[:, -1:] + 1  # [batch, 1]

    tokens = torch.empty(batch, 0, dtype=torch.long, device=device)
    logps = torch.empty(batch, 0, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    for _ in range(params.max_new_tokens):
        raw = next_logits.log_softmax(-1)
        if is_greedy(params.temperature, params.top_p):
            choice = next_logits.argmax(-1)
        else:
            scaled = _filter_logits(next_logits / params.temperature, params.top_k, params.top_p)
            choice = torch.multinomial(scaled.softmax(-1), 1, generator=generator).squeeze(-1)
        choice = choice.masked_fill(done, tokenizer.pad_token_id)
        tokens = torch.cat([tokens, choice[:, None]], dim=1)
        logps = torch.cat([logps, raw.gather(-1, choice[:, None])], dim=1)
        done = done | (choice == eos)
        if bool(done.all()):
            break
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        out = model(
            input_ids=choice[:, None],
            attention_mask=mask,
            position_ids=next_pos,
            past_key_values=cache,
            use_cache=True,
        )
        cache = out.past_key_values
        next_logits = out.logits[:, -1, :].float()
        next_pos = next_pos + 1

    samples = []
    for row in range(batch):
        row_ids = tokens[row].tolist()
        if eos in row_ids:
            cut, reason = row_ids.index(eos), "stop"
        else:
            cut, reason = len(row_ids), "length"
        kept = row_ids[:cut]
        text = decode_text(tokenizer, kept)
        # the eos token's own logprob is kept: it is part of what the policy chose
        n_lp = cut + 1 if reason == "stop" else cut
        samples.append(Sample(text, kept, logps[row, :n_lp].tolist(), reason))
    return samples


def sample(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    params: SamplingParams,
    *,
    n: int = 1,
    seed: int = 0,
    batch_size: int = 512,
    on_batch: Callable[[int, int], None] | None = None,
) -> list[list[Sample]]:
    """n samples for each prompt, as `result[i][j]` = sample j of prompt i.

    Deterministic for a given seed, model, prompt list, batch size and device (a CUDA generator draws
    other numbers than the CPU's for one seed). `on_batch(done, total)` is
    called after each batch with the samples made so far (a progress bar's hook).
    """
    generator = torch.Generator(model.device).manual_seed(seed)  # the draws stay on the model's device
    flat = [p for p in prompts for _ in range(n)]
    results: list[Sample] = []
    for start in range(0, len(flat), batch_size):
        results.extend(sample_batch(model, tokenizer, flat[start : start + batch_size], params, generator))
        if on_batch:
            on_batch(len(results), len(flat))
    return [results[i * n : (i + 1) * n] for i in range(len(prompts))]
