"""Clients over several real servers (issue 15): rm_server and policy_server processes on loopback,
one client each over all of them.

- Three rm_server replicas under steady load from two HTTP and two gRPC clients with ids; one is
  SIGKILLed mid-load: no item lost, duplicated or scored wrong, no error reaches the callers; the
  load spreads (every replica's /metrics count of score requests grows) and the restarted replica
  takes load again.
- A large batch is split over the replicas and answered in item order (sync and async, HTTP and gRPC).
- A service address (`dns+http://rm.test:PORT`, `dns:///rm.test:PORT`) reaches every address of its
  name, asking each for the name. The name is the test resolver hook: `socket.getaddrinfo` answers
  rm.test with 127.0.0.1 and 127.0.0.2 (two loopback addresses, one server on each, same port), as a
  Kubernetes headless Service answers one address per pod; the servers answer the name only because
  they are started with `--allowed-host rm.test`.
- PolicyClient over two policy_server replicas: completions spread; a push with a target version
  reaches both; a replica restarted (back at version 0) gets the current version when it is pushed
  again, while the other, at it already, counts as done.

Each server runs as a user starts it (`python -m assay.rm_server`, `python -m assay.policy_server`).
"""

from __future__ import annotations

import asyncio
import functools
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from assay.clients import AsyncRewardClient, Conflict, PolicyClient, RewardClient
from assay.services import free_port
from tests.helpers import wait_for, wait_ready
from tests.reliability import loadgen

pytestmark = [pytest.mark.service, pytest.mark.slow]

RULES = """rewards:
  correct: {type: rule.math_equal, answer_pattern: "####\\\\s*(-?\\\\d+)\\\\s*$"}
  format: {type: rule.regex, pattern: "^(-?\\\\d+[+-]\\\\d+=-?\\\\d+ )*#### -?\\\\d+$", mode: fullmatch}
"""
REWARDS = ("correct", "format")
ANSWER_2 = 'rewards:\n  two: {type: rule.regex, pattern: "#### 2$"}\n'  # no worker pool: starts at once
TIMEOUT_S = 180.0  # every call's deadline: a replica restarting on a busy 2-core machine takes a while


