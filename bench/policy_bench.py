"""The policy service's benchmarks: /v1/search overhead, and weight-update speed.

    .venv/bin/python bench/policy_bench.py search     # best-of-16 over HTTP vs its parts in-process
    .venv/bin/python bench/policy_bench.py weights    # full-checkpoint pushes: seconds and MB/s
    .venv/bin/python bench/policy_bench.py adapter    # full weights vs a LoRA adapter: bytes and seconds per push
    .venv/bin/python bench/policy_bench.py stream     # one completion request as one response vs streamed
    .venv/bin/python bench/policy_bench.py all [--quick]

search: `POST /v1/search` (best-of-16, outcome RM, 48 tokens, T=1.0) on both services started as
subprocesses (`assay.services`), one search at a time, against the sum of its parts measured in
this process with the servers' own code and no HTTP: the 16 completions through the transformers
backend (`HFBackend.generate`, the same seeds), then the 16 scores through rm_server's serving
layer (`RewardService.score`). Each problem is measured both ways, alternating, so machine noise
falls on both; the table gives medians and the overhead ratio median(search) / median(parts) - 1.

weights: full state dicts pushed with `PolicyClient.update_weights` (safetensors over HTTP,
checked and swapped in), and the same from the server's disk (`load_weights`), for the embedded
policy (4 MB) and for a randomly initialised 806 MB model (201M parameters, float32) of the same family served by
its own server, so the per-byte cost shows. Seconds are the client's wall clock, request to reply.

adapter: the same models, full state dicts (`update_weights`) and a LoRA adapter (r 16, every
linear layer but the head, `update_adapter`) pushed in turn to one server: the bytes sent, and the
seconds, of which the adapter's include the server merging W + alpha / r * B @ A for every layer.

stream: the same completions request (16 sequences of 48 tokens, one seed, `ignore_eos`) to the
embedded policy served in this process (one torch thread), answered as one JSON response and
streamed (`stream: true`, read with httpx to `[DONE]`), alternating; medians of the wall clock,
and of the first event's arrival.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
console = Console(width=140)


# --- /v1/search overhead ----------------------------------------------------------------------


def search_overhead(problems: int, n: int = 16) -> Table:
    import torch

    from assay.arith import world
    from assay.checkpoints import EMBEDDED
    from assay.clients.policy import PolicyClient
    from assay.policy_server.backends import GenerationRequest
    from assay.policy_server.backends.hf import HFBackend
    from assay.rm_server.protocol import ScoreItem, ScoreRequest
    from assay.rm_server.rewards import build_rewards
    from assay.rm_server.serving import RewardService
    from assay.rm_server.spec import load_spec
    from assay.services import LocalServices

    torch.set_num_threads(1)
    tasks = world.eval_problems(problems)
    rewards = build_rewards(load_spec())
    scoring = RewardService({"orm": rewards["orm"]})
    backend = HFBackend.load("policy", EMBEDDED["policy"][1])
    loop = asyncio.new_event_loop()
    loop.run_until_complete(scoring.start())
    loop.run_until_complete(backend.start())

    def parts(prompt: str, seed: int) -> tuple[float, float]:
        ids = backend.encode(prompt)
        t0 = time.perf_counter()
        outs = loop.run_until_complete(
            backend.generate([GenerationRequest(ids, max_tokens=48, temperature=1.0, seed=seed + j) for j in range(n)])
        )
        t1 = time.perf_counter()
        items = [ScoreItem(id=str(j), prompt=prompt, response=o.text) for j, o in enumerate(outs)]
        reply = loop.run_until_complete(scoring.score(ScoreRequest(reward="orm", items=items)))
        assert all(r.error is None for r in reply.results)
        return t1 - t0, time.perf_counter() - t1

    gen_s, score_s, search_s = [], [], []
    with LocalServices.start() as services, PolicyClient.http(services.policy_url) as client:
        for i, task in enumerate([tasks[0]] * 3 + tasks):  # three warm-up rounds, not counted
            g, s = parts(task.prompt, seed=i)
            t0 = time.perf_counter()
            res = client.search(task.prompt, strategy="best_of_n", n=n, reward="orm", seed=i, max_tokens=48)
            took = time.perf_counter() - t0
            assert len(res.candidates) == n and res.reward == "orm"
            if i >= 3:
                gen_s.append(g), score_s.append(s), search_s.append(took)
    loop.run_until_complete(backend.close())
    loop.run_until_complete(scoring.close())
    parts_s = [g + s for g, s in zip(gen_s, score_s)]
    table = Table(
        title=f"/v1/search best-of-{n} (outcome RM) vs its parts in-process, {problems} problems, "
        "one at a time, medians"
    )
    for col in ("what", "median ms", "p90 ms"):
        table.add_column(col, justify="left" if col == "what" else "right")
    for label, xs in (
        ("generate 16 (HFBackend, in-process)", gen_s),
        ("score 16 (RewardService, in-process)", score_s),
        ("parts: generate + score", parts_s),
        ("POST /v1/search over HTTP", search_s),
    ):
        table.add_row(label, f"{1000 * statistics.median(xs):.1f}", f"{1000 * _p90(xs):.1f}")
    overhead = statistics.median(search_s) / statistics.median(parts_s) - 1
    paired = statistics.median(s / p - 1 for s, p in zip(search_s, parts_s))
    table.caption = (
        f"orchestration overhead: {overhead:+.1%} (ratio of medians), {paired:+.1%} (median of "
        f"per-problem ratios); target <= +25%"
    )
    return table


def _p90(xs: list[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(0.9 * (len(s) - 1)))]


# --- weight updates ----------------------------------------------------------------------------


def big_checkpoint(out: Path, hidden: int = 1024, layers: int = 12) -> Path:
    """A random model of the embedded policy's family (201M parameters, 806 MB float32), with its tokenizer."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    from assay.checkpoints import EMBEDDED

    src = EMBEDDED["policy"][1]
    config = AutoConfig.from_pretrained(src)
    config.update(
        {
            "hidden_size": hidden,
            "intermediate_size": 4 * hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": 16,
            "num_key_value_heads": 16,
            "head_dim": hidden // 16,
        }
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.suffix == ".jinja":
            shutil.copy(f, out / f.name)
    return out


def bench_models(tmp: Path, big: bool) -> list[tuple[str, Path]]:
    """(label, checkpoint) of the policies the weight benches push to: the embedded one, and with `big`
    a random-init 201M-parameter one built in `tmp`."""
    from assay.checkpoints import EMBEDDED

    models = [("embedded policy", Path(EMBEDDED["policy"][1]))]
    if big:
        models.append(("random 1024x12", big_checkpoint(tmp / "big")))
    return models


def weight_updates(repeats: int, big: bool) -> Table:
    from safetensors.torch import load_file

    from assay.clients.policy import PolicyClient
    from assay.services import LocalServices

    table = Table(title="Full-checkpoint weight updates (client wall clock, request to reply)")
    for col in ("model", "MB", "way in", "median s", "MB/s", "server s (median)"):
        table.add_column(col, justify="left" if col in ("model", "way in") else "right")
    with tempfile.TemporaryDirectory() as tmp:
        models = bench_models(Path(tmp), big)
        for label, path in models:
            state = load_file(path / "model.safetensors")
            size = sum(t.numel() * t.element_size() for t in state.values()) / 1e6
            args = ["--weights-dir", str(path)] + ([] if label == "embedded policy" else ["--model", str(path)])
            with (
                LocalServices.start(policy_args=args) as services,
                PolicyClient.http(services.policy_url, timeout_s=600) as client,
            ):
                for way, push in (
                    ("HTTP stream", functools.partial(client.update_weights, state)),
                    ("server path", functools.partial(client.load_weights, str(path))),
                ):
                    walls, server = [], []
                    for _ in range(repeats + 1):  # the first is a warm-up
                        t0 = time.perf_counter()
                        reply = push()
                        walls.append(time.perf_counter() - t0)
                        server.append(reply.seconds)
                    wall = statistics.median(walls[1:])
                    table.add_row(
                        label,
                        f"{size:.1f}",
                        way,
                        f"{wall:.3f}",
                        f"{size / wall:.0f}",
                        f"{statistics.median(server[1:]):.3f}",
                    )
    return table


def adapter_pushes(repeats: int, big: bool, r: int = 16) -> Table:
    """Full state dicts against LoRA adapters (r, all-linear, B random), pushed in turn to one server."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from assay.clients.policy import PolicyClient
    from assay.services import LocalServices
    from assay.trainer import lora

    table = Table(title=f"Full weights vs a LoRA adapter (r={r}, all-linear), pushed over HTTP in turn")
    for col in ("model", "push", "MB sent", "median s", "server s (median)", "s vs full"):
        table.add_column(col, justify="left" if col in ("model", "push") else "right")
    with tempfile.TemporaryDirectory() as tmp:
        models = bench_models(Path(tmp), big)
        for label, path in models:
            model = AutoModelForCausalLM.from_pretrained(path)
            state = {k: v.clone() for k, v in model.state_dict().items()}
            wrapped = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"))
            with torch.no_grad():
                for name, p in wrapped.named_parameters():
                    if "lora_B" in name:
                        p.normal_(0, 0.01)
            tensors, alpha, rank, fan_in_fan_out = lora.adapter(wrapped)
            args = [] if label == "embedded policy" else ["--model", str(path)]
            with (
                LocalServices.start(policy_args=args) as services,
                PolicyClient.http(services.policy_url, timeout_s=600) as client,
            ):
                ways = {
                    "full": functools.partial(client.update_weights, state),
                    "adapter": functools.partial(
                        client.update_adapter, tensors, lora_alpha=alpha, r=rank, fan_in_fan_out=fan_in_fan_out
                    ),
                }
                walls: dict[str, list[float]] = {way: [] for way in ways}
                server: dict[str, list[float]] = {way: [] for way in ways}
                sent: dict[str, int] = {}
                for i in range(repeats + 1):  # interleaved, so machine noise falls on both; the first: a warm-up
                    for way, push in ways.items():
                        t0 = time.perf_counter()
                        reply = push()
                        if i:
                            walls[way].append(time.perf_counter() - t0)
                            server[way].append(reply.seconds)
                        sent[way] = reply.bytes
                full = statistics.median(walls["full"])
                for way in ways:
                    wall = statistics.median(walls[way])
                    table.add_row(
                        label,
                        way,
                        f"{sent[way] / 1e6:.2f}",
                        f"{wall:.3f}",
                        f"{statistics.median(server[way]):.3f}",
                        f"{wall / full:.2f}",
                    )
    return table


# --- streaming ---------------------------------------------------------------------------------


def stream_cost(repeats: int, n: int = 16, max_tokens: int = 48) -> Table:
    import httpx
    import torch

    from assay.checkpoints import EMBEDDED
    from assay.policy_server.config import ServerConfig
    from assay.policy_server.server import BackgroundServer

    torch.set_num_threads(1)
    body = {"model": "policy", "prompt": "Q: 23+45-17 A: ", "n": n, "max_tokens": max_tokens, "ignore_eos": True}
    whole, streamed, first = [], [], []
    with BackgroundServer(ServerConfig(port=0, grpc_port=None, models={"policy": EMBEDDED["policy"][1]})) as s:
        url = f"{s.http_url}/v1/completions"
        for seed in range(repeats):
            started = time.perf_counter()
            httpx.post(url, json={**body, "seed": seed}, timeout=300).raise_for_status()
            whole.append(time.perf_counter() - started)
            started, at = time.perf_counter(), None
            with httpx.stream("POST", url, json={**body, "seed": seed, "stream": True}, timeout=300) as r:
                for line in r.iter_lines():
                    if at is None and line.startswith("data: "):
                        at = time.perf_counter() - started
            streamed.append(time.perf_counter() - started)
            first.append(at or 0.0)
    table = Table(title=f"{n} sequences x {max_tokens} tokens, median of {repeats}")
    for column in ("answer", "seconds", "first event (s)"):
        table.add_column(column, justify="right" if column != "answer" else "left")
    table.add_row("one response", f"{statistics.median(whole):.3f}", "-")
    table.add_row("streamed", f"{statistics.median(streamed):.3f}", f"{statistics.median(first):.3f}")
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["search", "weights", "adapter", "stream", "all"])
    ap.add_argument("--problems", type=int, default=48, help="held-out problems for the search bench")
    ap.add_argument("--repeats", type=int, default=5, help="weight pushes per way in")
    ap.add_argument("--quick", action="store_true", help="8 problems, 2 repeats, no big model")
    args = ap.parse_args()
    problems, repeats = (8, 2) if args.quick else (args.problems, args.repeats)
    started = time.perf_counter()
    if args.what in ("search", "all"):
        console.print(search_overhead(problems))
    if args.what in ("weights", "all"):
        console.print(weight_updates(repeats, big=not args.quick))
    if args.what in ("adapter", "all"):
        console.print(adapter_pushes(repeats, big=not args.quick))
    if args.what in ("stream", "all"):
        console.print(stream_cost(repeats))
    console.print(f"[dim]{time.perf_counter() - started:.0f}s[/dim]")


if __name__ == "__main__":
    main()
