"""Throughput and latency of the reward service against an in-process ceiling and a naive server.

    .venv/bin/python bench/score_bench.py            # full run, ~5 minutes
    .venv/bin/python bench/score_bench.py --quick    # smoke test, ~1 minute
    .venv/bin/python bench/score_bench.py --workload mixed [--quick | --smoke]   # mixed lengths

`--workload mixed` scores items of lognormal lengths on a random-init classifier: the same items
in arrival-order, length-sorted and length-aware batches and one at a time in this process, and
served one item per request (`mixed_workload.py` says how). The rest of this docstring is the
uniform workload, the default.

Everything runs in one go on this machine against the outcome RM (`arith/checkpoints/orm`),
with 1024 distinct arithmetic-world items (prompt + correct solution), so no cache can help:

- ceiling: batched forwards in this process through the service's own backend code
  (`TransformersBackend.pooled`, token ids from its tokenizer), best batch size;
- Assay HTTP / gRPC unary / gRPC stream: the real server (`python -m assay.rm_server`) as a
  subprocess, a fresh one per repeat, driven by closed-loop clients that each keep one
  one-item request outstanding (64 in all); HTTP once with a lean keep-alive client and once
  with httpx, the client most Python trainers use;
- naive: `bench/naive_server.py`, one synchronous forward per request, same load;
- latency at half of Assay's HTTP peak: open-loop Poisson arrivals, latency counted from each
  request's scheduled arrival (so a stalled server cannot hide its queue).

Load comes from separate processes; for each window the bench reports the CPU cores used by
the load generator, the server (and its event-loop thread) and everything else on the machine,
since on a 2-core machine they all compete. The load generators and the measuring of one window
are in `bench/loadgen.py`; this file holds the plan, the ceiling, the servers, the diagnosis
(`--profile`, `--sweep`), the tables and the CLI.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from assay.rm_server.spec import CPU_BATCH_TOKENS, DEVICE_BATCH_TOKENS

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is no package; spawned workers too
import mixed_workload
from loadgen import Window, measure

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = ROOT / "arith" / "checkpoints" / "orm"
console = Console(width=160)


@dataclass(frozen=True)
class Plan:
    """How long and how hard each part runs; `--quick` shrinks it."""

    concurrency: int = 64  # outstanding one-item requests (closed loop)
    warmup_s: float = 2.0
    duration_s: float = 10.0
    repeats: int = 3
    procs: int = 1  # load-generating processes
    streams: int = 1  # gRPC ScoreStream calls the concurrency is spread over
    batch_sizes: tuple[int, ...] = (1, 8, 16, 32, 64, 128, 256)
    ceiling_s: float = 1.0  # per batch size and pass
    ceiling_passes: int = 3  # interleaved passes over the batch sizes; the median counts
    max_wait_ms: float = 5.0  # (both are the spec defaults)
    max_batch_items: int = 128  # the spec defaults; a sweep (--sweep) found no better setting
    max_batch_tokens: int = 4096  # padded tokens per forward; main() takes the spec's default for the device
    torch_threads: int | None = None  # OMP_NUM_THREADS for ceiling and servers; None: torch's default
    http_client: str = "raw"  # raw (bare keep-alive HTTP/1.1) | httpx
    device: str = "cpu"  # the ceiling's backend and the served model's spec
    dtype: str = "float32"


def bench_items(n: int = 1024) -> list[tuple[str, str, str]]:
    """(id, prompt, response) for n distinct held-out problems with their correct solutions."""
    from assay.arith.world import eval_problems

    return [(f"i{k}", p.prompt, p.solution) for k, p in enumerate(eval_problems(n))]


# --- ceiling: the model alone ----------------------------------------------------------------


def ceiling(items, plan: Plan) -> tuple[dict[int, float], float]:
    """Median items/s of `TransformersBackend.pooled` per batch size, and of `score_outcome`."""
    import torch

    from assay.checkpoints import load_embedded
    from assay.rm_server.backends.hf import TransformersBackend
    from assay.scoring import score_outcome

    if plan.torch_threads:
        torch.set_num_threads(plan.torch_threads)
    backend = TransformersBackend(CHECKPOINT, "outcome", plan.device, plan.dtype)
    texts = [p + r for _, p, r in items]  # the spec's default template, "{prompt}{response}"
    ids = backend.tokenizer(texts)["input_ids"]
    runs: dict[int, list[float]] = {bs: [] for bs in plan.batch_sizes}
    for _ in range(plan.ceiling_passes):  # interleaved, so a noisy moment does not hit one size only
        for bs in plan.batch_sizes:
            backend.pooled(ids[:bs])  # warm-up
            runs[bs].append(_rate(lambda s, bs=bs: backend.pooled(ids[s : s + bs]), bs, len(ids), plan.ceiling_s))
    rates = {bs: statistics.median(r) for bs, r in runs.items()}
    best = max(rates, key=rates.get)
    model, tokenizer = load_embedded("orm")
    ref = statistics.median(
        _rate(lambda s: score_outcome(model, tokenizer, texts[s : s + best], best), best, len(texts), plan.ceiling_s)
        for _ in range(plan.ceiling_passes)
    )
    return rates, ref


def _rate(run, bs: int, n: int, seconds: float) -> float:
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        run((done // bs * bs) % (n - bs + 1))
        done += bs
    return done / (time.perf_counter() - start)


# --- servers ---------------------------------------------------------------------------------

_children: list[subprocess.Popen] = []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)  # the server's own graceful path
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if proc in _children:
        _children.remove(proc)


def stop_all() -> None:
    while _children:
        _stop(_children[-1])


@contextmanager
def spawned(cmd: list[str], url: str, plan: Plan, log: Path, env: dict[str, str] | None = None):
    """A server subprocess in its own process group, ready (GET /ready is 200) inside the block."""
    env = {**os.environ, **(env or {})}
    if plan.torch_threads:
        env["OMP_NUM_THREADS"] = str(plan.torch_threads)
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    _children.append(proc)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{log.stem} server exited or hung ({proc.poll()}):\n{log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.2)
        yield proc
    finally:
        _stop(proc)


def assay_args(spec: Path, port: int, grpc_port: int | None) -> list[str]:
    return ["--spec", str(spec), "--port", str(port), "--grpc-port", str(grpc_port).lower(), "--log-level", "warning"]


def write_spec(folder: Path, plan: Plan, checkpoint: Path = CHECKPOINT, max_tokens: int = 2048) -> Path:
    spec = folder / "bench_spec.yaml"
    orm = {
        "type": "model.outcome",
        "path": str(checkpoint),
        "activation": "sigmoid",
        "max_tokens": max_tokens,
        "max_wait_ms": plan.max_wait_ms,
        "max_batch_items": plan.max_batch_items,
        "max_batch_tokens": plan.max_batch_tokens,
        "device": plan.device,
        "dtype": plan.dtype,
    }
    spec.write_text(json.dumps({"rewards": {"orm": orm}}))  # JSON is YAML
    return spec


# --- rows of the tables ----------------------------------------------------------------------


@dataclass
class Row:
    name: str
    windows: list[Window] = field(default_factory=list)

    @property
    def median(self) -> Window:
        return sorted(self.windows, key=lambda w: w.items_s)[(len(self.windows) - 1) // 2]

    @property
    def items_s(self) -> float:
        return statistics.median(w.items_s for w in self.windows)

    def add(self, w: Window) -> Window:
        self.windows.append(w)
        batch = f", mean batch {w.batch_mean:.1f}" if w.batch_mean else ""
        console.log(
            f"{self.name} #{len(self.windows)}: {w.items_s:.0f} items/s, p50 {w.pct(0.5):.1f} ms, "
            f"p99 {w.pct(0.99):.1f} ms, cores load-gen / server (event loop) / other: {w.cores()}, "
            f"errors {w.errors}{batch}"
        )
        return w


# --- diagnosis (--profile, --sweep) ----------------------------------------------------------

# The server with two switches, flipped by the bench at the window's edges (SIGUSR1, SIGUSR2):
# cProfile of the event-loop thread in thread CPU time (waiting for the GIL is not work), and
# wall and CPU time of the batcher's thread inside `TransformersBackend.pooled`. With
# BENCH_STUB_MODEL=1 the forward returns zeros at once: what the serving layer alone can do.
PROFILED_SERVER = """
import cProfile, json, os, signal, sys, time
import numpy as np
from assay.rm_server.backends.hf import TransformersBackend
out = sys.argv.pop(1)
prof, fwd = cProfile.Profile(time.thread_time), {}
pooled = TransformersBackend.pooled
if os.environ.get("BENCH_STUB_MODEL"):
    pooled = lambda self, batch: [np.zeros(1, np.float32) for _ in batch]
