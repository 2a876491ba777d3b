"""The transformers backend's forward passes: one left-padded prefill, then one cached step per token.

`decode` (in `hf.py`) owns sampling, stopping and failures; this module owns how the model is
called, which is where the speed of a decode step is decided:

- **dynamic** (default): transformers' `DynamicCache`, grown by one position a step, and an
  attention mask grown with it, what `model.generate` does by default.
- **static**: a `StaticCache` sized once per batch shape, with a full-length attention mask whose
  future columns are 0 until their token is fed, so every step of a batch has the same shapes. The
  cache's length is rounded up to a power of two (at least 64), and the last cache is kept and
  reset for the next batch of the same shape: its tensors keep their addresses, which is what a
  CUDA graph captured over them needs.
- **compile** (static only): the step's forward goes through `torch.compile`, with CUDA graphs
  (`mode="reduce-overhead"`) on CUDA. A new batch size or cache length compiles again, so it pays
  off with steady, full batches (a trainer's rollouts), and only on a GPU: on the CPU a step of a
  small model is framework overhead that compiling does not remove, and compiling takes minutes.

The outputs are the same whichever is chosen (up to float rounding of a different kernel): the
tests hold greedy and seeded completions equal with the static cache on and off.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, StaticCache

from assay.policy_server.config import BatchSettings

MIN_STATIC_LEN = 64


class Steps:
    """How one backend calls its model; `start` begins a batch."""

    def __init__(self, model: PreTrainedModel, settings: BatchSettings) -> None:
        self.model = model
        self.static = settings.kv_cache == "static"
        self._cache: StaticCache | None = None
        self._cache_shape: tuple[int, int] | None = None
        self.forward: Any = model.forward
        if settings.compile:
            on_cuda = model.device.type == "cuda"
            self.forward = torch.compile(model.forward, mode="reduce-overhead" if on_cuda else None)

    def start(self, prompts: Sequence[Sequence[int]], pad_id: int, max_new: int) -> tuple[Batch, torch.Tensor]:
        """Prefill the prompts, left-padded, for up to `max_new` steps after; returns the batch's stepper and
        the logits of its first new token ([batch, vocab], float32). The batch is laid out on the CPU and
        copied over in one transfer per tensor; everything after stays on the model's device."""
        batch, width = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((batch, width), pad_id, dtype=torch.long)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        ids, mask = ids.to(self.model.device), mask.to(self.model.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [batch, width]: 0 at each row's first real token
        cache: Any = None
        full_mask = mask
        if self.static:
            cache, length = self._static_cache(batch, width + max_new)
            # The whole cache's mask from the start: columns past the prompt turn to 1 as tokens are fed.
            full_mask = torch.cat([mask, mask.new_zeros(batch, length - width)], dim=1)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            cache_position=torch.arange(width, device=ids.device) if self.static else None,
        )
        state = Batch(self, out.past_key_values, full_mask, positions[:, -1:] + 1, width)
        return state, out.logits[:, -1, :].float()

    def _static_cache(self, batch: int, needed: int) -> tuple[StaticCache, int]:
        """The cache for this batch shape, and its length."""
        limit = max(needed, int(getattr(self.model.config, "max_position_embeddings", needed)))
        length = min(max(MIN_STATIC_LEN, 1 << (needed - 1).bit_length()), limit)
        if self._cache is None or self._cache_shape != (batch, length):
            self._cache = None  # the old one's memory goes before the new one's is taken
            self._cache = StaticCache(config=self.model.config, max_cache_len=length)
            self._cache_shape = (batch, length)
        else:
            self._cache.reset()
        return self._cache, length


class Batch:
    """One batch's cached steps."""

    def __init__(self, steps: Steps, cache: Any, mask: torch.Tensor, next_pos: torch.Tensor, fed: int) -> None:
        self.steps, self.cache, self.mask, self.next_pos, self.fed = steps, cache, mask, next_pos, fed

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row ([batch], on the model's device); the next logits ([batch, vocab], float32)."""
        if self.steps.static:
            self.mask[:, self.fed] = 1
            cache_position = torch.tensor([self.fed], device=tokens.device)
            mask = self.mask
        else:
            self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
            cache_position, mask = None, self.mask
        out = self.steps.forward(
            input_ids=tokens[:, None],
            attention_mask=mask,
            position_ids=self.next_pos,
            past_key_values=self.cache,
            use_cache=True,
            cache_position=cache_position,
        )
        self.cache = out.past_key_values
        self.next_pos = self.next_pos + 1
        self.fed += 1
        return out.logits[:, -1, :].float()
