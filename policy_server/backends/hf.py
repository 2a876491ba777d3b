"""The transformers backend: dynamic batches, decoded with a KV cache on a worker thread.

Concurrent requests meet in `rm_server.batcher.Batcher` (a bounded queue with a batch cap, a
token budget and a wait deadline), whose worker thread runs `decode` on each batch: one
left-padded prefill, then one cached forward step per token, as `assay.generation.sample_batch`
does. What this loop adds to it, per sequence: its own sampling parameters and random generator
(a seed gives the same completion whatever else shares the batch, up to float rounding),
stop strings, top-k logprobs, `ignore_eos`, and an abort flag checked every step (the request
was cancelled). A batch runs until its longest sequence ends: no continuous batching here,
which is what the vLLM backend is for.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from assay.checkpoints import load_model
from assay.generation import _filter_logits
from policy_server.backends import GenerationBackend, GenerationOutput, GenerationRequest, Overloaded, ParamSpec
from rm_server import errors as rm_errors
from rm_server.batcher import Batcher


@dataclass(frozen=True)
class BatchSettings:
    """How the batcher packs sequences into one decode loop."""

    max_sequences: int = 64  # sequences per batch
    max_tokens: int = 64 * 256  # prompt + max_tokens, summed over a batch
    max_wait_s: float = 0.005  # how long the oldest sequence waits for company
    max_queue: int = 4096  # sequences waiting; beyond this requests get 429


@dataclass
class _Job:
    request: GenerationRequest
    abort: threading.Event  # set on the event loop when the request is cancelled
    submitted: float = field(default_factory=time.monotonic)


class HFBackend(GenerationBackend):
    def __init__(
        self,
        name: str,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        batching: BatchSettings | None = None,
        on_batch: Callable[[int, int], None] | None = None,
        on_finished: Callable[[list[GenerationOutput]], None] | None = None,
    ) -> None:
        """`on_batch(sequences, tokens)` runs on the event loop after each batch, `on_finished(outputs)`
        on the worker thread with every sequence the batch ended, aborted ones included."""
        batching = batching or BatchSettings()
        self.name, self.model, self.tokenizer = name, model.eval(), tokenizer
        self.max_model_len = int(getattr(model.config, "max_position_embeddings", tokenizer.model_max_length))
        self.weight_version = 0
        self._on_finished = on_finished
        # A batch decodes under this lock from its first step to its last; a weight update copies
        # its tensors in and bumps weight_version under it: no sequence sees two versions.
        self._weights_lock = threading.Lock()
        self._batcher: Batcher[_Job, GenerationOutput] = Batcher(
            self._run_batch,
            name=name,
            max_items=batching.max_sequences,
            max_tokens=batching.max_tokens,
            max_wait_s=batching.max_wait_s,
            max_queue=batching.max_queue,
            on_batch=on_batch,
        )

    @classmethod
    def load(cls, name: str, path: str | Path, batching: BatchSettings | None = None, on_batch=None,
             on_finished=None) -> HFBackend:  # fmt: skip
        model, tokenizer = load_model(path, "causal_lm")
        return cls(name, model, tokenizer, batching, on_batch, on_finished)

    async def start(self) -> None:
        self._batcher.start()

    async def close(self) -> None:
        await self._batcher.close()

    def queue_depth(self) -> int:
        return self._batcher.depth()

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationOutput]:
        jobs = [_Job(r, threading.Event()) for r in requests]
        try:
            futures = self._batcher.submit(jobs, [len(r.prompt_ids) + r.max_tokens for r in requests])
        except rm_errors.Overloaded as exc:
            waiting = self._batcher.depth()
            raise Overloaded(f"model {self.name!r} has {waiting} sequences waiting", exc.retry_after_s) from None
        try:
            return list(await asyncio.gather(*futures))
        except BaseException:
            # Cancelled (client gone, deadline) or failed: queued jobs are dropped with their
            # futures, running ones stop at their next decode step.
            for job, future in zip(jobs, futures, strict=True):
                job.abort.set()
                future.cancel()
            raise

    def parameter_specs(self) -> dict[str, ParamSpec]:
        return {name: ParamSpec(tuple(t.shape), str(t.dtype).removeprefix("torch."))
                for name, t in self.model.state_dict().items()}  # fmt: skip

    async def load_weights(self, tensors: Mapping[str, torch.Tensor]) -> int:
        _check_tied(self.model, tensors)
        return await asyncio.to_thread(self._swap, tensors)

    @torch.inference_mode()
    def _swap(self, tensors: Mapping[str, torch.Tensor]) -> int:
        state = self.model.state_dict()  # views of the live parameters and buffers
        with self._weights_lock:  # waits for the running batch; the next one starts on the new weights
            for name, tensor in tensors.items():
                state[name].copy_(tensor)
            self.weight_version += 1
            return self.weight_version

    def _run_batch(self, jobs: list[_Job]) -> list[GenerationOutput]:
        with self._weights_lock:
            outputs = decode(self.model, self.tokenizer, jobs, self.weight_version)
        if self._on_finished is not None:
            self._on_finished(outputs)
        return outputs


def _check_tied(model: PreTrainedModel, tensors: Mapping[str, torch.Tensor]) -> None:
    """Names sharing one storage (tied embeddings) must not be given two different values."""
    by_storage: dict[int, str] = {}
    state = model.state_dict()
    for name in tensors:
        first = by_storage.setdefault(state[name].data_ptr(), name)
        if first != name and not torch.equal(tensors[first], tensors[name]):
            raise ValueError(f"{first} and {name} are one tied tensor in this model, and the update gives them "
                             "different values")  # fmt: skip


class _Row:
    """One sequence's state in the decode loop."""

    def __init__(self, job: _Job) -> None:
        self.req, self.abort, self.submitted = job.request, job.abort, job.submitted
        self.first_token_s: float | None = None
        self.generator = torch.Generator().manual_seed(self.req.seed) if self.req.temperature > 0 else None
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.tops: list[list[tuple[int, float]]] = []
        self.reason: str | None = None
        self.text: str | None = None  # set when a stop string cut it
        self.stop: str | None = None  # the stop string that cut it
        self.searched = 0  # characters of the text already searched for stop strings

    def find_stop(self, tokenizer: PreTrainedTokenizerBase) -> bool:
        """Whether the text now contains a stop string; if so, keep the text before it."""
        text = tokenizer.decode(self.tokens, skip_special_tokens=True)
        start = max(0, self.searched - max(len(s) for s in self.req.stop) + 1)
        self.searched = len(text)
        hits = [(i, s) for s in self.req.stop if (i := text.find(s, start)) >= 0]
        if hits:
            at, self.stop = min(hits)  # the earliest match; at one offset, the smallest string
            self.text = text[:at]
        return bool(hits)