def timed(self, batch):
    wall, cpu = time.perf_counter(), time.thread_time()
    try:
        return pooled(self, batch)
    finally:
        for k, v in (("wall_s", time.perf_counter() - wall), ("cpu_s", time.thread_time() - cpu),
                     ("batches", 1), ("items", len(batch))):
            fwd[k] = fwd.get(k, 0) + v
TransformersBackend.pooled = timed
def begin(*_):
    fwd.clear(); prof.enable()
def end(*_):
    prof.disable(); prof.dump_stats(out + ".prof"); open(out + ".json", "w").write(json.dumps(fwd))
signal.signal(signal.SIGUSR1, begin)
signal.signal(signal.SIGUSR2, end)
import typer
from assay.rm_server.cli import serve_cmd
typer.run(serve_cmd)
"""


def profile_server(items, plan: Plan, folder: Path, spec: Path, rates: dict[int, float]) -> None:
    """Where the server's time goes: one profiled window, then one with the model stubbed out."""
    import pstats

    one = replace(plan, repeats=1)
    for stub in (False, True):
        port, out = _free_port(), folder / f"server-{stub}"
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-c", PROFILED_SERVER, str(out), *assay_args(spec, port, None)]
        env = {"BENCH_STUB_MODEL": "1"} if stub else {}
        with spawned(cmd, url, plan, folder / "profiled.log", env) as proc:
            edge = lambda e, pid=proc.pid: os.kill(pid, signal.SIGUSR1 if e == "begin" else signal.SIGUSR2)
            w = measure("http", url, one, items, proc.pid, metrics_url=url, at_edge=None if stub else edge)
            time.sleep(0.5)  # the server writes its files
        if stub:
            console.print(
                f"[bold]Model stubbed out[/bold] (forward returns zeros; unprofiled loop CPU): "
                f"{w.items_s:.0f} items/s, p50 {w.pct(0.5):.1f} ms, p99 {w.pct(0.99):.1f} ms, "
                f"event loop {w.loop_cores:.2f} cores = "
                f"{1000 * w.loop_cores / w.items_s:.2f} ms per request"
            )
            continue
        fwd = json.loads((folder / f"server-{stub}.json").read_text())
        stats = pstats.Stats(str(out) + ".prof")
        bs = fwd["items"] / fwd["batches"]
        near = min(rates, key=lambda b: abs(b - bs))
        console.print(
            f"[bold]Profiled window[/bold] ({w.items_s:.0f} items/s under the profiler): event loop "
            f"{stats.total_tt / plan.duration_s:.2f} cores = "
            f"{1000 * stats.total_tt / (w.items_s * plan.duration_s):.2f} "
            f"ms CPU per request (profiled; unprofiled runs above show the real share); batcher thread inside the "
            f"forward {fwd['wall_s'] / plan.duration_s:.0%} of the window, mean batch {bs:.1f}, "
            f"{1000 * fwd['wall_s'] / fwd['items']:.2f} ms wall per item vs {1000 / rates[near]:.2f} ms in the "
            f"ceiling at batch {near}"
        )
        stats.sort_stats("tottime").print_stats(15)