@dataclass
class Server:
    """One server process, restartable on the same ports."""

    argv: list[str]
    url: str
    log: Path
    grpc_target: str | None = None
    proc: subprocess.Popen | None = None

    def start(self) -> Server:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT)
        return self

    def ready(self, host: str | None = None) -> Server:
        """Once it answers /ready (asked for `host`: a server that answers other names only)."""
        assert self.proc is not None
        if host is None:
            wait_ready(self.proc, self.url, log=self.log)
            return self
        proc, headers = self.proc, {"host": host}

        def answers() -> bool:
            assert proc.poll() is None, f"the server exited while starting:\n{self.log.read_text()[-3000:]}"
            try:
                return httpx.get(f"{self.url}/ready", headers=headers, timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(answers, 300, f"{self.url} was not ready", every_s=0.2)
        return self

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()


def rm_server(
    tmp: Path, name: str, host: str = "127.0.0.1", port: int = 0, grpc_port: int = 0, *extra: str, rules: str = RULES
) -> Server:
    spec = tmp / f"{name}.yaml"
    spec.write_text(rules)
    port, grpc_port = port or free_port(), grpc_port or free_port()
    argv = [sys.executable, "-m", "assay.rm_server", "--host", host, "--port", str(port)]
    argv += ["--grpc-port", str(grpc_port), "--spec", str(spec), "--log-level", "warning", *extra]
    return Server(argv, f"http://{host}:{port}", tmp / f"{name}.log", f"{host}:{grpc_port}")


def scored(url: str) -> int:
    """Score calls a replica has answered, HTTP and gRPC (its /metrics `assay_rm_requests`)."""
    return routes_served(url, "assay_rm_requests", ("score", "Score"))


def routes_served(url: str, metric: str, routes: tuple[str, ...], host: str | None = None) -> int:
    headers = {"host": host} if host else {}
    text = httpx.get(f"{url}/metrics", headers=headers, timeout=30).text
    return sum(
        int(s.value)
        for family in text_string_to_metric_families(text)
        if family.name == metric
        for s in family.samples
        if s.name.endswith("_total") and any(r in s.labels.get("route", "") for r in routes)
    )


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("replicas")
    servers = [rm_server(tmp, f"rm{i}").start() for i in range(3)]
    try:
        for s in servers:
            s.ready()
        yield servers
    finally:
        for s in servers:
            s.stop()


@pytest.fixture(scope="module")
def pool_and_scores(three):
    pool = loadgen.items()
    with RewardClient.http(three[0].url, timeout_s=TIMEOUT_S) as rm:
        return pool, loadgen.expected_scores(rm, pool, REWARDS)


def test_three_replicas_under_load_lose_nothing_when_one_is_killed_and_take_it_back(three, pool_and_scores):
    pool, expected = pool_and_scores
    urls, targets = ",".join(s.url for s in three), [s.grpc_target for s in three]
    makers = {
        "http": functools.partial(RewardClient.http, urls, timeout_s=TIMEOUT_S),
        "grpc": functools.partial(RewardClient.grpc, targets, timeout_s=TIMEOUT_S),
    }
    before = [scored(s.url) for s in three]
    tally, stop = loadgen.Tally(), threading.Event()
    workers = [
        functools.partial(
            loadgen.score_worker, makers[t], f"{t}{i}", REWARDS, pool, expected, tally, stop, timeout_s=TIMEOUT_S
        )
        for i, t in enumerate(["http", "http", "grpc", "grpc"])
    ]
    threads = loadgen.run_threads(workers)
    try:
        wait_for(lambda: tally.requests >= 24, 120, "the load did not start")
        spread = [scored(s.url) - b for s, b in zip(three, before, strict=True)]
        three[0].kill()  # SIGKILL with requests in flight
        at_kill = tally.requests
        wait_for(lambda: tally.requests >= at_kill + 24, 120, "the load stopped with a replica down")
        three[0].start().ready()
        back = scored(three[0].url)
        wait_for(lambda: scored(three[0].url) > back + 2, 120, "the restarted replica took no load", every_s=0.5)
    finally:
        stop.set()
        loadgen.join(threads, 180)
    print(f"\n3 rm_server replicas, one SIGKILLed mid-load and restarted: {tally.summary()}; spread {spread}")
    assert all(n > 0 for n in spread), spread  # every replica took score calls
    assert tally.errors == [] and (tally.lost, tally.duplicated, tally.wrong) == (0, 0, 0)


def test_a_large_batch_is_split_over_the_replicas_and_answered_in_item_order(three, pool_and_scores):
    pool, expected = pool_and_scores
    items = [
        {"id": f"big-{k}", "prompt": it.prompt, "response": it.response, "reference": it.reference}
        for k, it in enumerate(pool)
    ]  # 64 items: 3 shards of 21-22
    want = [expected["correct", it.response] for it in pool]
    urls, targets = [s.url for s in three], [s.grpc_target for s in three]

    async def both_async() -> list:
        async with (
            AsyncRewardClient.http(urls, timeout_s=TIMEOUT_S) as h,
            AsyncRewardClient.grpc(targets, timeout_s=TIMEOUT_S) as g,
        ):
            return [await h.score("correct", items), await g.score("correct", items)]

    for make, where in ((RewardClient.http, urls), (RewardClient.grpc, targets)):
        before = [scored(s.url) for s in three]
        with make(where, timeout_s=TIMEOUT_S) as rm:
            reply = rm.score("correct", items)
        assert [scored(s.url) - b for s, b in zip(three, before, strict=True)] == [1, 1, 1]  # one shard each
        assert [r.id for r in reply.results] == [i["id"] for i in items]
        assert [r.score for r in reply.results] == want
    for reply in asyncio.run(both_async()):
        assert [r.id for r in reply.results] == [i["id"] for i in items]
        assert [r.score for r in reply.results] == want


@pytest.fixture
def rm_test_resolves_to_two_loopback_addresses(monkeypatch):
    """The test resolver hook: rm.test -> 127.0.0.1 and 127.0.0.2; every other name as before."""
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host != "rm.test":
            return real(host, port, *args, **kwargs)
        return [info for ip in ("127.0.0.1", "127.0.0.2") for info in real(ip, port, *args, **kwargs)]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def test_a_service_address_reaches_every_address_of_its_name_asking_for_the_name(
    tmp_path, rm_test_resolves_to_two_loopback_addresses
):
    port, grpc_port = free_port(), free_port()
    servers = [
        rm_server(tmp_path, f"rm-{ip}", ip, port, grpc_port, "--allowed-host", "rm.test", rules=ANSWER_2).start()
        for ip in ("127.0.0.1", "127.0.0.2")
    ]
    try:
        for s in servers:
            s.ready(host=f"rm.test:{port}")
        # by its own address the second replica refuses: it answers loopback names and rm.test only
        assert httpx.get(f"{servers[1].url}/v1/rewards", timeout=30).status_code == 403
        items = [
            {"id": str(k), "prompt": "Q: 1+1 A: ", "response": f"1+1=2 #### {k}", "reference": "2"} for k in range(40)
        ]
        want = [1.0 if k == 2 else 0.0 for k in range(40)]
        with (
            RewardClient.http(f"dns+http://rm.test:{port}", timeout_s=TIMEOUT_S) as h,
            RewardClient.grpc(f"dns:///rm.test:{grpc_port}", timeout_s=TIMEOUT_S) as g,
        ):
            assert h.urls == [f"http://127.0.0.1:{port}", f"http://127.0.0.2:{port}"]
            assert g.urls == [f"127.0.0.1:{grpc_port}", f"127.0.0.2:{grpc_port}"]
            for client in (h, g):
                before = [scored_as(s, "rm.test") for s in servers]
                assert [r.score for r in client.score("two", items).results] == want  # 2 shards of 20
                assert [scored_as(s, "rm.test") - b for s, b in zip(servers, before, strict=True)] == [1, 1]
    finally:
        for s in servers:
            s.stop()


def scored_as(server: Server, host: str) -> int:
    return routes_served(server.url, "assay_rm_requests", ("score", "Score"), host=host)


# --- the policy service ------------------------------------------------------------------------


@pytest.fixture
def two_policies(three, tmp_path):
    servers = []
    for i in range(2):
        port = free_port()
        argv = [sys.executable, "-m", "assay.policy_server", "--port", str(port), "--rm-url", three[1].url]
        argv += ["--torch-threads", "1", "--log-level", "warning"]
        servers.append(Server(argv, f"http://127.0.0.1:{port}", tmp_path / f"policy{i}.log").start())
    try:
        for s in servers:
            s.ready()
        yield servers
    finally:
        for s in servers:
            s.stop()


def test_a_policy_client_spreads_completions_and_pushes_a_version_to_every_replica(two_policies):
    from assay.checkpoints import load_embedded

    a, b = two_policies
    completions = functools.partial(routes_served, metric="assay_policy_requests", routes=("completions",))
    state = load_embedded("policy")[0].state_dict()
    with PolicyClient([a.url, b.url], timeout_s=TIMEOUT_S) as policy:
        assert policy.urls == [a.url, b.url]
        before = [completions(s.url) for s in two_policies]
        for n in range(6):
            policy.complete(["Q: 2+3 A: "], max_tokens=8, seed=n)
        assert all(completions(s.url) > n for s, n in zip(two_policies, before, strict=True))  # both answered

        pushed = policy.update_weights(state, version=3)
        assert (pushed.previous_version, pushed.weight_version) == (0, 3) and pushed.tensors > 0
        assert policy.weight_versions() == {a.url: 3, b.url: 3} and policy.weight_version() == 3
        again = policy.update_weights(state, version=3)  # both at 3 already: each 409 counts as done
        assert (again.previous_version, again.weight_version, again.tensors) == (3, 3, 0)
        with pytest.raises(Conflict):
            policy.update_weights(state, version=2)  # below what both serve
        with pytest.raises(ValueError, match="version=V"):
            policy.update_weights(state)

        b.kill()
        b.start().ready()  # back at its start-up checkpoint: version 0
        assert policy.weight_versions() == {a.url: 3, b.url: 0} and policy.weight_version() == 0
        caught_up = policy.update_weights(state, version=3)  # a: at 3 (409, done); b: pushed
        assert (caught_up.previous_version, caught_up.weight_version) == (0, 3)
        assert policy.weight_versions() == {a.url: 3, b.url: 3}
        replies = [policy.complete(["Q: 2+3 A: "], max_tokens=4, seed=n) for n in range(4)]
        assert {c.weight_version for r in replies for c in r.choices} == {3}
