"""Scoring backends: run a reward model over batches of token ids.

One abstract interface, two implementations: `transformers` (CPU default, in this package) and
`vllm` (pooling runner; `rm_server.backends.vllm`). A backend is called from the batcher's
worker thread only, one batch at a time, and never from the event loop. `backends.worker` runs
either in a process of its own behind the same interface (the server does so for `transformers`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Kind = Literal["outcome", "process"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]  # as assay.checkpoints.Dtype; the spec's `dtype`


class OutOfMemory(RuntimeError):
    """A batch that did not fit in the device's memory (CUDA) or the machine's (CPU). Nothing is broken:
    smaller batches fit, so the items are worth retrying and the service keeps serving."""

    def __init__(self, device: str, items: int, tokens: int) -> None:
        super().__init__(f"out of memory on {device} for a batch of {items} items, {tokens} tokens wide")
        self.device, self.items, self.tokens = device, items, tokens

    def __reduce__(self):  # picklable with its fields: a model worker process hands it back whole
        return (OutOfMemory, (self.device, self.items, self.tokens))


class ScoringBackend(ABC):
    """Raw model outputs for a batch of token-id sequences (no activation applied)."""

    tokenizer: PreTrainedTokenizerBase  # the checkpoint's own: rewards encode their text with it
    num_labels: int | None  # None: the checkpoint's config names no labels (no reward model then)
    max_positions: int | None = None  # longest sequence the model takes, when its config says

    @property
    def ready(self) -> bool:
        """Whether it takes batches now (a worker process's backend: false while it restarts)."""
        return True

    def close(self) -> None:
        """Release engines and memory (the vLLM backend runs engine processes)."""

    @abstractmethod
    def pooled(self, batch: list[list[int]]) -> list[np.ndarray]:
        """Outcome models: the model's own pooled logits, one [num_labels] array per sequence."""

    @abstractmethod
    def per_token(self, batch: list[list[int]]) -> list[np.ndarray]:
        """Logits at every position, one [len(seq), num_labels] array per sequence.

        For a causal outcome model, row i is the score of the prefix ending at token i."""


def load_backend(
    name: str, path, kind: Kind, device: str = "cpu", dtype: Dtype = "float32"
) -> tuple[ScoringBackend, PreTrainedTokenizerBase]:
    """(backend, tokenizer) for a local checkpoint, its model on `device` in `dtype`."""
    backend: ScoringBackend
    if name == "transformers":
        from assay.rm_server.backends.hf import TransformersBackend

        backend = TransformersBackend(path, kind, device, dtype)
    elif name == "vllm":
        from assay.rm_server.backends.vllm import VllmBackend

        backend = VllmBackend(path, kind, device, dtype)
    else:
        raise ValueError(f"unknown backend {name!r}; use transformers or vllm")
    return backend, backend.tokenizer
