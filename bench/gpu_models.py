"""Sizes, random-init models and items for `gpu_check.py` (models: `generate_bench.py` too): nothing from a hub.

Every model is a Llama on the arithmetic world's character-level tokenizer (one token per character,
`<s>` first), so an item or prompt of L tokens is L - 1 characters, and sizes are set exactly.
"""

from __future__ import annotations

import math
import random
import shutil
from dataclasses import dataclass, replace
from pathlib import Path


@dataclass(frozen=True)
class Sizes:
    """Everything the run's length depends on; `GPU` fits a lease, `SMOKE` a test on a loaded CPU."""

    rm_hidden: int = 1024
    rm_layers: int = 24
    rm_items: int = 1024
    rm_tokens: int = 512
    rm_batches: tuple[int, ...] = (64, 128, 256)
    mixed_items: int = 512
    mixed_p50: float = 377.0
    mixed_max: int = 2000
    mixed_batch: int = 32
    in_flight: int = 256
    window_s: float = 10.0
    lm_hidden: int = 1024
    lm_layers: int = 28
    gen_batch: int = 64
    gen_prompt: int = 64
    gen_tokens: int = 128
    compile: bool = True
    grpo_prompts: int = 16
    grpo_group: int = 8
    grpo_tokens: int = 64


GPU = Sizes()
SMOKE = replace(
    GPU,
    rm_hidden=64,
    rm_layers=2,
    rm_items=32,
    rm_tokens=64,
    rm_batches=(8, 32),
    mixed_items=32,
    mixed_p50=40.0,
    mixed_max=200,
    mixed_batch=8,
    in_flight=8,
    window_s=2.0,
    lm_hidden=64,
    lm_layers=2,
    gen_batch=4,
    gen_prompt=16,
    gen_tokens=8,
    compile=False,
    grpo_prompts=2,
    grpo_group=2,
    grpo_tokens=8,
)


def build_llama(out: Path, kind: str, hidden: int, layers: int, positions: int = 2048) -> Path:
    """A random-init Llama (`causal_lm` or `classifier`, one label) on the arithmetic tokenizer, in `out`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from assay.checkpoints import EMBEDDED

    src = Path(EMBEDDED["policy"][1])
    tokenizer = AutoTokenizer.from_pretrained(src)
    heads = max(1, hidden // 64)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=int(hidden * 8 / 3 / 64 + 1) * 64 if hidden >= 256 else 4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        num_labels=1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    cls = LlamaForCausalLM if kind == "causal_lm" else LlamaForSequenceClassification
    cls(config).save_pretrained(out)
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.suffix == ".jinja":
            shutil.copy(f, out / f.name)
    return out


def random_text(n_chars: int, rng: random.Random) -> str:
    """Characters of the arithmetic world's alphabet: `n_chars` tokens, `n_chars + 1` with `<s>`."""
    return "".join(rng.choice("0123456789+-= #") for _ in range(n_chars))


def score_items(lengths: list[int], seed: int = 0) -> list[tuple[str, str, str]]:
    """(id, prompt, response) items of these token counts (prompt "Q: " and `<s>` included), all distinct."""
    rng = random.Random(seed)
    return [(str(i), "Q: ", random_text(n - 4, rng)) for i, n in enumerate(lengths)]


def forward_flops_per_token(hidden: int, layers: int, params: int, seq: int) -> float:
    """2 x the weights' parameters (a multiply-add each), plus attention's scores and mix (4 x seq x hidden a layer)."""
    return 2 * params + 4 * layers * seq * hidden


def weight_params(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if "embed_tokens" not in k)  # noqa: SIM118 (safe_open has no __iter__)