def sweep(items, plan: Plan, folder: Path) -> None:
    """Short windows over the batcher's knobs, a fresh server per setting."""
    table = Table(
        "max_wait_ms",
        "max_batch_items",
        "items/s",
        "p50 ms",
        "p99 ms",
        "mean batch",
        "server cores",
        title="Batcher knobs, Assay HTTP, one window each",
    )
    for wait in (2.0, 5.0):
        for max_items in (16, 32, 64, 128):
            tuned = replace(plan, max_wait_ms=wait, max_batch_items=max_items, repeats=1)
            port = _free_port()
            url = f"http://127.0.0.1:{port}"
            cmd = [sys.executable, "-m", "assay.rm_server", *assay_args(write_spec(folder, tuned), port, None)]
            with spawned(cmd, url, tuned, folder / "sweep.log") as proc:
                w = measure("http", url, tuned, items, proc.pid, metrics_url=url)
            table.add_row(
                f"{wait:g}",
                str(max_items),
                f"{w.items_s:.0f}",
                f"{w.pct(0.5):.1f}",
                f"{w.pct(0.99):.1f}",
                f"{w.batch_mean or 0:.1f}",
                f"{w.server_cores:.2f}",
            )
    console.print(table)


# --- the run ---------------------------------------------------------------------------------


