"""The transformers scoring backend: batched forward passes on CPU (or any torch device)."""

from __future__ import annotations

import numpy as np
import torch

from assay.checkpoints import CheckpointError, load_model
from assay.checkpoints import Kind as ModelKind
from assay.rm_server.backends import Kind, ScoringBackend


class TransformersBackend(ScoringBackend):
    def __init__(self, path, kind: Kind, device: str = "cpu") -> None:
        hf_kind: ModelKind = "sequence_classification" if kind == "outcome" else "token_classification"
        self.model, self.tokenizer = load_model(path, hf_kind)
        # transformers wraps Module.to with functools.wraps, which types the bound method as the unbound one
        self.model.to(device)  # type: ignore[arg-type]
        self.device = device
        self.num_labels = self.model.config.num_labels
        self.max_positions = getattr(self.model.config, "max_position_embeddings", None)
        if self.tokenizer.pad_token_id is None:
            raise CheckpointError(f"{path}: the tokenizer has no pad token; batched scoring needs one.")
        # The model pools itself for outcomes; per-prefix scores apply its head at every position.
        self._head = getattr(self.model, "score", None) or getattr(self.model, "classifier", None)

    def _encode(self, batch: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(ids) for ids in batch)
        ids = torch.full((len(batch), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, x in enumerate(batch):  # right padding: every sequence starts at position 0
            ids[row, : len(x)] = torch.tensor(x)
            mask[row, : len(x)] = 1
        return ids.to(self.device), mask.to(self.device)

    @torch.inference_mode()
    def pooled(self, batch: list[list[int]]) -> list[np.ndarray]:
        ids, mask = self._encode(batch)
        logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # [batch, labels]
        return list(logits.float().cpu().numpy())

    @torch.inference_mode()
    def per_token(self, batch: list[list[int]]) -> list[np.ndarray]:
        ids, mask = self._encode(batch)
        if type(self.model).__name__.endswith("ForTokenClassification"):
            logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # [batch, seq, labels]
        else:
            if self._head is None:
                raise ValueError(f"{type(self.model).__name__} has no known score head for per-token scores")
            hidden = self.model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            logits = self._head(hidden)  # [batch, seq, labels]
        logits = logits.float().cpu().numpy()
        return [logits[row, : len(x)] for row, x in enumerate(batch)]
