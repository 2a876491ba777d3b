"""The Ray Serve application on a local Ray cluster (tests/deploy/conftest.py): the policy app answers
the OpenAI SDK through Serve's proxy, and two rm_server replicas under steady load from RewardClient
threads lose nothing when one of them is killed mid-load.

Real parts only: Ray, Serve's proxy and controller, the services' own serving layers in the replicas,
the official `openai` client and Assay's RewardClient over HTTP on loopback. A replica is killed as a
crash kills it (`ray.kill` of its actor, no graceful shutdown); Serve notices and starts another.
"""

from __future__ import annotations

import threading
from collections import Counter

import httpx
import pytest

from assay.clients import RewardClient, ServiceError
from assay.deploy.app_args import Replicas
from tests.helpers import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ray = pytest.importorskip("ray")

from ray import serve  # noqa: E402  (after the skip: Ray is the `ray` extra)

from assay.deploy.ray_serve import REPLICA_HEADER, build_rm_app, policy_app  # noqa: E402
from assay.rm_server.config import ServerConfig as RewardConfig  # noqa: E402

ONE_CPU = {"num_replicas": 2, "num_cpus": 1}


def _replicas_seen(url: str, path: str, want: int, method: str = "GET", **request) -> set[str]:
    """The replica ids that answer `path`, asked until `want` different ones did (Serve spreads requests)."""
    seen: set[str] = set()
    for _ in range(200):
        r = httpx.request(method, f"{url}{path}", timeout=60, **request)
        assert r.status_code == 200, r.text
        seen.add(r.headers[REPLICA_HEADER])
        if len(seen) >= want:
            return seen
    raise AssertionError(f"only replicas {seen} answered {path}")


def test_two_policy_replicas_answer_the_openai_sdk_through_the_proxy(ray_cluster):
    import openai

    with ray_cluster.serve(policy_app({**ONE_CPU, "rm_check_interval_s": 3600}), "policy") as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused-on-loopback", max_retries=0)
        reply = client.completions.create(model="policy", prompt="Q: 12+30-5 A: ", max_tokens=16, temperature=0)
        assert reply.choices[0].text and reply.model == "policy"
        body = {"model": "policy", "prompt": "Q: 1+2 A: ", "max_tokens": 4}
        assert len(_replicas_seen(url, "/v1/completions", 2, method="POST", json=body)) == 2
        with pytest.raises(openai.NotFoundError, match="nope"):  # the service's own errors, through the proxy
            client.completions.create(model="nope", prompt="x", max_tokens=1)


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
    return 1.0 if response.rstrip().split("####")[-1].strip().lstrip("-").isdigit() and "####" in response else 0.0


def test_two_rm_replicas_lose_nothing_when_one_is_killed_mid_load(ray_cluster, rules_spec):
    config = RewardConfig(spec=rules_spec)
    app = build_rm_app(config, Replicas(num_replicas=2, num_cpus=1))
    with ray_cluster.serve(app, "rm") as url:
        before = _replicas_seen(url, "/v1/rewards", 2)
        ids = {r: httpx.get(f"{url}/v1/rewards").json() for r in before}
        answered: Counter[str] = Counter()
        scores: dict[str, float | None] = {}
        sent: dict[str, float] = {}
        errors: list[BaseException] = []
        lock, stop = threading.Lock(), threading.Event()

        def load(worker: int) -> None:
            with RewardClient.http(url, timeout_s=60) as client:
                n = 0
                while not stop.is_set():
                    items = []
                    for k in range(8):
                        item_id = f"w{worker}-{n}-{k}"
                        response = f"{n}+{k}={n + k} #### {n + k}" if k % 2 else f"{n}+{k}= no answer"
                        items.append({"id": item_id, "prompt": "Q: ", "response": response})
                        with lock:
                            sent[item_id] = _expected(response)
                    n += 1
                    try:
                        reply = client.score("format", items)
                    except ServiceError as exc:  # the client's error count: must stay 0
                        with lock:
                            errors.append(exc)
                        continue
                    with lock:
                        for result in reply.results:
                            answered[result.id] += 1
                            scores[result.id] = result.score

        workers = [threading.Thread(target=load, args=(w,), daemon=True) for w in range(4)]
        for w in workers:
            w.start()
        wait_for(lambda: len(answered) > 400, 120, "no steady load")
        victim = sorted(before)[0]
        ray.kill(_replica_actor(victim), no_restart=True)
        killed_at = len(answered)
        wait_for(lambda: _running_replicas("rm", "RewardDeployment") < 2, 60, "Serve did not see the replica die")
        wait_for(lambda: _running_replicas("rm", "RewardDeployment") == 2, 240, "Serve did not restart the replica")
        wait_for(lambda: len(answered) > killed_at + 400, 120, "the load did not go on after the restart")
        stop.set()
        for w in workers:
            w.join(90)
        after = _replicas_seen(url, "/v1/rewards", 2)
        assert victim not in after and len(after) == 2
        for r in after:
            ids[r] = httpx.get(f"{url}/v1/rewards").json()

    assert errors == [], [repr(e) for e in errors]
    assert set(answered) == set(sent), f"{len(set(sent) - set(answered))} items lost"
    assert max(answered.values()) == 1, "an item was answered twice"
    assert all(scores[i] == sent[i] for i in sent)
    reward_ids = {tuple(r["reward_id"] for r in body["rewards"]) for body in ids.values()}
    assert len(reward_ids) == 1  # the same reward ids on every replica, the restarted one too
