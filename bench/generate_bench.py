"""Generation throughput: the policy server's backends against raw `model.generate`, same prompts.

    .venv/bin/python bench/generate_bench.py                      # transformers rows only
    /path/to/venv-with-vllm/bin/python bench/generate_bench.py   # adds the vLLM row (Assay installed there, --no-deps)

All in this process, on the embedded policy, 1 torch thread (each backend decodes on one
thread; vLLM's worker is a process of its own, also one thread on CPU): P held-out prompts, one
sequence each, sampled at T=1.0 with up to 48 new tokens, sent together:

- raw `model.generate`: transformers' own loop, in batches of the backend's batch cap
  (left-padded, KV cache), the floor of what any transformers server can do;
- transformers backend: `HFBackend.generate`, the policy server's batcher and decode loop;
- vLLM backend: `VllmBackend.generate` (AsyncLLM; continuous batching), where vllm imports.

Tokens/s counts generated tokens (eos included, padding after eos not) over wall time; each row
is the median of R repeats, taken in turns so that machine noise falls on every row alike.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MAX_TOKENS = 48
BATCH = 64


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-vllm", action="store_true", help="skip the vLLM row even where vllm imports")
    args = ap.parse_args()
    asyncio.run(run(args.prompts, args.repeats, not args.no_vllm))


async def run(prompts: int, repeats: int, want_vllm: bool) -> None:
    import importlib.util

    import torch

    from assay.arith import world
    from assay.checkpoints import EMBEDDED, load_model
    from assay.policy_server.backends import GenerationRequest
    from assay.policy_server.backends.hf import HFBackend
    from assay.policy_server.config import BatchSettings

    torch.set_num_threads(1)
    path = EMBEDDED["policy"][1]
    model, tokenizer = load_model(path, "causal_lm")
    texts = [p.prompt for p in world.eval_problems(prompts)]
    ids = [tokenizer(t)["input_ids"] for t in texts]
    requests = [GenerationRequest(i, max_tokens=MAX_TOKENS, temperature=1.0, seed=s) for s, i in enumerate(ids)]

    backends = {"transformers backend": HFBackend("policy", model, tokenizer, BatchSettings(max_sequences=BATCH))}
    if want_vllm and importlib.util.find_spec("vllm") is not None:
        from assay.policy_server.backends.vllm import VllmBackend

        backends["vLLM backend"] = VllmBackend("policy", path)
    for b in backends.values():
        await b.start()

    def raw() -> int:
        tokenizer.padding_side = "left"
        generated = 0
        with torch.inference_mode():
            for start in range(0, len(texts), BATCH):
                batch = tokenizer(texts[start : start + BATCH], return_tensors="pt", padding=True)
                out = model.generate(
                    **batch,
                    do_sample=True,
                    temperature=1.0,
                    top_k=0,
                    max_new_tokens=MAX_TOKENS,
                    pad_token_id=tokenizer.pad_token_id,
                )
                new = out[:, batch["input_ids"].shape[1] :]
                for row in new.tolist():  # up to and including eos; padding after it is not generated
                    eos = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
                    generated += eos
        return generated

    async def served(backend) -> int:
        outs = await backend.generate(requests)
        return sum(len(o.token_ids) for o in outs)

    rows: dict[str, list[float]] = {"raw model.generate": [], **{k: [] for k in backends}}
    for r in range(repeats + 1):  # the first round warms up and is not counted
        for label in rows:
            t0 = time.perf_counter()
            tokens = raw() if label == "raw model.generate" else await served(backends[label])
            if r:
                rows[label].append(tokens / (time.perf_counter() - t0))
    for b in backends.values():
        await b.close()

    base = statistics.median(rows["raw model.generate"])
    table = Table(
        title=f"Generation throughput: {prompts} prompts x 1 sample, <= {MAX_TOKENS} new tokens, T=1.0, "
        f"embedded policy, 1 torch thread, median of {repeats}"
    )
    for col in ("path", "tokens/s", "x raw generate", "runs"):
        table.add_column(col, justify="left" if col == "path" else "right")
    for label, xs in rows.items():
        med = statistics.median(xs)
        table.add_row(label, f"{med:.0f}", f"{med / base:.2f}", " ".join(f"{x:.0f}" for x in xs))
    if "vLLM backend" not in backends:
        table.caption = "no vLLM row: vllm does not import in this environment"
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
