"""Sustained load from several clients at once against both real services on loopback.

Three HTTP and two gRPC reward clients (a rule through the math-verify pool, a model reward
through the batcher, a regex) and one policy client, each on its own thread, for LOAD_S seconds
(and a bounded number of requests each): every item comes back once, with the score it must
have, no call fails, the services count no 5xx, and their memory stays flat.
"""

from __future__ import annotations

import threading
import time

import pytest

from assay.clients import RewardClient
from assay.services import LocalServices
from tests.reliability import loadgen

pytestmark = [pytest.mark.reliability, pytest.mark.e2e]

LOAD_S = 25.0
REWARDS = ("correct", "orm", "format")


@pytest.fixture(scope="module")
def services():
    with LocalServices.start(rm_grpc=True) as svc:
        yield svc


def test_sustained_load_loses_doubles_and_leaks_nothing(services):
    pool = loadgen.items()
    with RewardClient.http(services.rm_url, timeout_s=120) as rm:
        expected = loadgen.expected_scores(rm, pool, REWARDS)

    def reward_worker(i: int, transport: str, tally: loadgen.Tally, stop: threading.Event, max_requests: int):
        make = loadgen.reward_client(services, transport)
        return lambda: loadgen.score_worker(
            make, f"{transport}{i}", REWARDS, pool, expected, tally, stop, max_requests=max_requests
        )

    def load(seconds: float, max_requests: int) -> loadgen.Tally:
        tally, stop = loadgen.Tally(), threading.Event()
        workers = [
            reward_worker(i, t, tally, stop, max_requests)
            for i, t in enumerate(["http", "http", "http", "grpc", "grpc"])
        ]
        workers.append(lambda: loadgen.policy_worker(services.policy_url, tally, stop, max_requests=max_requests))
        threads = loadgen.run_threads(workers)
        end = time.monotonic() + seconds
        while time.monotonic() < end and any(t.is_alive() for t in threads):
            time.sleep(0.2)
        stop.set()
        loadgen.join(threads, 180)
        return tally

    load(5.0, 50)  # warm-up: pools, batchers, allocator arenas
    rss_before = {s.name: loadgen.rss_mb(s.proc.pid) for s in (services.rm, services.policy)}
    start = time.monotonic()
    tally = load(LOAD_S, 2_000)
    seconds = time.monotonic() - start
    rss_after = {s.name: loadgen.rss_mb(s.proc.pid) for s in (services.rm, services.policy)}
    rm_total, rm_5xx = loadgen.server_errors(services.rm_url, "assay_rm_requests")
    policy_total, policy_5xx = loadgen.server_errors(services.policy_url, "assay_policy_requests")

    print(
        f"\nsustained load, {seconds:.1f}s, 5 reward clients (3 HTTP, 2 gRPC) + 1 policy client: {tally.summary()}; "
        f"{tally.requests / seconds:.1f} requests/s; server-counted requests: rm_server {rm_total} "
        f"({rm_5xx} 5xx), policy_server {policy_total} ({policy_5xx} 5xx); RSS MB after warm-up -> end: "
        + ", ".join(f"{k} {rss_before[k]:.0f} -> {rss_after[k]:.0f}" for k in rss_before)
    )
    assert tally.requests > 50 and rm_total > 0 and policy_total > 0
    assert (tally.lost, tally.duplicated, tally.wrong) == (0, 0, 0), tally.errors[:5]
    assert rm_5xx == 0 and policy_5xx == 0
    for name, before in rss_before.items():  # flat: within +50 MB or +20%, whichever is larger
        assert rss_after[name] <= before + max(50.0, 0.2 * before), (name, before, rss_after[name])
