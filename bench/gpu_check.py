"""One short GPU check: the services and the trainer on one CUDA card, one table, `bench/results/gpu.md`.

    python3 bench/gpu_check.py                  # on a GPU: the sizes below, under 8 minutes on an H100/H200
    .venv/bin/python bench/gpu_check.py         # no GPU: the same run on the CPU with tiny sizes (--cpu-smoke)

Everything is random-init and built in a temporary folder (no hub, no network), on the arithmetic
world's character-level tokenizer:

- **rm_server**: a Llama sequence classifier (~0.3B: hidden 1024, 24 layers) in bf16 on the card.
  The ceiling is `TransformersBackend.pooled` in this process at the best of a few batch sizes,
  with its TFLOP/s and share of the card's dense bf16 peak; served is rm_server over HTTP (one-item
  requests, many in flight, `bench/loadgen.py`'s lean client). Uniform items (512 tokens), and
  score_bench's mixed ones (`bench/mixed_workload.py`: lognormal lengths, p50 377, p90 1,149, max
  2,000 tokens), whose ceiling is the same items in length-sorted batches.
- **policy_server**: a Llama causal LM (~0.5B: hidden 1024, 28 layers), greedy, B prompts at once,
  every sequence generating the same number of tokens (eos ignored): raw `model.generate` at
  batch B against the transformers backend in this process (`HFBackend.generate`, dynamic cache,
  then static cache, then static cache with a compiled step) and served over HTTP (`/v1/completions`).
- **trainer**: `assay train grpo --lora-r 16` on the same 0.5B model, on the card in bf16, against
  the two services (rollouts from policy_server on the card, the `correct` rule from rm_server):
  two steps, the second reported (tokens/s over the step, seconds, peak CUDA memory if the trainer
  reports it).

Each section that fails prints its error in its rows and the others still run. The table is
printed and written, with the date, the machine and the command, to `--out` (default
`bench/results/gpu.md`). How to run it on a bare lease: bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import platform
import random
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from gpu_models import GPU, SMOKE, Sizes, build_llama, forward_flops_per_token, random_text, score_items, weight_params

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/loadgen.py, bench/gpu_models.py
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16, SXM, NVIDIA's datasheets


@dataclass
class Row:
    section: str
    what: str
    value: str
    unit: str = ""
    ratio: str = ""
    note: str = ""


@dataclass(frozen=True)
class Load:
    """What `loadgen.measure` reads of a plan: one window of closed-loop one-item HTTP requests."""

    concurrency: int
    duration_s: float
    procs: int = 2
    warmup_s: float = 2.0
    http_client: str = "raw"
    streams: int = 1


# --- rm_server ---------------------------------------------------------------------------------


def rm_ceiling(path: Path, device: str, dtype: str, items, batches, sort: bool) -> tuple[float, int, float]:
    """(items/s, best batch, tokens/s) of `TransformersBackend.pooled` over `items`."""
    import torch

    from assay.rm_server.backends.hf import TransformersBackend

    backend = TransformersBackend(path, "outcome", device=device, dtype=dtype)
    ids = [backend.tokenizer(p + r)["input_ids"] for _, p, r in items]
    if sort:
        ids.sort(key=len)
    tokens = sum(len(x) for x in ids)
    best = (0.0, 0, 0.0)
    for bs in batches:
        runs = []
        for _ in range(3):  # the first pass warms up (kernels, allocator)
            t0 = time.perf_counter()
            for start in range(0, len(ids), bs):
                backend.pooled(ids[start : start + bs])
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            runs.append(time.perf_counter() - t0)
        seconds = min(runs[1:])
        if len(ids) / seconds > best[0]:
            best = (len(ids) / seconds, bs, tokens / seconds)
    del backend
    return best


def rm_section(sizes: Sizes, device: str, dtype: str, tmp: Path, rm_url: str, server_pid: int, rows: list[Row]) -> None:
    import loadgen
    import mixed_workload

    path = tmp / "rm"
    params = weight_params(path)
    peak = _peak_tflops(device)
    for label, mixed in (("uniform", False), (f"mixed (p50 {sizes.mixed_p50:.0f})", True)):
        if mixed:  # score_bench's mixed workload: the lognormal lengths, scaled to p50
            workload = mixed_workload.Workload(items=sizes.mixed_items, p50=sizes.mixed_p50, max_len=sizes.mixed_max)
            items = mixed_workload.items(workload)
        else:
            items = score_items([sizes.rm_tokens] * sizes.rm_items)
        batches = (sizes.mixed_batch,) if mixed else sizes.rm_batches
        rate, bs, tok_s = rm_ceiling(path, device, dtype, items, batches, sort=mixed)
        how = f"batch {bs}" + (", length-sorted" if mixed else "")
        seq = sizes.rm_tokens if not mixed else int(sizes.mixed_p50)
        tflops = tok_s * forward_flops_per_token(sizes.rm_hidden, sizes.rm_layers, params, seq) / 1e12
        share = f", {tflops / peak:.0%} of {peak:.0f} bf16 peak" if peak else ""
        rows.append(Row("rm_server", f"{label}: ceiling in-process", f"{rate:.0f}", "items/s", "1.00", how))
        if not mixed:
            rows.append(
                Row("rm_server", f"{label}: ceiling TFLOP/s", f"{tflops:.3g}", "TFLOP/s", "", f"{seq} tokens{share}")
            )
        window = loadgen.measure(
            "http",
            rm_url,
            Load(sizes.in_flight, sizes.window_s),  # type: ignore[arg-type]
            items,
            server_pid,
            metrics_url=rm_url,
        )
        note = f"{sizes.in_flight} one-item requests in flight, {window.errors} errors"
        rows.append(
            Row(
                "rm_server",
                f"{label}: served (HTTP)",
                f"{window.items_s:.0f}",
                "items/s",
                f"{window.items_s / rate:.2f}",
                note,
            )
        )


def _peak_tflops(device: str) -> float | None:
    import torch

    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


# --- policy_server -----------------------------------------------------------------------------


def policy_section(sizes: Sizes, device: str, dtype: str, tmp: Path, policy_url: str, rows: list[Row]) -> None:
    import httpx
    import torch

    from assay.checkpoints import load_model
    from assay.policy_server.backends import GenerationRequest
    from assay.policy_server.backends.hf import HFBackend
    from assay.policy_server.config import BatchSettings

    model, tokenizer = load_model(tmp / "lm", "causal_lm", device=device, dtype=dtype)
    rng = random.Random(1)
    # One token per character plus <s>: every prompt is gen_prompt tokens, so no row is padded.
    prompts = [tokenizer(random_text(sizes.gen_prompt - 1, rng))["input_ids"] for _ in range(sizes.gen_batch)]
    tokens = sizes.gen_batch * sizes.gen_tokens  # every sequence generates them all (eos ignored)

    def timed(run) -> float:
        """Tokens/s: the median of 3 runs after one warm-up (kernels, allocator, compilation)."""
        runs = []
        for _ in range(4):
            t0 = time.perf_counter()
            run()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            runs.append(tokens / (time.perf_counter() - t0))
        return sorted(runs[1:])[1]

    def raw() -> None:
        ids = torch.tensor(prompts, device=model.device)
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=sizes.gen_tokens,
                min_new_tokens=sizes.gen_tokens,
                pad_token_id=tokenizer.pad_token_id,
            )
        assert out.shape == (sizes.gen_batch, sizes.gen_prompt + sizes.gen_tokens)

    requests = [GenerationRequest(p, max_tokens=sizes.gen_tokens, temperature=0.0, ignore_eos=True) for p in prompts]

    def backend_rate(settings: BatchSettings) -> float:
        backend = HFBackend("policy", model, tokenizer, settings)
        loop = asyncio.new_event_loop()
        loop.run_until_complete(backend.start())

        def run() -> None:
            outs = loop.run_until_complete(backend.generate(requests))
            assert sum(len(o.token_ids) for o in outs) == tokens

        try:
            return timed(run)
        finally:
            loop.run_until_complete(backend.close())
            loop.close()

    def served() -> None:
        body = {"model": "policy", "prompt": prompts, "max_tokens": sizes.gen_tokens, "temperature": 0.0}
        reply = httpx.post(f"{policy_url}/v1/completions", json={**body, "ignore_eos": True}, timeout=600)
        reply.raise_for_status()
        assert reply.json()["usage"]["completion_tokens"] == tokens

    base = timed(raw)
    note = f"batch {sizes.gen_batch}, {sizes.gen_prompt} prompt + {sizes.gen_tokens} new tokens, greedy"
    rows.append(Row("policy_server", "raw model.generate", f"{base:.0f}", "tokens/s", "1.00", note))
    one_batch = dict(
        max_sequences=sizes.gen_batch, max_tokens=tokens + sizes.gen_batch * sizes.gen_prompt, max_wait_s=0.05
    )
    variants = [("HFBackend, dynamic cache", BatchSettings(**one_batch))]
    variants.append(("HFBackend, static cache", BatchSettings(**one_batch, kv_cache="static")))
    if sizes.compile:
        variants.append(("HFBackend, static + compile", BatchSettings(**one_batch, kv_cache="static", compile=True)))
    for label, settings in variants:
        try:
            rate = backend_rate(settings)
            rows.append(Row("policy_server", label, f"{rate:.0f}", "tokens/s", f"{rate / base:.2f}", "in-process"))
        except Exception as exc:  # noqa: BLE001 (one variant failing leaves the others' rows)
            rows.append(_failed("policy_server", label, exc))
    rate = timed(served)
    rows.append(
        Row(
            "policy_server",
            "served (HTTP /v1/completions)",
            f"{rate:.0f}",
            "tokens/s",
            f"{rate / base:.2f}",
            "dynamic cache, one request",
        )
    )


# --- trainer -----------------------------------------------------------------------------------


# `assay train grpo` as its command line runs it, in a process that writes its peak memory as it exits:
# torch's peak CUDA allocation on a GPU, the process's peak resident memory on the CPU.
MEASURED_TRAIN = """
import json, resource, runpy, sys, torch
out = sys.argv.pop(1)
sys.argv[0] = "assay"
try:
    runpy.run_module("assay", run_name="__main__")
