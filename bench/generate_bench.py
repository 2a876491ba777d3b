"""Generation throughput: the policy server's backends against raw `model.generate`, same prompts, same batch.

    .venv/bin/python bench/generate_bench.py                          # embedded policy, greedy and sampled
    .venv/bin/python bench/generate_bench.py --model random --served  # a random-init 4x512 Llama, + HTTP row
    python bench/generate_bench.py --device cuda --dtype bfloat16 --model random --hidden 1024 --layers 24 --compile
    /path/to/venv-with-vllm/bin/python bench/generate_bench.py   # adds the vLLM row (Assay installed there, --no-deps)

All in this process but the served row, 1 torch thread on the CPU (each backend decodes on one
thread; vLLM's worker is a process of its own, also one thread on CPU): P held-out prompts, one
sequence each, up to T new tokens, sent together, greedy and sampled (T=1.0, each sequence its own
seed):

- raw `model.generate`: transformers' own loop, in batches of the backend's batch cap B
  (left-padded, its default dynamic KV cache), the floor of what any transformers server can do;
- transformers backend: `HFBackend.generate`, the policy server's batcher and decode loop, with
  the dynamic cache, with the static one (`--kv-cache static`), and with a compiled step too
  (`--compile`, worth it on CUDA only);
- served: `POST /v1/completions` with all P prompts, to `assay policy serve` started here on the
  same checkpoint, device and dtype (`--served`);
- vLLM backend: `VllmBackend.generate` (AsyncLLM; continuous batching), where vllm imports.

Tokens/s counts generated tokens (eos included, padding after eos not) over wall time; each row
is the median of R repeats, taken in turns so that machine noise falls on every row alike.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64, help="B: the backend's batch cap and raw generate's batch")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", choices=["embedded", "random"], default="embedded")
    ap.add_argument("--hidden", type=int, default=512, help="random model: hidden size")
    ap.add_argument("--layers", type=int, default=4, help="random model: layers")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--compile", action="store_true", help="add a row: static cache and a compiled step")
    ap.add_argument("--served", action="store_true", help="add a row: the policy server over HTTP")
    ap.add_argument("--no-vllm", action="store_true", help="skip the vLLM row even where vllm imports")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="assay-generate-bench-") as tmp:
        asyncio.run(run(args, Path(tmp)))


async def run(args: argparse.Namespace, tmp: Path) -> None:
    import importlib.util

    import torch

    from assay.arith import world
    from assay.checkpoints import EMBEDDED, load_model
    from assay.policy_server.backends import GenerationRequest
    from assay.policy_server.backends.hf import HFBackend
    from assay.policy_server.config import BatchSettings

    torch.set_num_threads(1)
    if args.model == "embedded":
        path = Path(EMBEDDED["policy"][1])
    else:
        from gpu_models import build_llama

        path = build_llama(tmp / "random", "causal_lm", args.hidden, args.layers)
    model, tokenizer = load_model(path, "causal_lm", device=args.device, dtype=args.dtype)
    texts = [p.prompt for p in world.eval_problems(args.prompts)]
    ids = [tokenizer(t)["input_ids"] for t in texts]
    cap = BatchSettings(max_sequences=args.batch, max_tokens=args.batch * (max(map(len, ids)) + args.max_tokens))
    backends = {
        "transformers backend": HFBackend("policy", model, tokenizer, cap),
        "  static cache": HFBackend("policy", model, tokenizer, BatchSettings(**{**vars(cap), "kv_cache": "static"})),
    }
    if args.compile:
        compiled = BatchSettings(**{**vars(cap), "kv_cache": "static", "compile": True})
        backends["  static cache, compiled step"] = HFBackend("policy", model, tokenizer, compiled)
    if not args.no_vllm and importlib.util.find_spec("vllm") is not None:
        from assay.policy_server.backends.vllm import VllmBackend

        backends["vLLM backend"] = VllmBackend("policy", path)
    services = None
    if args.served:  # started first: a server that fails to start leaves no backend running
        from assay.services import LocalServices

        policy_args = ["--model", str(path), "--model-name", "policy", "--device", args.device, "--dtype", args.dtype]
        services = LocalServices.start(policy_args=[*policy_args, "--max-batch", str(args.batch)])
    for b in backends.values():
        await b.start()

    def raw(sampled: bool) -> int:
        tokenizer.padding_side = "left"
        generated = 0
        with torch.inference_mode():
            for start in range(0, len(texts), args.batch):
                batch = tokenizer(texts[start : start + args.batch], return_tensors="pt", padding=True).to(args.device)
                out = model.generate(
                    **batch,
                    do_sample=sampled,
                    temperature=1.0 if sampled else None,
                    top_k=0 if sampled else None,
                    max_new_tokens=args.max_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                )
                new = out[:, batch["input_ids"].shape[1] :]
                for row in new.tolist():  # up to and including eos; padding after it is not generated
                    eos = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
                    generated += eos
        return generated

    async def backend_run(backend, sampled: bool) -> int:
        temperature = 1.0 if sampled else 0.0
        requests = [
            GenerationRequest(i, max_tokens=args.max_tokens, temperature=temperature, seed=s) for s, i in enumerate(ids)
        ]
        outs = await backend.generate(requests)
        return sum(len(o.token_ids) for o in outs)

    def served(sampled: bool) -> int:
        import httpx

        body = {"model": "policy", "prompt": ids, "max_tokens": args.max_tokens, "temperature": 1.0 if sampled else 0.0}
        reply = httpx.post(f"{services.policy_url}/v1/completions", json={**body, "seed": 0}, timeout=600)
        reply.raise_for_status()
        return reply.json()["usage"]["completion_tokens"]

    labels = ["raw model.generate", *backends] + (["served (HTTP)"] if services else [])
    modes = ("greedy", "sampled")
    rows: dict[tuple[str, str], list[float]] = {(m, label): [] for m in modes for label in labels}
    try:
        for r in range(args.repeats + 1):  # the first round warms up and is not counted
            for mode, label in rows:
                sampled = mode == "sampled"
                t0 = time.perf_counter()
                if label == "raw model.generate":
                    tokens = raw(sampled)
                elif label == "served (HTTP)":
                    tokens = served(sampled)
                else:
                    tokens = await backend_run(backends[label], sampled)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                if r:
                    rows[mode, label].append(tokens / (time.perf_counter() - t0))
    finally:
        for b in backends.values():
            await b.close()
        if services:
            services.stop()

    what = "embedded policy" if args.model == "embedded" else f"random Llama {args.hidden}x{args.layers}"
    table = Table(
        title=f"Generation throughput: {args.prompts} prompts x 1 sample, batch {args.batch}, <= {args.max_tokens} new "
        f"tokens, {what}, {args.device} {args.dtype}, 1 torch thread, median of {args.repeats}"
    )
    for col in ("mode", "path", "tokens/s", "x raw generate", "runs"):
        table.add_column(col, justify="left" if col in ("mode", "path") else "right")
    for (mode, label), xs in rows.items():
        med, base = statistics.median(xs), statistics.median(rows[mode, "raw model.generate"])
        table.add_row(mode, label, f"{med:.0f}", f"{med / base:.2f}", " ".join(f"{x:.0f}" for x in xs))
    if "vLLM backend" not in backends:
        table.caption = "no vLLM row: vllm does not import in this environment"
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
