"""Serve's autoscaling of the reward app on the local Ray cluster (tests/deploy/conftest.py): one replica,
two under steady load, one again once the load stops.

Real parts only: Ray, Serve's controller, autoscaler and proxy, the reward service in each replica, httpx
clients on loopback. The app runs with `Replicas`' autoscaling options as `serve run ... max_replicas=2`
takes them, with short delays and a short look-back window so a scale takes seconds rather than Serve's
default minutes. Eight closed-loop clients keep about eight requests queued or running at the proxy,
against a target of one per replica: Serve wants more replicas than the two allowed, and adds the second.
Which replicas run is read from `serve.status()`; which answered, from each reply's `X-Assay-Replica`.
"""

from __future__ import annotations

import threading

import httpx
import pytest
from ray import serve

from assay.deploy.app_args import Replicas
from assay.deploy.ray_serve import REPLICA_HEADER, build_rm_app
from assay.rm_server.config import ServerConfig as RewardConfig
from tests.helpers import wait_for

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.xdist_group("ray"),  # one worker runs every Ray test: one Ray at a time
    pytest.mark.filterwarnings("ignore:The `metrics_interval_s` field:DeprecationWarning"),  # Ray 2.60 reads it
]


APP, DEPLOYMENT = "autoscale", "RewardDeployment"
CLIENTS = 8
SCALING = Replicas(
    num_replicas=1,
    min_replicas=1,
    max_replicas=2,
    target_ongoing_requests=1,
    upscale_delay_s=1,
    downscale_delay_s=2,
    look_back_period_s=2,
    metrics_interval_s=0.5,
    num_cpus=1,
)


def _running() -> int:
    deployment = serve.status().applications[APP].deployments[DEPLOYMENT]
    return deployment.replica_states.get("RUNNING", 0)


def test_the_reward_app_scales_from_one_replica_to_two_under_load_and_back(ray_cluster, rules_spec):
    app = build_rm_app(RewardConfig(spec=rules_spec), SCALING)
    with ray_cluster.serve(app, APP) as url:
        assert _running() == 1
        replicas: set[str] = set()
        statuses: dict[int, int] = {}
        wrong: list[str] = []
        lock, stop = threading.Lock(), threading.Event()

        def load(worker: int) -> None:
            with httpx.Client(base_url=url, timeout=120) as client:
                n = 0
                while not stop.is_set():
                    item = {"id": f"c{worker}-{n}", "prompt": "Q: ", "response": f"1+{n}={n + 1} #### {n + 1}"}
                    reply = client.post("/v1/score", json={"reward": "format", "items": [item]})
                    with lock:
                        statuses[reply.status_code] = statuses.get(reply.status_code, 0) + 1
                        if reply.status_code == 200:
                            replicas.add(reply.headers[REPLICA_HEADER])
                            if reply.json()["results"][0]["score"] != 1.0:
                                wrong.append(reply.text)
                    n += 1

        clients = [threading.Thread(target=load, args=(w,), daemon=True) for w in range(CLIENTS)]
        for c in clients:
            c.start()
        try:
            wait_for(lambda: _running() == 2, 240, "Serve did not add a second replica under load")
            wait_for(lambda: len(replicas) == 2, 120, "the second replica took no traffic")
        finally:
            stop.set()
            for c in clients:
                c.join(120)
        wait_for(lambda: _running() == 1, 240, "Serve did not go back to one replica once the load stopped")
        after = {httpx.get(f"{url}/v1/rewards", timeout=60).headers[REPLICA_HEADER] for _ in range(8)}

    assert set(statuses) == {200}, statuses  # scaling up and down failed no request
    assert wrong == []
    assert len(after) == 1 and after <= replicas  # the one left is one of the two that served