finally:
    on_cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    peak = torch.cuda.max_memory_allocated() if on_cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    open(out, "w").write(json.dumps({"peak_bytes": peak, "what": "CUDA allocated" if on_cuda else "CPU resident"}))
"""


def grpo_section(
    sizes: Sizes, device: str, dtype: str, tmp: Path, rm_url: str, policy_url: str, rows: list[Row]
) -> None:
    run_dir, peak_file = tmp / "grpo", tmp / "grpo_peak.json"
    cmd = [sys.executable, "-c", MEASURED_TRAIN, str(peak_file), "train", "grpo", "--model", str(tmp / "lm")]
    cmd += ["--run-dir", str(run_dir), "--rm-url", rm_url, "--policy-url", policy_url, "--reward", "correct"]
    cmd += [
        "--steps",
        "2",
        "--lora-r",
        "16",
        "--device",
        device,
        "--dtype",
        dtype,
        "--max-tokens",
        str(sizes.grpo_tokens),
    ]
    cmd += ["--prompts-per-step", str(sizes.grpo_prompts), "--group-size", str(sizes.grpo_group)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"assay train grpo exited {done.returncode}: {(done.stdout + done.stderr)[-800:]}")
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = [m for m in steps if "tokens_per_s" in m][-1]
    peak = json.loads(peak_file.read_text())
    note = f"{sizes.grpo_prompts} x {sizes.grpo_group} samples, <= {sizes.grpo_tokens} tokens, LoRA r 16"
    note += f", step {last['step']}"
    rows.append(Row("trainer", "GRPO step, LoRA", f"{last['tokens_per_s']:.0f}", "tokens/s", "", note))
    rows.append(Row("trainer", "GRPO step, seconds", f"{last['seconds']:.2f}", "s", "", _phases(last)))
    rows.append(
        Row("trainer", "peak memory", f"{peak['peak_bytes'] / 1e9:.2f}", "GB", "", f"{peak['what']}, whole run")
    )


def _phases(metrics: dict) -> str:
    return ", ".join(
        f"{k.removesuffix('_s')} {metrics[k]:.2f}"
        for k in ("rollout_s", "reward_s", "train_s", "push_s")
        if k in metrics
    )


# --- the run -----------------------------------------------------------------------------------


def _failed(section: str, what: str, exc: BaseException) -> Row:
    traceback.print_exception(exc)
    lines = str(exc).strip().splitlines()
    return Row(section, what, "failed", "", "", f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:200])


def write_spec(tmp: Path, device: str, dtype: str, sizes: Sizes) -> Path:
    """The embedded `correct` rule (the GRPO step's reward) and the big classifier as `orm` (loadgen's name)."""
    import yaml

    from assay.services import EMBEDDED_SPEC

    embedded = yaml.safe_load(EMBEDDED_SPEC.read_text())["rewards"]
    orm = {
        "type": "model.outcome",
        "path": str(tmp / "rm"),
        "device": device,
        "dtype": dtype,
        "max_tokens": sizes.mixed_max + 8,
        "max_batch_items": max(sizes.rm_batches),
    }
    spec = tmp / "spec.yaml"
    spec.write_text(json.dumps({"rewards": {"correct": embedded["correct"], "orm": orm}}))  # JSON is YAML
    return spec


def machine(device: str) -> str:
    import torch
    import transformers

    where = (
        torch.cuda.get_device_name()
        if device.startswith("cuda")
        else f"CPU ({platform.processor() or platform.machine()})"
    )
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    return f"{where}, {versions}, Python {platform.python_version()}"


def table(rows: list[Row]) -> str:
    head = ["section", "what", "value", "unit", "x baseline", "note"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---:|---|---:|---|"]
    lines += [f"| {r.section} | {r.what} | {r.value} | {r.unit} | {r.ratio} | {r.note} |" for r in rows]
    return "\n".join(lines)


def run(sizes: Sizes, device: str, out: Path, command: str) -> list[Row]:
    import torch

    from assay.services import LocalServices

    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    if device == "cpu":  # the servers decode on one thread each (LocalServices): so does this process
        torch.set_num_threads(1)
    started = time.perf_counter()
    rows: list[Row] = []
    # Every process runs in the temporary folder: started in the repository's root, `python -m assay...`
    # would import the source folder `assay/` ahead of an installed Assay (a lease's --target install).
    with tempfile.TemporaryDirectory(prefix="assay-gpu-check-") as name, contextlib.chdir(name):
        tmp = Path(name)
        build_llama(tmp / "rm", "classifier", sizes.rm_hidden, sizes.rm_layers)
        build_llama(tmp / "lm", "causal_lm", sizes.lm_hidden, sizes.lm_layers)
        policy_args = ["--model", str(tmp / "lm"), "--model-name", "policy", "--device", device, "--dtype", dtype]
        with LocalServices.start(spec=write_spec(tmp, device, dtype, sizes), policy_args=policy_args) as services:
            sections = (
                (
                    "rm_server",
                    lambda: rm_section(sizes, device, dtype, tmp, services.rm_url, services.rm.proc.pid, rows),
                ),
                ("policy_server", lambda: policy_section(sizes, device, dtype, tmp, services.policy_url, rows)),
                (
                    "trainer",
                    lambda: grpo_section(sizes, device, dtype, tmp, services.rm_url, services.policy_url, rows),
                ),
            )
            print(f"models built and services ready: {time.perf_counter() - started:.0f} s", flush=True)
            for section, body in sections:
                t0 = time.perf_counter()
                try:
                    body()
                except Exception as exc:  # noqa: BLE001 (a failed section is a row; the others still run)
                    rows.append(_failed(section, "section", exc))
                print(f"{section}: {time.perf_counter() - t0:.0f} s", flush=True)
    seconds = time.perf_counter() - started
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = (
        f"# GPU check\n\n{when}, {machine(device)}, {dtype}; `{command}`, {seconds:.0f} s.\n\n"
        f"{table(rows)}\n\nWhat each row is: the docstring of `bench/gpu_check.py`.\n"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return rows


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (automatic without CUDA)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu.md")
    args = ap.parse_args()
    on_gpu = torch.cuda.is_available() and not args.cpu_smoke
    command = " ".join(["python", *sys.argv])
    rows = run(GPU if on_gpu else SMOKE, "cuda" if on_gpu else "cpu", args.out.resolve(), command)
    sys.exit(1 if any(r.value == "failed" for r in rows) else 0)


if __name__ == "__main__":
    main()
