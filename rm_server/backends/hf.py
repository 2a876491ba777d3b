"""The transformers scoring backend: batched forward passes on any torch device, in any float dtype.

The model lives on `device` in `dtype` (`assay.checkpoints.load_model`). A batch is padded on the CPU
and copied to the device in one transfer per tensor (cheaper than writing rows into device memory one
by one); everything after that stays on the device until the logits come back as float32 numpy. The
device-side part of each call (`pooled_logits`, `token_logits`) is a function of its own, so that the
tests can run it with the model on `meta`, where any tensor left on the CPU makes an operation mix
devices, as it would on CUDA.

A batch that does not fit in memory raises `OutOfMemory` after the CUDA cache is emptied: the
allocator's cached blocks from the failed attempt go back, and the next batch starts clean.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from assay.checkpoints import CheckpointError, load_model
from assay.checkpoints import Kind as ModelKind
from assay.model_sizes import is_out_of_memory, model_size
from assay.rm_server.backends import Dtype, Kind, OutOfMemory, ScoringBackend

log = logging.getLogger(__name__)


class TransformersBackend(ScoringBackend):
    def __init__(self, path, kind: Kind, device: str = "cpu", dtype: Dtype = "float32") -> None:
        hf_kind: ModelKind = "sequence_classification" if kind == "outcome" else "token_classification"
        self.model, self.tokenizer = load_model(path, hf_kind, device=device, dtype=dtype)
        self.device = self.model.device
        self.num_labels = self.model.config.num_labels
        self.max_positions = getattr(self.model.config, "max_position_embeddings", None)
        if self.tokenizer.pad_token_id is None:
            raise CheckpointError(f"{path}: the tokenizer has no pad token; batched scoring needs one.")
        # The model pools itself for outcomes; per-prefix scores apply its head at every position.
        self._head = getattr(self.model, "score", None) or getattr(self.model, "classifier", None)
        log.info("%s: %s", path, model_size(self.model).describe())

    def _encode(self, batch: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """[batch, width] ids and attention mask on the model's device, right-padded."""
        width = max(len(ids) for ids in batch)
        ids = torch.full((len(batch), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, x in enumerate(batch):  # right padding: every sequence starts at position 0
            ids[row, : len(x)] = torch.tensor(x)
            mask[row, : len(x)] = 1
        return ids.to(self.device), mask.to(self.device)

    def pooled_logits(self, batch: list[list[int]]) -> torch.Tensor:
        """[batch, labels] on the device, in the model's dtype."""
        ids, mask = self._encode(batch)
        return self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits

    def token_logits(self, batch: list[list[int]]) -> torch.Tensor:
        """[batch, width, labels] on the device, in the model's dtype (padding rows included)."""
        ids, mask = self._encode(batch)
        if type(self.model).__name__.endswith("ForTokenClassification"):
            return self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        if self._head is None:
            raise ValueError(f"{type(self.model).__name__} has no known score head for per-token scores")
        hidden = self.model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        return self._head(hidden)

    @torch.inference_mode()
    def pooled(self, batch: list[list[int]]) -> list[np.ndarray]:
        with self._memory_guard(batch):
            return list(self.pooled_logits(batch).float().cpu().numpy())

    @torch.inference_mode()
    def per_token(self, batch: list[list[int]]) -> list[np.ndarray]:
        with self._memory_guard(batch):
            logits = self.token_logits(batch).float().cpu().numpy()
        return [logits[row, : len(x)] for row, x in enumerate(batch)]

    @contextmanager
    def _memory_guard(self, batch: list[list[int]]) -> Iterator[None]:
        """An out-of-memory error becomes `OutOfMemory` naming the batch, with the CUDA cache emptied."""
        try:
            yield
        except RuntimeError as exc:  # torch.OutOfMemoryError is one
            if not is_out_of_memory(exc):
                raise
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise OutOfMemory(str(self.device), len(batch), max(map(len, batch))) from exc
