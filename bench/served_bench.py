"""Served one-item requests at saturation against the in-process ceiling, at the same torch threads.

    .venv/bin/python bench/served_bench.py --torch-threads 1                    # ~4 minutes
    .venv/bin/python bench/served_bench.py --torch-threads 1 --baseline-python /other/checkout/.venv/bin/python

The issue's target for rm_server: one-item requests at saturation served at >= 0.9x what the
model does in-process at its best batch size. Rounds interleave everything, so a busy moment
of a shared machine hits every row alike, and each served figure is divided by the ceiling of
its own round:

- ceiling: `TransformersBackend.pooled` in this process at batch sizes 8-128, the best counts
  (`score_bench.ceiling`, on the same 1024 distinct items as `score_bench.py`);
- workers: `python -m assay.rm_server` (a fresh server each round), its model in a worker process;
- thread: the same with `--no-model-workers`, the forward on a thread of the server process;
- baseline (with `--baseline-python`): another checkout's server, e.g. before a change, its
  threads set by OMP_NUM_THREADS;

each loaded by `score_bench`'s closed-loop clients: `--concurrency` one-item requests in flight
over HTTP (or gRPC with `--protocol`). Server cores count the server's processes together
(the model workers and math-verify's pool with it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is no package
from loadgen import Window, measure
from score_bench import Plan, _free_port, assay_args, bench_items, ceiling, console, spawned, stop_all, write_spec


def servers(args: argparse.Namespace) -> dict[str, list[str]]:
    """Each served row's command line, less its spec and ports."""
    ours = [sys.executable, "-m", "assay.rm_server", "--torch-threads", str(args.torch_threads)]
    rows = {"workers": ours, "thread": [*ours, "--no-model-workers"]}
    if args.baseline_python:
        rows["baseline"] = [args.baseline_python, "-P", "-m", "assay.rm_server"]  # -P: not this checkout's folders
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description="Served one-item requests vs the in-process ceiling (module docstring).")
    p.add_argument("--torch-threads", type=int, default=1, help="for the ceiling and every server")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per measured window")
    p.add_argument("--concurrency", type=int, default=64, help="one-item requests in flight")
    p.add_argument("--protocol", default="http", choices=("http", "grpc-unary", "grpc-stream"))
    p.add_argument("--baseline-python", help="another checkout's venv python: its rm_server is a row too")
    args = p.parse_args()
    plan = Plan(
        concurrency=args.concurrency,
        duration_s=args.duration,
        torch_threads=args.torch_threads,
        batch_sizes=(8, 16, 32, 64, 128),
        ceiling_passes=1,
    )
    items = bench_items()
    console.log(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; {plan}")
    rows = servers(args)
    ceilings: list[float] = []
    windows: dict[str, list[Window]] = {name: [] for name in rows}
    try:
        with tempfile.TemporaryDirectory(prefix="assay-served-") as tmp:
            spec = write_spec(Path(tmp), plan)
            # An older checkout's spec may not know `dtype` (float32 then, as it was): leave it out for it.
            old = json.loads(spec.read_text())
            old["rewards"]["orm"].pop("dtype")
            (old_spec := Path(tmp) / "baseline_spec.yaml").write_text(json.dumps(old))
            for r in range(args.rounds):
                rates, _ = ceiling(items, plan)
                ceilings.append(max(rates.values()))
                console.log(f"round {r + 1}: ceiling {ceilings[-1]:.0f} items/s ({rates})")
                for name, cmd in rows.items():
                    port, grpc_port = _free_port(), _free_port()
                    url = f"http://127.0.0.1:{port}"
                    target = url if args.protocol == "http" else f"127.0.0.1:{grpc_port}"
                    with spawned(
                        [*cmd, *assay_args(old_spec if name == "baseline" else spec, port, grpc_port)],
                        url,
                        plan,
                        Path(tmp) / f"{name}.log",
                    ) as proc:
                        w = measure(args.protocol, target, replace(plan, repeats=1), items, proc.pid, metrics_url=url)
                    windows[name].append(w)
                    console.log(
                        f"round {r + 1}: {name} {w.items_s:.0f} items/s ({w.items_s / ceilings[-1]:.2f}x), "
                        f"p50 {w.pct(0.5):.0f} ms, cores {w.cores()}, batch {w.batch_mean or 0:.1f}, errors {w.errors}"
                    )
    finally:
        stop_all()
    table = Table(
        "",
        "items/s",
        "x ceiling",
        "p50 ms",
        "p99 ms",
        "mean batch",
        "cores: load-gen / server (event loop) / other",
        title=f"One-item {args.protocol} requests, {args.concurrency} in flight, {args.torch_threads} torch "
        f"thread(s); medians of {args.rounds} interleaved rounds of {args.duration:g} s",
    )
    table.add_row("ceiling (in-process, best batch)", f"{statistics.median(ceilings):.0f}", "1.00", *"----")
    for name, ws in windows.items():
        ratios = [w.items_s / c for w, c in zip(ws, ceilings, strict=True)]
        mid = sorted(ws, key=lambda w: w.items_s)[(len(ws) - 1) // 2]
        table.add_row(
            name,
            f"{statistics.median(w.items_s for w in ws):.0f}",
            f"{statistics.median(ratios):.2f}",
            f"{mid.pct(0.5):.1f}",
            f"{mid.pct(0.99):.1f}",
            f"{mid.batch_mean or 0:.1f}",
            mid.cores(),
        )
    console.print(table)
    console.print(f"load average at the end {os.getloadavg()[0]:.2f} (a busy machine shows in 'other')")


if __name__ == "__main__":
    main()
