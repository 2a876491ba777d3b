"""The transformers backend: dynamic batches, decoded with a KV cache on a worker thread.

Concurrent requests meet in `assay.base.batcher.Batcher` (a bounded queue with a batch cap, a
token budget and a wait deadline), whose worker thread runs `decode` on each batch: one
left-padded prefill, then one cached forward step per token, as `assay.generation.sample_batch`
does. What this loop adds to it, per sequence: its own sampling parameters and random generator
(a seed gives the same completion whatever else shares the batch, up to float rounding),
stop strings, top-k logprobs, `ignore_eos`, and an abort flag checked every step (the request
was cancelled). A streamed sequence's job also carries a report (`_Job.progress`): after each step
the row hands what it sampled to the event loop (`call_soon_threadsafe`), and its output once it
ends; rows nobody streams skip it. A batch runs until its longest sequence ends: no continuous batching here,
which is what the vLLM backend is for.

One sequence's failure is its own. Whatever goes wrong for one row while sampling or stopping (a
seed its generator refuses, NaN or infinite logits, a draw that raises, a stop-string search that
raises) ends that row with `GenerationFailed`, which its request raises; the other rows carry on
and their requests get their completions. Only a failure of the batch's forward pass fails every
sequence in it, each request with its own `GenerationFailed`. Degenerate sampling parameters are
no failure: a temperature or top_p below `assay.generation.GREEDY_BELOW` decodes greedily.

The model runs on any torch device in any float dtype (`--device`, `--dtype`). The decode loop's
tensors live on the model's device: a batch is laid out on the CPU and copied over once
(`steps.Steps.start`), the tokens a step draws are fed back without leaving the device, and logits
are float32 whatever the model's dtype, so logprobs are too. Each step waits on the device once:
the step's tokens, their logprobs, the rows' faults (NaN or infinite logits, found on the device
and failed on the host) and any top logprobs come back in one transfer. Sampled rows are drawn
together on the device by inverse CDF, from one uniform number per row that the row's own seeded
generator draws on the host: a seed gives the same draws in any batch and on any device, and no
per-row kernel runs. `steps.py` says how the model is called (a dynamic or a static KV cache, and a
compiled step: `--kv-cache`, `--compile`). A batch that runs out of memory fails its requests with
`Overloaded` (429, retryable) naming `--max-batch-tokens`, with the CUDA cache emptied; the next
batch runs as usual.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from assay.base import errors as base_errors
from assay.base.batcher import Batcher
from assay.checkpoints import Dtype, decode_text, load_model
from assay.generation import _filter_logits, is_greedy
from assay.model_sizes import human_bytes, is_out_of_memory, model_size
from assay.policy_server.backends import (
    GenerationBackend,
    GenerationFailed,
    GenerationOutput,
    GenerationRequest,
    Overloaded,
    ParamSpec,
    Progress,
    TokenDelta,
)
from assay.policy_server.backends.steps import Steps
from assay.policy_server.config import BatchSettings

log = logging.getLogger(__name__)
OUT_OF_MEMORY_RETRY_S = 1.0  # a retry waits for the batch in flight to end and free its memory


Report = Callable[[TokenDelta | GenerationOutput | GenerationFailed], None]  # a streamed row's, from the worker


@dataclass
class _Job:
    request: GenerationRequest
    abort: threading.Event  # set on the event loop when the request is cancelled
    submitted: float = field(default_factory=time.monotonic)
    progress: Report | None = None  # streamed: called on the worker thread, hands over to the event loop


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
        self._max_batch_tokens = batching.max_tokens
        self.max_model_len = int(getattr(model.config, "max_position_embeddings", tokenizer.model_max_length))
        self.weight_version = 0
        self._on_finished = on_finished
        self._steps = Steps(self.model, batching)
        # A batch decodes under this lock from its first step to its last; a weight update copies
        # its tensors in and bumps weight_version under it: no sequence sees two versions.
        self._weights_lock = threading.Lock()
        self._batcher: Batcher[_Job, GenerationOutput | GenerationFailed] = Batcher(
            self._run_batch,
            name=name,
            max_items=batching.max_sequences,
            max_tokens=batching.max_tokens,
            max_wait_s=batching.max_wait_s,
            max_queue=batching.max_queue,
            on_batch=on_batch,
        )

    @classmethod
    def load(
        cls,
        name: str,
        path: str | Path,
        batching: BatchSettings | None = None,
        on_batch=None,
        on_finished=None,
        *,
        device: str = "cpu",
        dtype: Dtype = "float32",
        attn_implementation: str | None = None,
    ) -> HFBackend:
        """The checkpoint at `path` served as `name`, its model on `device` in `dtype`."""
        model, tokenizer = load_model(
            path, "causal_lm", device=device, dtype=dtype, attn_implementation=attn_implementation
        )
        backend = cls(name, model, tokenizer, batching, on_batch, on_finished)
        log.info("model %r (%s): %s", name, path, backend.describe_size())
        return backend

    def describe_size(self) -> str:
        """The model's sizes, and the KV cache that a batch as large as the limits allow would hold."""
        size = model_size(self.model)
        text = size.describe()
        if size.kv_bytes_per_token is not None:
            budget = size.kv_bytes_per_token * self._max_batch_tokens
            text += f"; max_batch_tokens {self._max_batch_tokens} -> up to {human_bytes(budget)} of KV cache"
        return text

    async def start(self) -> None:
        self._batcher.start()

    async def close(self) -> None:
        await self._batcher.close()

    def queue_depth(self) -> int:
        return self._batcher.depth()

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationOutput]:
        return await self._generate([_Job(r, threading.Event()) for r in requests])

    async def generate_streaming(
        self, requests: Sequence[GenerationRequest], progress: Progress
    ) -> list[GenerationOutput]:
        loop = asyncio.get_running_loop()

        def report(i: int) -> Report:
            def to_loop(event: TokenDelta | GenerationOutput | GenerationFailed) -> None:
                loop.call_soon_threadsafe(progress, i, event)

            return to_loop

        return await self._generate([_Job(r, threading.Event(), progress=report(i)) for i, r in enumerate(requests)])

    async def _generate(self, jobs: list[_Job]) -> list[GenerationOutput]:
        try:
            futures = self._batcher.submit(jobs, [len(j.request.prompt_ids) + j.request.max_tokens for j in jobs])
        except base_errors.Overloaded as exc:
            waiting = self._batcher.depth()
            raise Overloaded(f"model {self.name!r} has {waiting} sequences waiting", exc.retry_after_s) from None
        try:
            results = await asyncio.gather(*futures)
        except BaseException as exc:
            # Cancelled (client gone, deadline) or failed: queued jobs are dropped with their
            # futures, running ones stop at their next decode step.
            for job, future in zip(jobs, futures, strict=True):
                job.abort.set()
                future.cancel()
            if isinstance(exc, GenerationFailed):  # one object for the whole batch: each request raises its own
                raise GenerationFailed(str(exc)) from None
            if isinstance(exc, Overloaded):  # the batch ran out of memory
                raise Overloaded(str(exc), exc.retry_after_s) from None
            raise
        for r in results:
            if isinstance(r, GenerationFailed):  # one of this request's sequences failed: the request fails
                raise r
        return results

    def parameter_specs(self) -> dict[str, ParamSpec]:
        return {
            name: ParamSpec(tuple(t.shape), str(t.dtype).removeprefix("torch."))
            for name, t in self.model.state_dict().items()
        }

    @torch.inference_mode()
    def read_weights(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        state = self.model.state_dict()
        return {name: state[name].to("cpu", copy=True) for name in names}

    async def load_weights(self, tensors: Mapping[str, torch.Tensor], version: int | None = None) -> int:
        _check_tied(self.model, tensors)
        return await asyncio.to_thread(self._swap, tensors, version)

    @torch.inference_mode()
    def _swap(self, tensors: Mapping[str, torch.Tensor], version: int | None) -> int:
        state = self.model.state_dict()  # views of the live parameters and buffers
        with self._weights_lock:  # waits for the running batch; the next one starts on the new weights
            for name, tensor in tensors.items():
                state[name].copy_(tensor)
            self.weight_version = self.weight_version + 1 if version is None else version
            return self.weight_version

    def _run_batch(self, jobs: list[_Job]) -> list[GenerationOutput | GenerationFailed]:
        try:
            with self._weights_lock:
                results = decode(self.model, self.tokenizer, jobs, self.weight_version, self._steps)
        except Exception as exc:  # the forward pass failed: every sequence in the batch fails, typed
            if is_out_of_memory(exc):
                raise self._out_of_memory(jobs) from exc
            log.error("a decode batch of %d sequences failed", len(jobs), exc_info=exc)
            raise GenerationFailed(f"generating this batch of sequences failed ({_describe(exc)})") from exc
        failed = [r for r in results if isinstance(r, GenerationFailed)]
        if failed:
            log.warning(
                "%d of %d sequences failed, alone (the batch went on); the first: %s",
                len(failed),
                len(results),
                failed[0],
                exc_info=failed[0].__cause__,
            )
        if self._on_finished is not None:
            self._on_finished([r for r in results if isinstance(r, GenerationOutput)])
        return results

    def _out_of_memory(self, jobs: list[_Job]) -> Overloaded:
        """A batch that did not fit: the cached CUDA blocks of the attempt go back, and the requests get a
        retryable refusal naming the limits that size a batch. Smaller batches fit: the server goes on."""
        if self.model.device.type == "cuda":
            torch.cuda.empty_cache()
        tokens = sum(len(j.request.prompt_ids) + j.request.max_tokens for j in jobs)
        message = (
            f"model {self.name!r} ran out of memory on {self.model.device} decoding {len(jobs)} sequences "
            f"({tokens} prompt + max_tokens tokens); retry, and if it recurs start the server with a lower "
            f"--max-batch-tokens (now {self._max_batch_tokens}) or --max-batch"
        )
        log.error(message)
        return Overloaded(message, OUT_OF_MEMORY_RETRY_S)


def _check_tied(model: PreTrainedModel, tensors: Mapping[str, torch.Tensor]) -> None:
    """Names sharing one storage (tied embeddings) must not be given two different values."""
    by_storage: dict[int, str] = {}
    state = model.state_dict()
    for name in tensors:
        first = by_storage.setdefault(state[name].data_ptr(), name)
        if first != name and not torch.equal(tensors[first], tensors[name]):
            raise ValueError(
                f"{first} and {name} are one tied tensor in this model, and the update gives them different values"
            )


class _Row:
    """One sequence's state in the decode loop. What goes wrong for one row (its generator's seed, its
    draw, its stop-string search) fails that row alone (`fail`): the batch goes on without it."""

    def __init__(self, job: _Job) -> None:
        self.req, self.abort, self.submitted, self.progress = job.request, job.abort, job.submitted, job.progress
        self.reported = 0  # tokens already handed to `progress`
        self.greedy = is_greedy(self.req.temperature, self.req.top_p)
        self.first_token_s: float | None = None
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.tops: list[list[tuple[int, float]]] = []
        self.reason: str | None = None  # set when the row ends: stop, length, abort, or error (see `error`)
        self.error: BaseException | None = None
        self.text: str | None = None  # set when a stop string cut it
        self.stop: str | None = None  # the stop string that cut it
        self.searched = 0  # characters of the text already searched for stop strings
        # On the host whatever the model's device: it draws one uniform number a step (`uniform`), so
        # a seed gives the same draws on any device and in any batch.
        self.generator: torch.Generator | None = None
        if not self.greedy:
            try:
                self.generator = torch.Generator().manual_seed(self.req.seed)
            except Exception as exc:  # noqa: BLE001 (a bad seed fails this sequence, not the batch)
                self.fail(exc)

    def fail(self, exc: BaseException) -> None:
        self.reason, self.error = "error", exc

    def uniform(self) -> float:
        """This row's next number in [0, 1), from its own generator (0.0 for a row that failed here)."""
        try:
            return float(torch.rand((), generator=self.generator))
        except Exception as exc:  # noqa: BLE001 (this sequence fails, the batch goes on)
            self.fail(exc)
            return 0.0

    def take(
        self, token: int, logprob: float, top: tuple[list[int], list[float]] | None, tokenizer: PreTrainedTokenizerBase
    ) -> None:
        """Append the token sampled for this row and decide whether the row ends with it."""
        if not self.tokens:
            self.first_token_s = time.monotonic() - self.submitted
        self.tokens.append(token)
        self.logprobs.append(logprob)
        if self.req.top_logprobs and top is not None:
            k = self.req.top_logprobs
            self.tops.append(list(zip(top[0][:k], top[1][:k], strict=True)))
        at_eos = token == tokenizer.eos_token_id and not self.req.ignore_eos
        if at_eos or (self.req.stop and self.find_stop(tokenizer)):
            self.reason = "stop"
        elif len(self.tokens) >= self.req.max_tokens:
            self.reason = "length"

    def find_stop(self, tokenizer: PreTrainedTokenizerBase) -> bool:
        """Whether the text now contains a stop string; if so, keep the text before it. Within the first
        min_tokens tokens none is looked for, and one found there is passed over later too (as vLLM)."""
        text = decode_text(tokenizer, self.tokens)
        if len(self.tokens) < self.req.min_tokens:
            self.searched = len(text)
            return False
        start = max(0, self.searched - max(len(s) for s in self.req.stop) + 1)
        self.searched = len(text)
        hits = [(i, s) for s in self.req.stop if (i := text.find(s, start)) >= 0]
        if hits:
            at, self.stop = min(hits)  # the earliest match; at one offset, the smallest string
            self.text = text[:at]
        return bool(hits)

    def report(self, tokenizer: PreTrainedTokenizerBase, weight_version: int) -> None:
        """Streamed rows: hand over the tokens sampled since the last report, or the output once the row ended."""
        if self.progress is None:
            return
        if self.reason is not None:
            self.progress(self.output(tokenizer, weight_version))
        else:
            at, self.reported = self.reported, len(self.tokens)
            tops = self.tops[at:] if self.req.top_logprobs else None
            self.progress(TokenDelta(self.tokens[at:], self.logprobs[at:], tops, weight_version))

    def output(self, tokenizer: PreTrainedTokenizerBase, weight_version: int) -> GenerationOutput | GenerationFailed:
        if self.error is not None:
            failure = GenerationFailed(f"generating this sequence failed ({_describe(self.error)})")
            failure.__cause__ = self.error
            return failure
        return GenerationOutput(
            token_ids=self.tokens,
            logprobs=self.logprobs,
            text=self.text if self.text is not None else decode_text(tokenizer, self.tokens),
            # without an error, a row ends by stop, length or abort (`reason` is "error" only with `error`)
            finish_reason=self.reason or "abort",  # type: ignore[arg-type]
            weight_version=weight_version,
            stop_reason=self.stop,
            top_logprobs=self.tops if self.req.top_logprobs else None,
            first_token_s=self.first_token_s,
        )


@torch.inference_mode()
def decode(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    jobs: Sequence[_Job],
    weight_version: int,
    steps: Steps | None = None,
) -> list[GenerationOutput | GenerationFailed]:
    """Generate every job's sequence in one batch: left-padded prefill, then cached steps (`steps`
    says how the model is called; default: a dynamic cache).

    A sequence that fails while sampling or stopping gets a `GenerationFailed` in its place and the
    others go on; what fails for all (the forward pass) raises. The device is waited on once a step:
    tokens, logprobs and faults come to the host in one transfer."""
    steps = steps or Steps(model, BatchSettings())
    rows = [_Row(job) for job in jobs]
    max_new = max(r.req.max_tokens for r in rows)
    state, logits = steps.start([r.req.prompt_ids for r in rows], tokenizer.pad_token_id, max_new)  # [batch, vocab]
    k_top = max(r.req.top_logprobs for r in rows)

    for _ in range(max_new):
        choice, fault = _next_tokens(logits, rows, tokenizer.eos_token_id)  # [batch] each, on the device
        raw = logits.log_softmax(-1)  # the untempered distribution: what logprobs report
        columns = [choice, raw.gather(-1, choice[:, None])[:, 0], fault]
        if k_top:
            top_values, top_ids = raw.topk(k_top, dim=-1)  # [batch, k]
            columns += [*top_ids.T, *top_values.T]
        host = torch.stack([c.double() for c in columns], dim=1).tolist()  # the step's one wait on the device
        for r, (token, picked, why, *top) in zip(rows, host, strict=True):
            if r.reason is not None:
                continue
            if r.abort.is_set():
                r.reason = "abort"
                continue
            if why:
                r.fail(FloatingPointError(FAULTS[int(why)]))
                continue
            try:
                tops = ([int(t) for t in top[:k_top]], top[k_top:]) if k_top else None
                r.take(int(token), picked, tops, tokenizer)
                r.report(tokenizer, weight_version)
            except Exception as exc:  # noqa: BLE001 (this sequence fails, the batch goes on)
                r.fail(exc)
        if all(r.reason is not None for r in rows):
            break
        # Finished rows are fed what they drew: their cache rows are never read again.
        logits = state.step(choice)

    return [r.output(tokenizer, weight_version) for r in rows]


FAULTS = {
    1: "the model's logits for this sequence are NaN or infinite",
    2: "this sequence's sampling probabilities are NaN or infinite",
}


def _next_tokens(logits: torch.Tensor, rows: list[_Row], eos: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[batch, vocab] -> ([batch] tokens, [batch] faults), on the logits' device, without waiting on it.

    Greedy rows take the argmax, sampled rows a draw by their own generator, both after the rows'
    repetition penalty and min_tokens (`_penalize`); min_p filters after temperature, top-k and top-p.
    A row whose logits cannot be sampled (NaN, +inf, or nothing finite) gets fault 1, one whose
    filtered probabilities cannot (they overflowed) fault 2, and a token from a harmless stand-in
    distribution: no kernel ever sees a NaN (on CUDA, a multinomial over one is a device-side assert
    that ends the process), and the row fails once the step's results reach the host."""
    broken = (logits.isnan() | logits.isposinf()).any(-1) | logits.isneginf().all(-1)  # [batch]
    fault = broken.to(torch.int8)
    logits = _penalize(logits.masked_fill(broken[:, None], 0.0), rows, eos)
    choice = logits.argmax(-1)
    # Rows sharing (temperature, top_k, top_p, min_p) are filtered and drawn together: usually one group a batch.
    groups: dict[tuple[float, int, float, float], list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        if r.reason is None and not r.greedy:
            groups[(r.req.temperature, r.req.top_k, r.req.top_p, r.req.min_p)].append(i)
    for (temperature, top_k, top_p, min_p), idx in groups.items():
        at = torch.tensor(idx, device=logits.device)
        probs = _filter_logits(logits[at] / temperature, top_k, top_p).softmax(-1)  # [group, vocab]
        if min_p > 0:  # after temperature, as vLLM and HF's MinPLogitsWarper: the likeliest token always stays
            probs = probs.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), 0.0)
        unusable = ~(probs.isfinite().all(-1) & (probs.sum(-1) > 0))
        probs = probs.masked_fill(unusable[:, None], 1.0)
        # Inverse CDF: the first token whose cumulative mass passes u * total, u from the row's generator.
        cum = probs.cumsum(-1)
        u = torch.tensor([rows[i].uniform() for i in idx], device=logits.device, dtype=cum.dtype)
        drawn = torch.searchsorted(cum, (u * cum[:, -1])[:, None], right=True)[:, 0]
        choice[at] = drawn.clamp(max=logits.shape[-1] - 1)
        fault[at] = torch.where(unusable, 2, fault[at]).to(torch.int8)
    return choice, fault


def _penalize(logits: torch.Tensor, rows: list[_Row], eos: int | None) -> torch.Tensor:
    """[batch, vocab] -> [batch, vocab]: each row's repetition penalty (vLLM's and HF's: a token already in
    the prompt or the completion has its logit divided by the penalty where positive, multiplied where
    negative) and its min_tokens (end-of-sequence masked until then). Rows at the neutral values (penalty
    1, min_tokens 0) are left as they are, and a batch of such rows costs nothing."""
    for i, r in enumerate(rows):
        if r.reason is not None:
            continue
        if r.req.repetition_penalty != 1.0:
            seen = torch.zeros(logits.shape[-1], dtype=torch.bool)
            seen[[t for t in (*r.req.prompt_ids, *r.tokens) if 0 <= t < logits.shape[-1]]] = True
            row, penalty = logits[i], r.req.repetition_penalty
            logits[i] = torch.where(seen.to(row.device), torch.where(row > 0, row / penalty, row * penalty), row)
        if eos is not None and len(r.tokens) < r.req.min_tokens and not r.req.ignore_eos:
            logits[i, eos] = float("-inf")
    return logits


def _describe(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
