"""rm_server's throughput as `assay rm serve` and as Ray Serve applications of 1 and 2 replicas, in one run.

    .venv/bin/python bench/ray_replicas.py            # 3 repeats of 10 s windows per row (~7 min here)
    .venv/bin/python bench/ray_replicas.py --quick    # 1 repeat of 4 s windows
    .venv/bin/python bench/ray_replicas.py --smoke    # the smallest run: every row once, no model workers

Three servers run side by side for the whole run, on one spec holding a model reward (`orm`: the embedded
outcome RM, a forward pass per batch, so compute dominates) and a rule (`format`: a regex, so the
serving path dominates):

- **plain**: `python -m assay.rm_server` as a subprocess (what `assay rm serve` runs);
- **Serve, 1 replica** and **Serve, 2 replicas**: `assay.deploy.ray_serve.build_rm_app` on a local Ray
  started here (loopback, token auth, no dashboard), one application each behind Serve's HTTP proxy
  (`/one`, `/two`); each replica reserves one CPU, so its model worker gets one torch thread.

Every row gets the same load: `score_bench`'s closed loop (`loadgen.py`), `--concurrency` one-item
`POST /v1/score` requests kept in flight over bare keep-alive HTTP/1.1 by one process, over 1,024 distinct
held-out problems with their correct solutions. Windows are taken in turns (every row once per repeat),
so a noisy moment on a shared machine does not hit one row only; a row's figure is the median of its
windows, and `x plain` its ratio to the plain server's median for the same reward. `cores` are the CPU
cores used by the load generator / the server (plain: its process and model workers; Serve: the raylet's
processes: proxy, controller, replicas and their model workers) / everything else on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import loadgen  # bench/: the script's own folder is on the path
from score_bench import CHECKPOINT, Plan, assay_args, bench_items, spawned

from assay.services import free_port

REWARDS = ("orm", "format")
SERVE_APPS = {"Serve, 1 replica": ("one", 1), "Serve, 2 replicas": ("two", 2)}


@dataclass
class Row:
    reward: str
    target: str
    windows: list[loadgen.Window] = field(default_factory=list)

    @property
    def median(self) -> loadgen.Window:
        """The window of median throughput (an odd count: the middle one)."""
        return sorted(self.windows, key=lambda w: w.items_s)[(len(self.windows) - 1) // 2]


def write_spec(folder: Path) -> Path:
    spec = folder / "spec.yaml"
    rewards = {
        "orm": {"type": "model.outcome", "path": str(CHECKPOINT), "activation": "sigmoid", "max_tokens": 256},
        "format": {"type": "rule.regex", "pattern": "#### -?\\d+$"},
    }
    spec.write_text(json.dumps({"rewards": rewards}))  # JSON is YAML
    return spec


@contextlib.contextmanager
def serve_apps(spec: Path, port: int, workers: bool = True):
    """A local Ray (loopback, token auth, no dashboard) with Serve's proxy on `port` and one reward app per
    entry of SERVE_APPS; yields {row name: (app URL, raylet pid)}."""
    os.environ["RAY_AUTH_MODE"] = "token"  # read once, when Ray is imported
    # The raylet gives its agents 15 s to start by default, which a loaded 2-core machine can miss
    os.environ.setdefault("RAY_agent_register_timeout_ms", "120000")
    import ray
    from ray import serve

    from assay.deploy.app_args import Replicas
    from assay.deploy.ray_serve import build_rm_app
    from assay.rm_server.config import ServerConfig

    cpus = sum(n for _, n in SERVE_APPS.values())
    ray.init(num_cpus=cpus, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = ServerConfig(spec=spec)
        config = replace(config, models=replace(config.models, model_workers=workers))
        for name, replicas in SERVE_APPS.values():
            app = build_rm_app(config, Replicas(num_replicas=replicas, num_cpus=1))
            serve.run(app, name=name, route_prefix=f"/{name}")  # returns once every replica has loaded
        raylet = _raylet_pid()
        yield {row: (f"http://127.0.0.1:{port}/{name}", raylet) for row, (name, _) in SERVE_APPS.items()}
    finally:
        serve.shutdown()
        ray.shutdown()


def _raylet_pid() -> int:
    """The raylet this process started: every Serve actor (proxy, controller, replicas) is a process under it."""
    for pid in loadgen._descendants(os.getpid()):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"raylet"):
                return pid
    raise RuntimeError("no raylet under this process")


def run(plan: Plan, work: Path, workers: bool = True) -> list[Row]:
    """Every row's windows; `workers`: the model rewards in worker processes (the servers' default), or not
    (the smoke run: no worker start-ups, the plumbing alone)."""
    items = bench_items()
    spec = write_spec(work)
    port, proxy_port = free_port(), free_port()
    plain_url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "assay.rm_server", *assay_args(spec, port, None)]
    cmd += [] if workers else ["--no-model-workers"]
    rows = {(reward, target): Row(reward, target) for reward in REWARDS for target in ("plain", *SERVE_APPS)}
    # Ray first: its start-up has deadlines of its own, which a loaded machine can miss
    with serve_apps(spec, proxy_port, workers) as apps, spawned(cmd, plain_url, plan, work / "plain.log") as plain:
        targets = {"plain": (plain_url, plain.pid), **apps}
        print(f"servers ready; {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}", flush=True)
        for repeat in range(plan.repeats):
            for reward in REWARDS:
                for target, (url, pid) in targets.items():
                    window = loadgen.measure("http", url, plan, items, pid, reward=reward)
                    rows[(reward, target)].windows.append(window)
                    print(f"  #{repeat + 1} {reward:6} {target:18} {window.items_s:7.0f} items/s", flush=True)
    return list(rows.values())


def table(rows: list[Row], plan: Plan) -> str:
    head = f"{'reward':8}{'server':20}{'items/s':>9}{'x plain':>9}{'p50 ms':>9}{'p99 ms':>9}  windows (items/s)"
    lines = [
        f"rm_server throughput, one-item requests, {plan.concurrency} in flight, median of {plan.repeats} x "
        f"{plan.duration_s:g} s windows",
        head + "  cores: load-gen / server / other",
    ]
    for reward in REWARDS:
        plain = next(r.median.items_s for r in rows if r.reward == reward and r.target == "plain")
        for r in (r for r in rows if r.reward == reward):
            w = r.median
            runs = " / ".join(f"{x.items_s:.0f}" for x in r.windows)
            ratio = w.items_s / plain if plain else float("nan")
            errors = sum(x.errors for x in r.windows)
            lines.append(
                f"{reward:8}{r.target:20}{w.items_s:9.0f}{ratio:9.2f}{w.pct(0.5):9.1f}{w.pct(0.99):9.1f}  {runs}"
                f"  {w.load_cores:.2f} / {w.server_cores:.2f} / {w.other_cores:.2f}"
                + (f"  errors {errors}" if errors else "")
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one repeat of 4 s windows")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="the test's size: one repeat of 1.5 s windows, 8 in flight, no model worker processes",
    )
    ap.add_argument("--concurrency", type=int, default=64, help="one-item requests in flight (closed loop)")
    ap.add_argument("--repeats", type=int, default=None, help="windows per row (default 3; --quick, --smoke: 1)")
    ap.add_argument("--duration", type=float, default=None, help="seconds per window (default 10)")
    args = ap.parse_args()
    # 4 s of warm-up: on a loaded machine the load process can take seconds to start and connect
    plan = Plan(concurrency=args.concurrency, procs=1, warmup_s=4.0, duration_s=10.0, repeats=3)
    if args.quick:
        plan = replace(plan, duration_s=4.0, repeats=1)
    if args.smoke:
        plan = replace(plan, concurrency=8, duration_s=1.5, repeats=1)  # the full run's 4 s warm-up: 0.5 s was short
    if args.repeats:
        plan = replace(plan, repeats=args.repeats)
    if args.duration:
        plan = replace(plan, duration_s=args.duration)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="assay-ray-bench-") as work:
        rows = run(plan, Path(work), workers=not args.smoke)
    print(table(rows, plan))
    print(f"{time.perf_counter() - started:.0f} s; errors {sum(w.errors for r in rows for w in r.windows)}")


if __name__ == "__main__":
    main()
