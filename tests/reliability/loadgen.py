"""Load from several clients at once, every item with an id of its own: what the load and kill tests share.

Each worker thread owns one client (HTTP or gRPC `RewardClient`, or `PolicyClient`) and sends
bounded loops of requests until told to stop. Reward items are worked solutions of training
problems, right or wrong, with ids unique across the whole run (`worker-request-item`), so the
tally can tell an item lost (its call failed as a whole), duplicated (its id came back twice)
or wrong (a score other than the one it must have) from one answered right.
"""

from __future__ import annotations

import functools
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from assay.arith import world
from assay.clients import PolicyClient, RewardClient
from assay.clients.errors import ServiceError
from assay.services import LocalServices

BATCH = 8  # items per score request


@dataclass(frozen=True)
class Item:
    prompt: str
    response: str
    reference: str


def items(n: int = 64, seed: int = 7) -> list[Item]:
    """`n` worked solutions, alternately right and wrong (the final answer off by one)."""
    out = []
    for i, p in enumerate(world.take("train", n, seed=seed)):
        response = p.solution if i % 2 == 0 else re.sub(r"-?\d+$", str(p.answer + 1), p.solution)
        out.append(Item(p.prompt, response, str(p.answer)))
    return out


def expected_scores(rm: RewardClient, pool: list[Item], rewards: tuple[str, ...]) -> dict[tuple[str, str], float]:
    """(reward, response) -> the score the server gives it alone: what every later answer must match."""
    out = {}
    for reward in rewards:
        reply = rm.score(reward, [{"prompt": i.prompt, "response": i.response, "reference": i.reference} for i in pool])
        for item, result in zip(pool, reply.results, strict=True):
            assert result.score is not None, result.error
            out[reward, item.response] = result.score
    return out


@dataclass
class Tally:
    """What the clients sent and what came back, over every thread."""

    requests: int = 0
    items: int = 0
    lost: int = 0  # items of calls that failed as a whole
    duplicated: int = 0  # ids answered more than once
    wrong: int = 0  # items answered with another score, or a failed item
    errors: list[str] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def failed(self, n_items: int, err: Exception) -> None:
        with self.lock:
            self.requests += 1
            self.items += n_items
            self.lost += n_items
            self.errors.append(str(err)[:300])

    def answered(self, ids: list[str], got: list[tuple[str, float | None]], want: list[float], tol: float) -> None:
        with self.lock:
            self.requests += 1
            self.items += len(ids)
            got_ids = [i for i, _ in got]
            self.lost += len(set(ids) - set(got_ids))
            for (item_id, score), expected in zip(got, want, strict=False):
                if item_id in self.seen:
                    self.duplicated += 1
                self.seen.add(item_id)
                if score is None or abs(score - expected) > tol:
                    self.wrong += 1

    def summary(self) -> str:
        return (
            f"{self.requests} requests, {self.items} items: {self.lost} lost, {self.duplicated} duplicated, "
            f"{self.wrong} wrong"
        )


def reward_client(services: LocalServices, transport: str, timeout_s: float = 120.0) -> Callable[[], RewardClient]:
    """A maker of rm_server clients over `transport` ("http" or "grpc"), retrying until `timeout_s`."""
    if transport == "http":
        return functools.partial(RewardClient.http, services.rm_url, timeout_s=timeout_s)
    return functools.partial(RewardClient.grpc, services.rm.grpc_target, timeout_s=timeout_s)


def score_worker(
    make: Callable[[], RewardClient],
    name: str,
    rewards: tuple[str, ...],
    pool: list[Item],
    expected: dict[tuple[str, str], float],
    tally: Tally,
    stop: threading.Event,
    *,
    max_requests: int = 10_000,
    timeout_s: float = 120.0,
) -> None:
    """Score batches of `pool` with each reward in turn until `stop` (or `max_requests`)."""
    with make() as client:
        for n in range(max_requests):
            if stop.is_set():
                return
            reward = rewards[n % len(rewards)]
            chosen = [pool[(n * BATCH + k) % len(pool)] for k in range(BATCH)]
            ids = [f"{name}-{n}-{k}" for k in range(BATCH)]
            batch = [
                {"id": i, "prompt": it.prompt, "response": it.response, "reference": it.reference}
                for i, it in zip(ids, chosen)
            ]
            try:
                reply = client.score(reward, batch, timeout_s=timeout_s)
            except ServiceError as err:
                tally.failed(len(ids), err)
                continue
            want = [expected[reward, it.response] for it in chosen]
            tally.answered(ids, [(r.id, r.score) for r in reply.results], want, tol=1e-3)


def policy_worker(
    url: str, tally: Tally, stop: threading.Event, *, max_requests: int = 10_000, timeout_s: float = 120.0
) -> None:
    """Short completions, two prompts x two samples each, until `stop`: every choice once, by index."""
    prompts = [p.prompt for p in world.take("train", 16, seed=11)]
    with PolicyClient.http(url, timeout_s=timeout_s) as policy:
        for n in range(max_requests):
            if stop.is_set():
                return
            ask = [prompts[(2 * n) % len(prompts)], prompts[(2 * n + 1) % len(prompts)]]
            ids = [f"policy-{n}-{k}" for k in range(4)]
            try:
                reply = policy.complete(ask, n=2, max_tokens=16, temperature=1.0, seed=n, timeout_s=timeout_s)
            except ServiceError as err:
                tally.failed(len(ids), err)
                continue
            got = [(f"policy-{n}-{c.index}", 0.0 if c.text is not None else None) for c in reply.choices]
            tally.answered(ids, got, [0.0] * len(got), tol=0.0)


def run_threads(targets: list[Callable[[], None]]) -> list[threading.Thread]:
    threads = [threading.Thread(target=t, daemon=True) for t in targets]
    for t in threads:
        t.start()
    return threads


def join(threads: list[threading.Thread], timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    for t in threads:
        t.join(max(0.0, end - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "a load thread did not finish in time"


def server_errors(url: str, metric: str) -> tuple[int, int]:
    """(requests, of which 5xx) from a service's /metrics counter `metric` (labelled by `code`)."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    total = errors = 0
    for family in text_string_to_metric_families(text):
        if family.name != metric:
            continue
        for sample in family.samples:
            if sample.name.endswith("_total"):
                total += int(sample.value)
                errors += int(sample.value) if sample.labels.get("code", "").startswith("5") else 0
    return total, errors


def rss_mb(pid: int) -> float:
    """Resident memory of process `pid`, in MB (/proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for process {pid}")
