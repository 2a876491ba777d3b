"""The Ray cluster the deploy tests share: one per test session (a local Ray takes 15-20 s to start here).

`ray_cluster` starts a local Ray the way `assay deploy ray` does by default: token authentication on
(`RAY_AUTH_MODE=token`, set when this file loads; Ray generates the token), no dashboard, a few logical
CPUs, and Serve's HTTP proxy on a free loopback port. Each test runs its applications with
`ray_cluster.serve(app, name)`, deleted after its block, so tests of several files (and helpers) share
the cluster without seeing each other's replicas. Serve and Ray are shut down at the end of the session.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from assay.services import free_port

# Ray reads its auth mode once, when it is first imported: this conftest is loaded before any test module
# under tests/deploy imports ray, and every Ray process the cluster starts inherits the variable.
os.environ["RAY_AUTH_MODE"] = "token"
# Ray gives its agents 30 s to register by default, which a loaded 2-core machine can miss (seen here)
os.environ.setdefault("RAY_agent_register_timeout_ms", "120000")
CLUSTER_CPUS = 4  # logical: replicas ask 1 each; what the tests run at once, plus a restarted replica
# Ray waits a fixed 30 s for its raylet to register (ray/_private/node.py); on a loaded 2-core machine (six
# sessions' Ray clusters at once) it can miss that, and a second start is the remedy.
STARTS = 3


@dataclass(frozen=True)
class RayCluster:
    """A running local Ray with Serve: `url` is the Serve proxy's base URL (`http://127.0.0.1:PORT`)."""

    url: str

    @contextmanager
    def serve(self, app, name: str, timeout_s: float = 300) -> Iterator[str]:
        """Run `app` as Serve application `name` under the route prefix `/name` until the block ends;
        yields its base URL (`{url}/{name}`). Serve returns once every replica's constructor has returned."""
        from ray import serve

        serve.run(app, name=name, route_prefix=f"/{name}", blocking=False)
        try:
            _wait_running(name, timeout_s)
            yield f"{self.url}/{name}"
        finally:
            serve.delete(name)


def _wait_running(name: str, timeout_s: float) -> None:
    import time

    from ray import serve
    from ray.serve.schema import ApplicationStatus

    deadline = time.monotonic() + timeout_s
    while True:
        app = serve.status().applications.get(name)
        if app is not None and app.status == ApplicationStatus.RUNNING:
            return
        assert app is None or app.status != ApplicationStatus.DEPLOY_FAILED, f"{name} failed: {app.message}"
        assert time.monotonic() < deadline, f"Serve application {name} not running within {timeout_s:g} s"
        time.sleep(0.5)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[RayCluster]:
    import ray  # the ray extra is in `all`, which the tests install: a missing Ray fails, never skips
    from ray import serve

    for attempt in range(STARTS):
        try:
            ray.init(num_cpus=CLUSTER_CPUS, include_dashboard=False, log_to_driver=False)
            break
        except Exception as exc:  # Ray raises a bare Exception for it
            if "timed out during startup" not in str(exc) or attempt == STARTS - 1:
                raise
            ray.shutdown()
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield RayCluster(url=f"http://127.0.0.1:{port}")
    finally:
        serve.shutdown()
        ray.shutdown()
