"""`assay run` (`make run`): both services on loopback, inference-time search over held-out problems.

Starts rm_server and policy_server with the embedded checkpoints (`assay.services`), sends every
held-out problem to `POST /v1/search` once per strategy through `clients.PolicyClient`, a few
searches in flight at a time, and prints one row per strategy: accuracy (the chosen answer equals
the reference), tokens generated per problem, and search latency. Then stops both services and
checks they exited cleanly. The first row is the no-search baseline: one sample per problem.
"""

from __future__ import annotations

import functools
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from assay.arith import world
from assay.clients.policy import PolicyClient
from assay.services import LocalServices


@dataclass(frozen=True)
class Row:
    label: str
    strategy: str
    reward: str | None
    n: int


def rows(n: int) -> list[Row]:
    return [
        Row("single sample (no search)", "majority", None, 1),
        Row("majority vote", "majority", None, n),
        Row("best-of-N", "best_of_n", "orm", n),
        Row("weighted best-of-N", "weighted_best_of_n", "orm", n),
        Row("best-of-N, verifier as judge", "best_of_n", "judge", n),
        Row("beam search (N beams)", "beam_search", "prm", n),
        Row("DVTS (N beams)", "dvts", "prm", n),
    ]


@dataclass(frozen=True)
class Outcome:
    correct: int
    failed: int  # searches that chose nothing (every candidate's reward failed)
    tokens: int
    latencies: list[float]


def run(problems: int = 64, n: int = 8, seed: int = 0, in_flight: int = 4, console: Console | None = None) -> Table:
    console = console or Console()
    if not console.is_terminal:  # piped or in CI: room for the table's columns on one line each
        console.width = max(console.width, 120)
    tasks = world.eval_problems(problems)
    plan = rows(n)
    started = time.perf_counter()
    console.print("starting rm_server and policy_server on loopback ...")
    with LocalServices.start() as services:
        console.print(
            f"rm_server {services.rm_url}, policy_server {services.policy_url} "
            f"(ready in {time.perf_counter() - started:.1f}s)"
        )
        results = {}
        with PolicyClient.http(services.policy_url, timeout_s=600) as client, Progress(console=console) as bar:
            for row in plan:
                job = bar.add_task(row.label, total=len(tasks))
                results[row] = _run_row(client, row, tasks, seed, in_flight, functools.partial(bar.advance, job))
        exits = services.stop()
    table = _table(results, problems, time.perf_counter() - started)
    console.print(table)
    bad = {name: code for name, code in exits.items() if code != 0}
    console.print(f"services stopped: {', '.join(f'{k} exit {v}' for k, v in exits.items())}")
    if bad:
        raise RuntimeError(f"a service did not exit cleanly: {bad}")
    return table


def _run_row(client: PolicyClient, row: Row, tasks, seed: int, in_flight: int, tick) -> Outcome:
    def one(index: int) -> tuple[float, int, bool | None]:
        task = tasks[index]
        t0 = time.perf_counter()
        res = client.search(
            task.prompt,
            strategy=row.strategy,
            n=row.n,
            reward=row.reward,
            reference=str(task.answer),
            seed=seed + index,
        )
        tick()
        correct = None if res.chosen is None else bool(res.candidates[res.chosen].correct)
        return time.perf_counter() - t0, res.usage.generated_tokens, correct

    with ThreadPoolExecutor(in_flight) as pool:
        done = list(pool.map(one, range(len(tasks))))
    return Outcome(
        correct=sum(c is True for _, _, c in done),
        failed=sum(c is None for _, _, c in done),
        tokens=sum(t for _, t, _ in done),
        latencies=[s for s, _, _ in done],
    )


def _table(results: dict[Row, Outcome], problems: int, seconds: float) -> Table:
    table = Table(title=f"Inference-time search on {problems} held-out problems, over HTTP ({seconds:.0f}s in all)")
    for name in ("strategy", "reward", "N", "accuracy", "tokens / problem", "p50 latency", "p95 latency"):
        table.add_column(name, justify="left" if name in ("strategy", "reward") else "right", no_wrap=True)
    for row, o in results.items():
        lat = sorted(o.latencies)
        p95 = lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))]
        failed = f" ({o.failed} no answer)" if o.failed else ""
        table.add_row(
            row.label,
            row.reward or "-",
            str(row.n),
            f"{o.correct / problems:.1%}{failed}",
            f"{o.tokens / problems:.0f}",
            f"{statistics.median(lat):.2f}s",
            f"{p95:.2f}s",
        )
    return table
