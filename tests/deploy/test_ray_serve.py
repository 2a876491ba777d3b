"""The Ray Serve application on a local Ray cluster (tests/deploy/conftest.py): two rm_server replicas
under steady load from RewardClient threads lose nothing when one of them is killed mid-load (Serve's
proxy answers a bare 500 for what was in flight on it, which the client retries), and `assay deploy ray`
joins a cluster, serves and stops clean.

Real parts only: Ray, Serve's proxy and controller, the services' own serving layers in the replicas,
and Assay's RewardClient over HTTP on loopback. A replica is killed as a
crash kills it (`ray.kill` of its actor, no graceful shutdown); Serve notices and starts another.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
from collections import Counter

import httpx
import pytest
import ray
from ray import serve

from assay.checkpoints import EMBEDDED
from assay.clients import RewardClient, ServiceError
from assay.deploy.app_args import Replicas
from assay.deploy.ray_serve import REPLICA_HEADER, build_rm_app
from assay.rm_server.config import ServerConfig as RewardConfig
from tests.helpers import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.xdist_group("ray")]  # one worker: one Ray at a time


ONE_CPU = {"num_replicas": 2, "num_cpus": 1}


def _replicas_seen(url: str, path: str, want: int, method: str = "GET", **request) -> dict[str, httpx.Response]:
    """The answer of each replica to `path`, asked until `want` different ones answered (Serve spreads requests)."""
    seen: dict[str, httpx.Response] = {}
    for _ in range(200):
        r = httpx.request(method, f"{url}{path}", timeout=60, **request)
        assert r.status_code == 200, r.text
        seen[r.headers[REPLICA_HEADER]] = r
        if len(seen) >= want:
            return seen
    raise AssertionError(f"only replicas {sorted(seen)} answered {path}")


def _replica_actor(replica_id: str):
    """The Ray actor of the rm app's replica `replica_id` (Serve names it after the app, deployment and id)."""
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith("SERVE_REPLICA::") and actor["name"].endswith(f"#{replica_id}"):
            return ray.get_actor(actor["name"], namespace=actor["namespace"])
    raise AssertionError(f"no actor for replica {replica_id}")


def _running_replicas(app: str, deployment: str) -> int:
    status = serve.status().applications[app].deployments[deployment]
    return status.replica_states.get("RUNNING", 0)


def _expected(response: str) -> float:
    return 1.0 if response.endswith(f"#### {response.split('=')[1].split()[0]}") else 0.0


# What the ORM scores again and again, on every replica: its scores must agree (same checkpoint, same id)
ORM_ITEMS = [{"prompt": "Q: 23+45-17 A: ", "response": r} for r in ("23+45=68 68-17=51 #### 51", "23+45=68 #### 9")]


