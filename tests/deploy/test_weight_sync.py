"""Weight versions across two policy replicas under Ray Serve (`deploy/weight_sync.py`), on the shared
local Ray cluster (tests/deploy/conftest.py): the app answers the official `openai` SDK through Serve's
proxy (both replicas), a GRPO run of a few steps samples only versions every
replica serves, and a replica killed during a push comes back at the current version before it
answers anything.

Real parts only: Ray, Serve's proxy and controller, the policy application's replicas (the embedded
policy), the trainer's own loop and `PolicyClient` over HTTP through the proxy, the reward in the
trainer's process over rm_server's in-process transport (the same reward code and id as the service).
A probe thread asks `/v1/models` through the proxy all along and records which replica
(`X-Assay-Replica`) served which version when. A replica is killed as a crash kills it (`ray.kill` of
its actor); Serve starts another.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import ray

from assay.checkpoints import EMBEDDED, load_embedded
from assay.clients import PolicyClient, RewardClient
from assay.deploy import weight_sync
from assay.deploy.app_args import Replicas
from assay.deploy.ray_serve import REPLICA_HEADER, build_policy_app
from assay.policy_server.config import ServerConfig as PolicyConfig
from assay.policy_server.protocol import ModelList
from assay.rm_server.local import LocalTransport
from assay.trainer.grpo import GRPOConfig, train
from assay.trainer.rundir import RunDir
from tests.helpers import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.xdist_group("ray")]  # one worker: one Ray at a time


APP = "wsync"
TINY = dict(prompts_per_step=2, group_size=4, max_tokens=24, lr=1e-4, checkpoint_every=10)  # 8 samples a step
TIMEOUT_S = 300.0
BENCH = Path(__file__).resolve().parents[2] / "bench" / "replica_push_bench.py"


@dataclass(frozen=True)
class Seen:
    """One probe answer: asked at `asked`, answered at `answered`, by `replica`, serving `version`."""

    asked: float
    answered: float
    replica: str
    version: int


class Probe(threading.Thread):
    """Asks `/v1/models` through the proxy until stopped, recording every answer."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.seen, self.halt = url, [], threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=60) as http:
            while not self.halt.is_set():
                asked = time.monotonic()
                try:
                    r = http.get(f"{self.url}/v1/models")
                except httpx.TransportError:
                    continue
                if r.status_code == 200:
                    (card,) = [c for c in ModelList.model_validate(r.json()).data if c.id == "policy"]
                    self.seen.append(Seen(asked, time.monotonic(), r.headers[REPLICA_HEADER], card.weight_version))
                time.sleep(0.02)

    def __enter__(self) -> Probe:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.halt.set()
        self.join(60)


@dataclass(frozen=True)
class Push:
    version: int
    sent: float
    answered: float


class RecordingPolicy(PolicyClient):
    """The trainer's client, recording when each push was sent and answered (what "live" is measured against)."""

    pushes: list[Push]

    def update_weights(self, tensors, **kw):
        sent = time.monotonic()
        reply = super().update_weights(tensors, **kw)
        self.pushes.append(Push(reply.weight_version, sent, time.monotonic()))
        return reply


def live_at(pushes: list[Push], asked: float, answered: float, start: int) -> set[int]:
    """The versions a replica may report to a question asked and answered then: the last version whose
    push was answered before it was asked, and any whose push overlapped the question."""
    before = [p.version for p in pushes if p.answered < asked]
    during = {p.version for p in pushes if p.sent <= answered and p.answered >= asked}
    return {before[-1] if before else start} | during


@pytest.fixture(scope="module")
def replicas(ray_cluster):
    """Two replicas of the embedded policy; their weight store is dropped after."""
    config = PolicyConfig(models={"policy": EMBEDDED["policy"][1]}, rm_check_interval_s=3600)
    with ray_cluster.serve(build_policy_app(config, Replicas(num_replicas=2, num_cpus=1)), APP) as url:
        yield url
    weight_sync.forget(APP)


def versions_by_replica(url: str, want: int = 2, tries: int = 100) -> dict[str, int]:
    """replica -> the policy's version it serves, asked through the proxy until `want` replicas answered
    (or `tries` answers came)."""
    seen: dict[str, int] = {}
    for _ in range(tries):
        r = httpx.get(f"{url}/v1/models", timeout=60)
        if r.status_code != 200:
            continue
        (card,) = [c for c in ModelList.model_validate(r.json()).data if c.id == "policy"]
        seen[r.headers[REPLICA_HEADER]] = card.weight_version
        if len(seen) >= want:
            break
    return seen


def test_two_policy_replicas_answer_the_openai_sdk_through_the_proxy(replicas):
    """The official `openai` SDK at the app's base URL (a path under Serve's proxy): completions from both
    replicas, the service's own errors through the proxy; Assay's PolicyClient at the same base URL."""
    import openai

    client = openai.OpenAI(base_url=f"{replicas}/v1", api_key="unused-on-loopback", max_retries=0)
    reply = client.completions.create(model="policy", prompt="Q: 12+30-5 A: ", max_tokens=16, temperature=0)
    assert reply.choices[0].text and reply.model == "policy"
    seen = set()
    for _ in range(200):
        raw = client.completions.with_raw_response.create(model="policy", prompt="Q: 1+2 A: ", max_tokens=4)
        seen.add(raw.headers[REPLICA_HEADER])
        if len(seen) == 2:
            break
    assert len(seen) == 2, seen
    with pytest.raises(openai.NotFoundError, match="nope"):
        client.completions.create(model="nope", prompt="x", max_tokens=1)
    with PolicyClient(replicas) as policy:
        assert policy.ready() and policy.weight_version("policy") == max(versions_by_replica(replicas).values())