def run(plan: Plan, args: argparse.Namespace) -> None:
    items = bench_items()
    console.log(f"{len(items)} distinct items; {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f}; {plan}")
    rates, reference = ceiling(items, plan)
    best = max(rates, key=rates.get)
    table = Table(
        "batch size",
        "items/s",
        title=f"Ceiling: TransformersBackend.pooled in this process (median of {plan.ceiling_passes} passes)",
    )
    for bs, r in rates.items():
        table.add_row(str(bs), f"{r:.0f}" + (" (best)" if bs == best else ""))
    table.add_row(f"score_outcome, batch {best}", f"{reference:.0f}")
    console.print(table)

    http, httpx, unary, stream, half = (
        Row("Assay HTTP"),
        Row("Assay HTTP, httpx client"),
        Row("gRPC unary"),
        Row("gRPC stream"),
        Row("Assay HTTP at 50% of peak"),
    )
    with tempfile.TemporaryDirectory(prefix="assay-bench-") as tmp:
        folder = Path(tmp)
        if args.sweep:
            sweep(items, plan, folder)
        spec = write_spec(folder, plan)
        for rep in range(plan.repeats):  # a fresh server per repeat: instances differ more than windows do
            port, grpc_port = _free_port(), _free_port()
            url, target = f"http://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}"
            cmd = [sys.executable, "-m", "assay.rm_server", *assay_args(spec, port, grpc_port)]
            with spawned(cmd, url, plan, folder / "assay.log") as proc:
                http.add(measure("http", url, plan, items, proc.pid, metrics_url=url))
                httpx.add(measure("http", url, replace(plan, http_client="httpx"), items, proc.pid, metrics_url=url))
                unary.add(measure("grpc-unary", target, plan, items, proc.pid, metrics_url=url))
                stream.add(measure("grpc-stream", target, plan, items, proc.pid, metrics_url=url))
                if rep == plan.repeats - 1:
                    half.add(measure("http-open", url, plan, items, proc.pid, rate=http.items_s / 2, metrics_url=url))
        if args.profile:
            profile_server(items, plan, folder, spec, rates)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [
            sys.executable,
            str(ROOT / "bench" / "naive_server.py"),
            "--checkpoint",
            str(CHECKPOINT),
            "--port",
            str(port),
        ]
        naive = Row("naive server")
        with spawned(cmd, url, plan, folder / "naive.log") as proc:
            for _ in range(plan.repeats):
                naive.add(measure("http", url, plan, items, proc.pid))
    summary(plan, rates[best], best, naive, [http, httpx, naive, unary, stream], half)