def test_two_rm_replicas_lose_nothing_when_one_is_killed_mid_load(ray_cluster, rules_spec, tmp_path):
    spec = tmp_path / "spec.yaml"  # the one rule, and the tiny ORM
    orm = f"  orm: {{type: model.outcome, path: {EMBEDDED['orm'][1]}, activation: sigmoid, max_tokens: 256}}\n"
    spec.write_text(rules_spec.read_text() + orm)
    # The ORM on the replica's own thread: three model-worker start-ups (two replicas and the restarted one)
    # cost this test about 100 s on a loaded 2-core machine; that workers exit with their replica was checked
    # with them on (the test's first version, four runs), and tests/rm_server/test_workers.py covers a worker's death.
    config = RewardConfig(spec=spec)
    config = dataclasses.replace(config, models=dataclasses.replace(config.models, model_workers=False))
    app = build_rm_app(config, Replicas(num_replicas=2, num_cpus=1))
    with ray_cluster.serve(app, "rm") as url:
        before = _replicas_seen(url, "/v1/rewards", 2)
        answered: Counter[str] = Counter()
        scores: dict[str, float | None] = {}
        sent: dict[str, float] = {}
        orm_scores: dict[str, list[float | None]] = {}
        errors: list[BaseException] = []
        lock, stop = threading.Lock(), threading.Event()

        def load(worker: int) -> None:
            with RewardClient.http(url, timeout_s=60) as client:
                n = 0
                while not stop.is_set():
                    items = []
                    for k in range(8):
                        item_id = f"w{worker}-{n}-{k}"
                        response = f"{n}+{k}={n + k} #### {n + k}" if k % 2 else f"{n}+{k}={n + k} no answer"
                        items.append({"id": item_id, "prompt": "Q: ", "response": response})
                        with lock:
                            sent[item_id] = _expected(response)
                    n += 1
                    try:
                        reply = client.score("format", items)
                        checked = client.score("orm", ORM_ITEMS) if n % 6 == 0 else None
                    except ServiceError as exc:  # the client's error count: must stay 0
                        with lock:
                            errors.append(exc)
                        continue
                    with lock:
                        for result in reply.results:
                            answered[result.id] += 1
                            scores[result.id] = result.score
                        for item, result in zip(ORM_ITEMS, checked.results if checked else (), strict=False):
                            orm_scores.setdefault(item["response"], []).append(result.score)

        workers = [threading.Thread(target=load, args=(w,), daemon=True) for w in range(4)]
        for w in workers:
            w.start()
        wait_for(lambda: len(answered) > 240, 300, "no steady load")
        victim = sorted(before)[0]
        ray.kill(_replica_actor(victim), no_restart=True)
        killed_at = len(answered)
        wait_for(lambda: _running_replicas("rm", "RewardDeployment") < 2, 120, "Serve did not see the replica die")
        wait_for(lambda: _running_replicas("rm", "RewardDeployment") == 2, 300, "Serve did not restart the replica")
        wait_for(lambda: len(answered) > killed_at + 240, 300, "the load did not go on after the restart")
        stop.set()
        for w in workers:
            w.join(90)
        after = _replicas_seen(url, "/v1/rewards", 2)
        assert victim not in after and len(after) == 2

    assert errors == [], [repr(e) for e in errors]
    assert set(answered) == set(sent), f"{len(set(sent) - set(answered))} items lost"
    assert max(answered.values()) == 1, "an item was answered twice"
    assert all(scores[i] == sent[i] for i in sent)
    reward_ids = {
        tuple(r["reward_id"] for r in answer.json()["rewards"]) for answer in [*before.values(), *after.values()]
    }
    assert len(reward_ids) == 1  # the same reward ids on every replica, the restarted one too
    for response, seen in orm_scores.items():  # and the same ORM scores (batching may move the last digits)
        assert None not in seen and max(seen) - min(seen) < 1e-4, (response, seen)


def test_assay_deploy_ray_joins_a_cluster_serves_and_stops_clean(ray_cluster, rules_spec):
    """The command as a user runs it, joining the session's cluster (with its token, which Ray keeps in
    ~/.ray/auth_token) and its Serve proxy: it prints the URL, serves, and on SIGINT deletes its app, exit 0."""
    port = ray_cluster.url.rsplit(":", 1)[1]
    argv = ["deploy", "ray", "--address", ray.get_runtime_context().gcs_address, "--port", port, "--only", "rm"]
    command = [sys.executable, "-m", "assay", *argv, "--rm-arg", f"spec={rules_spec}"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ))
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout or ()), daemon=True)
    reader.start()
    try:
        wait_for(lambda: any("serving" in line for line in lines) or proc.poll() is not None, 300, "no URL printed")
        assert f"rm: {ray_cluster.url}/rm\n" in lines, "".join(lines)
        with RewardClient.http(f"{ray_cluster.url}/rm") as client:
            reply = client.score("format", [{"prompt": "Q: ", "response": "1+1=2 #### 2"}])
        assert reply.results[0].score == 1.0
        proc.send_signal(signal.SIGINT)
        assert proc.wait(120) == 0, "".join(lines)
        assert "rm" not in serve.status().applications
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
