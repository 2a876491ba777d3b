"""Weight push time across policy replicas: one plain server, and 1 and 2 Ray Serve replicas.

    .venv/bin/python bench/replica_push_bench.py            # embedded policy and a random 34M-parameter one, ~4 min
    .venv/bin/python bench/replica_push_bench.py --quick    # the embedded policy only, 3 pushes each

A push is the trainer's: `PolicyClient.update_weights(full state dict, version=current + 1)`, its
seconds the client's wall clock from request to reply, median of `--repeats` after a warm-up. The
same pushes go to

- `plain server`: `python -m assay.policy_server` (a subprocess, `assay.services`), one server;
- `Ray, N replicas`: `assay.deploy.ray_serve`'s policy application with N replicas (one CPU each) on
  a local Ray (loopback, token authentication, no dashboard), through Serve's proxy: one replica
  takes the push, publishes it (`deploy/weight_sync.py`), and answers once every replica serves it.

"x plain" is the ratio to the plain server's median in the same run. After the pushes the bench
asks `/v1/models` until every replica has answered and checks they all serve the last version.
The models: the embedded policy (1M parameters, 4 MB float32) and a random-init model of its family
(`--hidden`, `--layers`; default 512 x 8, 34M parameters, 135 MB float32), so the per-byte cost shows.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
console = Console(width=140)
REPLICA_CPUS = 1


def pushes(url: str, state: dict[str, Any], repeats: int) -> tuple[list[float], int]:
    """Seconds of `repeats` pushes of `state` (after one warm-up) to the policy service at `url`, each
    as the next version; and the last version."""
    from assay.clients.policy import PolicyClient

    walls = []
    with PolicyClient.http(url, timeout_s=600) as client:
        version = client.weight_version()
        for _ in range(repeats + 1):
            version += 1
            t0 = time.perf_counter()
            client.update_weights(state, version=version)
            walls.append(time.perf_counter() - t0)
    return walls[1:], version


def served_versions(url: str, replicas: int, tries: int = 200) -> dict[str, int]:
    """The policy's weight_version on each replica behind `url` (X-Assay-Replica), asked until
    `replicas` different ones answered."""
    import httpx

    from assay.deploy.ray_serve import REPLICA_HEADER
    from assay.policy_server.protocol import ModelList

    seen: dict[str, int] = {}
    for _ in range(tries):
        r = httpx.get(f"{url}/v1/models", timeout=60)
        r.raise_for_status()
        (card,) = [c for c in ModelList.model_validate(r.json()).data if c.id == "policy"]
        seen[r.headers.get(REPLICA_HEADER, "plain")] = card.weight_version
        if len(seen) >= replicas:
            break
    return seen


@contextmanager
def ray_cluster() -> Iterator[Callable[[Any, str], Any]]:
    """A local Ray with Serve on loopback (token authentication, no dashboard); yields `serve(app, name)`,
    a context manager running a Serve application and yielding its base URL."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray
    from ray import serve

    from assay.services import free_port

    ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})

    @contextmanager
    def running(app: Any, name: str) -> Iterator[str]:
        serve.run(app, name=name, route_prefix=f"/{name}")  # returns once every replica is up
        try:
            yield f"http://127.0.0.1:{port}/{name}"
        finally:
            serve.delete(name)

    try:
        yield running
    finally:
        serve.shutdown()
        ray.shutdown()


def ray_pushes(
    serve_app: Callable[[Any, str], Any], path: Path, replicas: int, state: dict[str, Any], repeats: int
) -> tuple[list[float], dict[str, int], int]:
    """Push seconds through Serve's proxy to `replicas` replicas serving `path`, the versions each serves
    after, and the last version pushed."""
    from assay.deploy import weight_sync
    from assay.deploy.app_args import Replicas
    from assay.deploy.ray_serve import build_policy_app
    from assay.policy_server.config import ServerConfig

    config = ServerConfig(models={"policy": path}, rm_check_interval_s=3600)
    app = build_policy_app(config, Replicas(num_replicas=replicas, num_cpus=REPLICA_CPUS))
    name = f"push{replicas}"
    try:
        with serve_app(app, name) as url:
            walls, last = pushes(url, state, repeats)
            return walls, served_versions(url, replicas), last
    finally:
        weight_sync.forget(name)  # the next model's replicas start from their own checkpoint


def plain_pushes(path: Path, state: dict[str, Any], repeats: int) -> list[float]:
    from assay.services import LocalServices

    with LocalServices.start(policy_args=["--model", str(path)]) as services:
        return pushes(services.policy_url, state, repeats)[0]


@dataclasses.dataclass
class Row:
    model: str
    megabytes: float
    where: str
    walls: list[float]


def push_table(
    serve_app: Callable[[Any, str], Any], models: list[tuple[str, Path]], repeats: int, plain: bool = True
) -> tuple[Table, list[Row]]:
    """The table: per model, the plain server (with `plain`), then Ray with 1 and 2 replicas."""
    from safetensors.torch import load_file

    rows: list[Row] = []
    table = Table(title=f"Full-state-dict pushes, client wall clock, median of {repeats} after a warm-up")
    for column in ("model", "MB", "where", "median s", "min s", "x plain", "replicas at the last version"):
        table.add_column(column, justify="left" if column in ("model", "where") else "right")
    for label, path in models:
        state = load_file(path / "model.safetensors")
        size = sum(t.numel() * t.element_size() for t in state.values()) / 1e6
        base = None
        if plain:
            walls = plain_pushes(path, state, repeats)
            base = statistics.median(walls)
            rows.append(Row(label, size, "plain server", walls))
            table.add_row(label, f"{size:.1f}", "plain server", f"{base:.3f}", f"{min(walls):.3f}", "1.00", "1 of 1")
        for replicas in (1, 2):
            walls, seen, last = ray_pushes(serve_app, path, replicas, state, repeats)
            median = statistics.median(walls)
            at_last = sum(v == last for v in seen.values())
            where = f"Ray, {replicas} replica{'s' if replicas > 1 else ''}"
            rows.append(Row(label, size, where, walls))
            ratio = f"{median / base:.2f}" if base else "-"
            table.add_row(
                label, f"{size:.1f}", where, f"{median:.3f}", f"{min(walls):.3f}", ratio, f"{at_last} of {len(seen)}"
            )
    return table, rows


def bench_models(tmp: Path, big: bool, hidden: int, layers: int) -> list[tuple[str, Path]]:
    """The embedded policy saved as a plain checkpoint, and with `big` a random-init one of its family."""
    from assay.checkpoints import EMBEDDED
    from bench.policy_bench import big_checkpoint

    models = [("embedded policy", Path(EMBEDDED["policy"][1]))]
    if big:
        models.append((f"random {hidden}x{layers}", big_checkpoint(tmp / "big", hidden=hidden, layers=layers)))
    return models


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5, help="pushes per row, after one warm-up")
    ap.add_argument("--hidden", type=int, default=512, help="hidden size of the random model")
    ap.add_argument("--layers", type=int, default=8, help="layers of the random model")
    ap.add_argument("--quick", action="store_true", help="the embedded policy only, 3 pushes per row")
    args = ap.parse_args()
    started = time.perf_counter()
    repeats = 3 if args.quick else args.repeats
    with tempfile.TemporaryDirectory() as tmp, ray_cluster() as serve_app:
        models = bench_models(Path(tmp), not args.quick, args.hidden, args.layers)
        table, _ = push_table(serve_app, models, repeats)
    console.print(table)
    console.print(f"[dim]{time.perf_counter() - started:.0f}s[/dim]")


if __name__ == "__main__":
    main()