def run_mixed(plan: Plan, w: mixed_workload.Workload) -> None:
    """The mixed-length workload: ceiling rows in this process, then the served row."""
    import torch

    from assay.rm_server.backends.hf import TransformersBackend

    if plan.torch_threads:
        torch.set_num_threads(plan.torch_threads)
    items = mixed_workload.items(w)
    served = Row("rm_server, one-item HTTP requests")
    with tempfile.TemporaryDirectory(prefix="assay-bench-") as tmp:
        folder = Path(tmp)
        checkpoint = mixed_workload.build_model(folder, w)
        backend = TransformersBackend(checkpoint, "outcome", plan.device, plan.dtype)
        ids = backend.tokenizer([p + r for _, p, r in items])["input_ids"]
        about = mixed_workload.describe([len(x) for x in ids])
        console.log(f"{about}; {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f}; {w}; {plan}")
        rows = mixed_workload.ceiling_rows(backend, ids, w, plan.max_batch_tokens)
        del backend, ids
        spec = write_spec(folder, plan, checkpoint, max_tokens=w.positions)
        for _ in range(plan.repeats):
            port = _free_port()
            url = f"http://127.0.0.1:{port}"
            cmd = [sys.executable, "-m", "assay.rm_server", *assay_args(spec, port, None)]
            with spawned(cmd, url, plan, folder / "assay.log") as proc:
                served.add(measure("http", url, plan, items, proc.pid, metrics_url=url))
    sorted_rate = rows[1].items_s
    table = Table(
        "",
        "items/s",
        "x sorted",
        "padded / real tokens",
        "mean batch",
        "items scored",
        "p50 ms",
        "p99 ms",
        "cores: load-gen / server (event loop) / other",
        title=f"Mixed lengths ({about}), {plan.device} {plan.dtype}, torch threads {plan.torch_threads or 'default'}",
    )
    for r in rows:
        share = f"{r.covered:.0%}"
        table.add_row(
            r.name,
            f"{r.items_s:.1f}",
            f"{r.items_s / sorted_rate:.2f}",
            f"{r.padded:.2f}",
            f"{r.mean_batch:.1f}",
            share,
            "-",
            "-",
            "-",
        )
    m = served.median
    table.add_row(
        f"{served.name}, {plan.concurrency} in flight (median of {plan.repeats})",
        f"{served.items_s:.1f}",
        f"{served.items_s / sorted_rate:.2f}",
        "-",
        f"{m.batch_mean:.1f}" if m.batch_mean else "-",
        f"{plan.duration_s:g} s window",
        f"{m.pct(0.5):.0f}",
        f"{m.pct(0.99):.0f}",
        m.cores(),
    )
    console.print(table)
    ratio = served.items_s / sorted_rate
    console.print(
        f"target: served mixed >= 0.80x length-sorted: {ratio:.2f}x, {'met' if ratio >= 0.8 else 'not met'}; "
        f"batcher max_wait_ms={plan.max_wait_ms:g} max_batch_items={plan.max_batch_items} "
        f"max_batch_tokens={plan.max_batch_tokens}; load average now {os.getloadavg()[0]:.2f}"
    )