@torch.inference_mode()
def decode(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, jobs: Sequence[_Job], weight_version: int
) -> list[GenerationOutput]:
    """Generate every job's sequence in one batch: left-padded prefill, then cached steps."""
    rows = [_Row(job) for job in jobs]
    batch = len(rows)
    width = max(len(r.req.prompt_ids) for r in rows)
    ids = torch.full((batch, width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.req.prompt_ids)
        ids[i, width - n :] = torch.tensor(r.req.prompt_ids)
        mask[i, width - n :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [batch, width]: 0 at each row's first real token
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    cache, logits = out.past_key_values, out.logits[:, -1, :].float()  # logits: [batch, vocab]
    next_pos = positions[:, -1:] + 1  # [batch, 1]
    k_top = max(r.req.top_logprobs for r in rows)
    eos = tokenizer.eos_token_id

    for _ in range(max(r.req.max_tokens for r in rows)):
        raw = logits.log_softmax(-1)  # the untempered distribution: what logprobs report
        choice = _next_tokens(logits, rows)  # [batch]
        picked = raw.gather(-1, choice[:, None])[:, 0].tolist()
        if k_top:
            top_values, top_ids = (t.tolist() for t in raw.topk(k_top, dim=-1))
        for i, r in enumerate(rows):
            if r.reason is not None:
                continue
            if r.abort.is_set():
                r.reason = "abort"
                continue
            token = int(choice[i])
            if not r.tokens:
                r.first_token_s = time.monotonic() - r.submitted
            r.tokens.append(token)
            r.logprobs.append(picked[i])
            if r.req.top_logprobs:
                k = r.req.top_logprobs
                r.tops.append(list(zip(top_ids[i][:k], top_values[i][:k], strict=True)))
            if (token == eos and not r.req.ignore_eos) or (r.req.stop and r.find_stop(tokenizer)):
                r.reason = "stop"
            elif len(r.tokens) >= r.req.max_tokens:
                r.reason = "length"
        if all(r.reason is not None for r in rows):
            break
        # Finished rows are fed padding; their cache rows are never read again.
        feed = torch.tensor([r.tokens[-1] if r.reason is None else tokenizer.pad_token_id for r in rows])
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], dim=1)
        out = model(input_ids=feed[:, None], attention_mask=mask, position_ids=next_pos, past_key_values=cache,
                    use_cache=True)  # fmt: skip
        cache, logits = out.past_key_values, out.logits[:, -1, :].float()
        next_pos = next_pos + 1

    return [
        GenerationOutput(
            token_ids=r.tokens,
            logprobs=r.logprobs,
            text=r.text if r.text is not None else tokenizer.decode(r.tokens, skip_special_tokens=True),
            finish_reason=r.reason or "abort",  # type: ignore[arg-type]
            weight_version=weight_version,
            stop_reason=r.stop,
            top_logprobs=r.tops if r.req.top_logprobs else None,
            first_token_s=r.first_token_s,
        )
        for r in rows
    ]


def _next_tokens(logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
    """[batch, vocab] -> [batch]: argmax for greedy rows, a draw from each row's generator otherwise."""
    choice = logits.argmax(-1)
    # Rows sharing (temperature, top_k, top_p) are filtered together: usually one group per batch.
    groups: dict[tuple[float, int, float], list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        if r.reason is None and r.req.temperature > 0:
            groups[(r.req.temperature, r.req.top_k, r.req.top_p)].append(i)
    for (temperature, top_k, top_p), idx in groups.items():
        probs = _filter_logits(logits[idx] / temperature, top_k, top_p).softmax(-1)  # [group, vocab]
        for j, i in enumerate(idx):
            choice[i] = torch.multinomial(probs[j], 1, generator=rows[i].generator)[0]
    return choice
