"""The mixed-length workload of `score_bench.py --workload mixed`: reward traffic of many lengths.

Real reward traffic mixes short and long responses. The items here have lognormal lengths like
the issue's (p50 377, p90 1,149, max 2,000 tokens: mu = ln 377, sigma = ln(1149/377) / 1.2816),
and are scored by a random-init Llama classifier (4 layers, hidden 128 like the embedded ORM,
2,048 positions) saved
in a temporary folder, so nothing comes from a hub. The tokenizer is the arithmetic world's
character-level one (one token per character, `<s>` first), so an item of L tokens is L - 1
characters of the world's worked solutions strung together; every item starts at its own place
in that text, so all are distinct.

The ceiling rows score the same items through the service's backend
(`TransformersBackend.pooled`) in batches formed four ways: 32 at a time in arrival order (what
a batcher that ignores length does when the queue holds them all), 32 at a time sorted by
length, by the service's own rule (`assay.base.batcher.form_batches`, the whole list queued
at once), and one at a time. A row scores its batches in a shuffled order (seeded) until all are
done or its time is up, so a row cut short still holds a fair sample of its batches; the table
says what share of the items each row covered. A row cut short may have drawn longer or shorter
items than the average, so its items/s is its tokens/s over the mean length of all the items
(the same as items/s when it covered them all). `padded` is the tokens a padded forward computes
over the real ones.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "arith" / "checkpoints" / "orm"  # character-level: tokens = characters + <s>


@dataclass(frozen=True)
class Workload:
    """How many items, how long, and the model that scores them."""

    items: int = 512
    p50: float = 377.0  # tokens
    sigma: float = math.log(1149 / 377) / 1.2816  # p90 1,149 tokens
    max_len: int = 2000  # lengths are clipped to [16, max_len]
    layers: int = 4
    hidden: int = 128
    positions: int = 2048
    batch: int = 32  # the ceiling's fixed batch size (arrival-order and sorted rows)
    row_s: float = 40.0  # most seconds a ceiling row runs
    seed: int = 0


QUICK = Workload(items=256, row_s=10.0)
# The test's size: the same shape of lengths an eighth as long, on a smaller model.
SMOKE = Workload(items=64, p50=377 / 8, max_len=250, layers=2, hidden=64, positions=256, batch=8, row_s=1.0)


def lengths(w: Workload) -> list[int]:
    rng = random.Random(w.seed)
    return [min(w.max_len, max(16, round(rng.lognormvariate(math.log(w.p50), w.sigma)))) for _ in range(w.items)]


def describe(lens: list[int]) -> str:
    s = sorted(lens)
    q = lambda p: s[min(len(s) - 1, int(p * len(s)))]
    return f"{len(s)} items, lengths p50 {q(0.5)}, p90 {q(0.9)}, max {s[-1]} tokens"


def build_model(folder: Path, w: Workload) -> Path:
    """A random-init `LlamaForSequenceClassification` (1 logit) and the character tokenizer, saved."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    tokenizer.model_max_length = w.positions
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=w.hidden,
        intermediate_size=4 * w.hidden,
        num_hidden_layers=w.layers,
        num_attention_heads=max(1, w.hidden // 32),
        max_position_embeddings=w.positions,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(w.seed)
    path = folder / "mixed-orm"
    LlamaForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def items(w: Workload) -> list[tuple[str, str, str]]:
    """(id, prompt, response): a problem's prompt, then worked solutions up to the item's length."""
    from assay.arith.world import take

    problems = take("train", 256, seed=w.seed)
    text = " ".join(p.prompt + p.solution for p in problems)
    while len(text) < 2 * w.max_len:
        text += " " + text
    rng = random.Random(w.seed + 1)
    out = []
    for k, n in enumerate(lengths(w)):
        start = rng.randrange(len(text) - n)
        chars = text[start : start + n - 1]  # + <s> = n tokens
        cut = min(len(chars) // 2, 24)
        out.append((f"m{k}", chars[:cut], chars[cut:]))
    return out


# --- ceiling rows ------------------------------------------------------------------------------


@dataclass
class CeilingRow:
    name: str
    items_s: float
    covered: float  # share of the items scored before the row's time was up
    padded: float  # padded tokens / real tokens over the batches scored
    mean_batch: float


def ceiling_rows(backend, ids: list[list[int]], w: Workload, max_batch_tokens: int) -> list[CeilingRow]:
    from assay.base.batcher import form_batches

    n, lens = len(ids), [len(x) for x in ids]
    by_length = sorted(range(n), key=lens.__getitem__)
    forms = {
        f"batches of {w.batch}, arrival order": [list(range(s, min(n, s + w.batch))) for s in range(0, n, w.batch)],
        f"batches of {w.batch}, length-sorted": [by_length[s : s + w.batch] for s in range(0, n, w.batch)],
        f"batcher's rule (max {w.batch} items, {max_batch_tokens} padded tokens)": list(
            form_batches(lens, w.batch, max_batch_tokens)
        ),
        "one at a time": [[k] for k in range(n)],
    }
    backend.pooled([ids[k] for k in by_length[: w.batch]])  # warm-up: allocator, kernels
    return [_row(name, backend, ids, batches, w) for name, batches in forms.items()]


def _row(name: str, backend, ids: list[list[int]], batches: list[list[int]], w: Workload) -> CeilingRow:
    order = batches[:]
    random.Random(w.seed).shuffle(order)
    done = real = padded = ran = 0
    start = time.perf_counter()
    for batch in order:
        rows = [ids[k] for k in batch]
        backend.pooled(rows)
        done, ran = done + len(rows), ran + 1
        real += sum(len(r) for r in rows)
        padded += len(rows) * max(len(r) for r in rows)
        if time.perf_counter() - start > w.row_s:
            break
    mean_len = sum(len(x) for x in ids) / len(ids)
    rate = real / (time.perf_counter() - start) / mean_len
    return CeilingRow(name, rate, done / len(ids), padded / real, done / ran)