def summary(plan: Plan, ceil: float, best: int, naive: Row, rows: list[Row], half: Row) -> None:
    table = Table(
        "",
        "items/s",
        "x ceiling",
        "x naive",
        "p50 ms",
        "p99 ms",
        "mean batch",
        "cores: load-gen / server (event loop) / other",
        title=f"Outcome RM, one-item requests, {plan.concurrency} in flight, median of {plan.repeats} "
        f"x {plan.duration_s:g} s windows",
    )
    table.add_row(
        f"ceiling (batch {best})", f"{ceil:.0f}", "1.00", f"{ceil / naive.items_s:.1f}", "-", "-", str(best), "-"
    )
    for row in rows:
        w = row.median
        table.add_row(
            row.name,
            f"{row.items_s:.0f}",
            f"{row.items_s / ceil:.2f}",
            f"{row.items_s / naive.items_s:.1f}",
            f"{w.pct(0.5):.1f}",
            f"{w.pct(0.99):.1f}",
            f"{w.batch_mean:.1f}" if w.batch_mean else "-",
            w.cores(),
        )
    console.print(table)
    w = half.windows[0]
    console.print(
        f"Assay HTTP at 50% of its peak: {rows[0].items_s / 2:.0f} items/s offered (Poisson), "
        f"{w.items_s:.0f} "
        f"served: p50 {w.pct(0.5):.1f} ms, p99 {w.pct(0.99):.1f} ms (from scheduled arrival), mean batch "
        f"{w.batch_mean or 0:.1f}, errors {w.errors}"
    )
    console.print(
        f"batcher max_wait_ms={plan.max_wait_ms:g} max_batch_items={plan.max_batch_items}; torch threads "
        f"{plan.torch_threads or 'default'}; load-gen processes {plan.procs}; gRPC streams {plan.streams}; "
        f"load average now {os.getloadavg()[0]:.2f}"
    )


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Throughput and latency of the reward service (see the module docstring).")
    p.add_argument("--quick", action="store_true", help="a ~1 minute smoke run: short windows, one repeat")
    p.add_argument("--workload", choices=("uniform", "mixed"), default="uniform", help="items of one length or many")
    p.add_argument("--smoke", action="store_true", help="mixed: the test's size, lengths / 8 on a smaller model")
    p.add_argument("--device", default=Plan.device, help="torch device of the ceiling and the served model")
    p.add_argument(
        "--dtype", default=Plan.dtype, choices=("auto", "float32", "bfloat16", "float16"), help="model dtype"
    )
    p.add_argument("--concurrency", type=int, default=Plan.concurrency, help="one-item requests in flight")
    p.add_argument("--procs", type=int, default=Plan.procs, help="load-generating processes")
    p.add_argument("--streams", type=int, default=Plan.streams, help="gRPC ScoreStream calls")
    p.add_argument("--max-wait-ms", type=float, default=Plan.max_wait_ms, help="spec max_wait_ms")
    p.add_argument("--max-batch-items", type=int, default=None, help="spec max_batch_items (uniform 128, mixed 32)")
    p.add_argument(
        "--max-batch-tokens",
        type=int,
        default=None,
        help="spec max_batch_tokens (default: the spec's, 4096 on a CPU, 16384 on a GPU)",
    )
    p.add_argument("--torch-threads", type=int, default=None, help="OMP_NUM_THREADS for ceiling and servers")
    p.add_argument("--repeats", type=int, default=None, help="windows per row (default 3, quick 1)")
    p.add_argument("--duration", type=float, default=None, help="seconds per window (default 10, quick 3)")
    p.add_argument("--sweep", action="store_true", help="first sweep max_wait_ms x max_batch_items")
    p.add_argument("--profile", action="store_true", help="also profile the server, and run it with the model stubbed")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    plan = Plan(
        concurrency=args.concurrency,
        procs=args.procs,
        streams=args.streams,
        max_wait_ms=args.max_wait_ms,
        max_batch_items=args.max_batch_items or (32 if args.workload == "mixed" else Plan.max_batch_items),
        # The spec's default for the device: 4096 padded tokens on a CPU, where batching gains little
        # past a few thousand tokens and a smaller budget keeps mixed-length batches tight.
        max_batch_tokens=args.max_batch_tokens or (CPU_BATCH_TOKENS if args.device == "cpu" else DEVICE_BATCH_TOKENS),
        torch_threads=args.torch_threads,
        device=args.device,
        dtype=args.dtype,
    )
    if args.quick or args.smoke:
        plan = replace(
            plan, warmup_s=1.0, duration_s=3.0, repeats=1, batch_sizes=(1, 8, 32, 128), ceiling_s=0.7, ceiling_passes=1
        )
    if args.workload == "mixed":  # items take seconds, not milliseconds: longer windows
        plan = replace(plan, warmup_s=3.0, duration_s=10.0) if args.quick else replace(plan, warmup_s=5, duration_s=20)
    if args.smoke:
        plan = replace(plan, concurrency=16, warmup_s=1.0, duration_s=3.0, max_batch_items=8)
    plan = replace(plan, repeats=args.repeats or plan.repeats, duration_s=args.duration or plan.duration_s)
    workload = mixed_workload.SMOKE if args.smoke else mixed_workload.QUICK if args.quick else mixed_workload.Workload()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally below runs
    try:
        if args.workload == "mixed":
            run_mixed(plan, workload)
        else:
            run(plan, args)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]")
        sys.exit(130)
    finally:
        stop_all()


if __name__ == "__main__":
    main()