def test_grpo_against_two_replicas_samples_only_versions_every_replica_serves(replicas, tmp_path):
    start = max(versions_by_replica(replicas).values())  # both replicas serve it (the other test may push)
    model, tok = load_embedded("policy")
    with (
        RecordingPolicy.http(replicas, timeout_s=TIMEOUT_S) as policy,
        RewardClient(LocalTransport(rewards=["correct"]), timeout_s=TIMEOUT_S) as rm,
        Probe(replicas) as probe,
    ):
        policy.pushes = []
        history = train(GRPOConfig(steps=3, **TINY), model, tok, policy, rm.as_reward_fn("correct"), RunDir(tmp_path))
    pushes = policy.pushes
    print(
        f"\nGRPO on 2 replicas: pushes {[p.version for p in pushes]} in "
        f"{[round(p.answered - p.sent, 3) for p in pushes]} s; {len(probe.seen)} probe answers from "
        f"{len({s.replica for s in probe.seen})} replicas"
    )
    # the run's first sync and one push per step, each version one past the last
    assert [p.version for p in pushes] == list(range(start + 1, start + 5))
    assert [m["weight_version"] for m in history] == [p.version for p in pushes[1:]]
    # every sample came from the version the trainer pushed last, on whichever replica made it
    assert all(m["samples"] == 8 and m["stale_dropped"] == 0 for m in history), history
    assert all(m["server_logprob_gap"] < 1e-3 for m in history)  # and from exactly the trainer's weights
    # once a push is answered, every replica serves its version: no replica ever answered an older one
    assert len({s.replica for s in probe.seen}) == 2
    wrong = [s for s in probe.seen if s.version not in live_at(pushes, s.asked, s.answered, start)]
    assert not wrong, wrong
    assert set(versions_by_replica(replicas).values()) == {pushes[-1].version}


def _replica_actor(replica_id: str):
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith(f"SERVE_REPLICA::{APP}#") and actor["name"].endswith(f"#{replica_id}"):
            return ray.get_actor(actor["name"], namespace=actor["namespace"])
    raise AssertionError(f"no actor for replica {replica_id}")


def test_a_replica_killed_during_a_push_comes_back_at_the_current_version(replicas):
    """One replica is killed while a push's body is on its way. Whether it was the one taking the push
    (the push then fails and is sent again) or the other, every replica, the new one included, serves
    the pushed version after, and the new replica's first answer is already at the current version."""
    before = versions_by_replica(replicas)
    victim = sorted(before)[0]
    version = max(before.values()) + 1
    model, _ = load_embedded("policy")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    with PolicyClient.http(replicas, timeout_s=TIMEOUT_S) as policy, Probe(replicas) as probe:
        from assay.clients import policy as policy_module

        chunks_of = policy_module.safetensors_chunks

        def killing_chunks(tensors, metadata=None):
            chunks, size = chunks_of(tensors, metadata)

            def cut():
                yield next(chunks)
                ray.kill(_replica_actor(victim), no_restart=True)
                yield from chunks

            return cut(), size

        policy_module.safetensors_chunks = killing_chunks
        try:
            outcome = _push(policy, state, version)
        finally:
            policy_module.safetensors_chunks = chunks_of
        if outcome != "landed":  # the victim took the push: it never landed, so it is sent once more
            assert policy.update_weights(state, version=version).weight_version == version
        pushed_at = time.monotonic()
        print(f"\nkilled {victim} during the push of {version}: {outcome}")
        # the probe is the only client now: the new replica's first answers are the probe's
        wait_for(lambda: any(s.replica not in before for s in probe.seen), 240, "a new replica answering")
    new = next(s.replica for s in probe.seen if s.replica not in before)
    first = min((s for s in probe.seen if s.replica == new), key=lambda s: s.asked)
    after = versions_by_replica(replicas)
    print(f"{new} first answered at {first.version}; the replicas now: {after}")
    assert victim not in after and set(after.values()) == {version}
    assert first.version == version
    assert all(s.version == version for s in probe.seen if s.asked > pushed_at)


def _push(policy: PolicyClient, state, version: int) -> str:
    """Push; "landed" when it was answered as applied, else what failed (the victim took it)."""
    from assay.clients.errors import ServiceError

    try:
        assert policy.update_weights(state, version=version).weight_version == version
        return "landed"
    except ServiceError as err:
        return type(err).__name__


def test_the_push_bench_measures_and_checks_every_replica(replicas):
    """bench/replica_push_bench.py's measuring parts, on this module's replicas (the bench's own Ray
    applications cost a minute more here): one timed push, and both replicas at its version after."""
    spec = importlib.util.spec_from_file_location("replica_push_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclass looks its module up there
    spec.loader.exec_module(bench)
    model, _ = load_embedded("policy")
    walls, last = bench.pushes(replicas, {k: v.contiguous() for k, v in model.state_dict().items()}, repeats=1)
    assert len(walls) == 1 and walls[0] > 0
    assert bench.served_versions(replicas, 2) == dict.fromkeys(versions_by_replica(replicas), last)
