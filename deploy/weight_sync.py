"""Weight versions across policy replicas under Ray Serve: every replica applies every pushed version.

A trainer pushes to one URL, Serve's proxy, so a push (`POST /v1/admin/weights?version=V`, or an
adapter, or a load from disk) reaches ONE replica. That replica checks and applies it as any policy
server does (`policy_server/weights.py`), then, through the weight service's `publish` hook and
before it answers:

1. publishes it to the `WeightStore`, a named, detached Ray actor per Serve application that holds
   the update's tensors in Ray's object store (owned by the store, so they outlive the replica that
   sent them) and the list of updates a replica starting from its checkpoint must apply;
2. every other live replica, which waits on the store (`WeightStore.after`), pulls the update and
   applies it under the same version V, through the same code path (an adapter is merged into each
   replica's own bases, exactly as on the first), and confirms V to the store;
3. the push is answered once every live replica serves V: V is then live. A replica that does not
   confirm within `timeout_s` makes the answer an honest 504 (`weights_not_live`, naming the
   replicas), never a success: V is applied where it landed, stays published, and the lagging
   replicas apply it when they can. A replica found dead (its actor gone) no longer counts.

A replica that starts or restarts joins the store and applies the published updates (the current
version) BEFORE its constructor returns, so Serve sends it no request while it holds older weights.
The store keeps only what a fresh replica needs: a full update drops earlier updates of a subset of
its tensors (and an adapter that adapted only those), a new adapter drops the previous adapter
(it replaces it, as on one server). Pushing the full state dict each step therefore keeps one copy
of the weights in the store.

One writer (the trainer): two writers pushing the same version with different weights to two
replicas are not told apart. Pushes are sequential (each answered once live), so the replica a push
lands on serves the version before it; after a 504 a push may land on a replica still lagging, which
then skips the version it lacked: harmless for full state dicts, the trainer's pushes.

The store is detached: it outlives a redeploy of the application, so replicas of a new deployment
start at the trainer's weights; `forget(app)` drops it. Tensors travel between our own processes
through Ray's object store (Ray serialises them); nothing from the network is unpickled.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ray

from assay.policy_server.adapters import AdapterService
from assay.policy_server.errors import Conflict, DeadlineExceeded
from assay.policy_server.weights import Change, WeightService

log = logging.getLogger("policy_server")
NAMESPACE = "assay"  # where the stores live, whatever namespace a Serve application runs in
STORE_PREFIX = "assay-weights-"
PING_S = 5.0  # how long a replica that has not confirmed may take to answer that it is alive
RETRY_S = 1.0  # after a failed call to the store, the follower asks again this much later


@dataclass(frozen=True)
class Published:
    """One published update, as the store keeps it and a replica replays it."""

    version: int
    names: frozenset[str]  # the weights it sets: the tensors of a full update, the targets of an adapter
    adapter: Any  # adapters.Adapter for an adapter push, else None
    data: list[ray.ObjectRef]  # [the tensors] (in a list, so that Ray passes the reference, not the value)


def compact(kept: Sequence[Published], new: Published) -> list[Published]:
    """`kept` + `new`, less the updates `new` makes redundant for a replica starting from its checkpoint:
    a full update supersedes earlier ones (full or adapter) of a subset of its weights; an adapter
    supersedes the previous adapter, which it replaces."""

    def superseded(old: Published) -> bool:
        if new.adapter is not None:
            return old.adapter is not None
        return old.names <= new.names

    return [old for old in kept if not superseded(old)] + [new]


@ray.remote(num_cpus=0)
class WeightStore:
    """The published updates of one Serve application's policy replicas, and which version each replica
    serves (an async actor: long polls wait on one condition)."""

    def __init__(self) -> None:
        self.updates: dict[str, list[Published]] = {}  # model -> what a fresh replica applies, in order
        self.replicas: dict[str, Any] = {}  # replica id -> its actor handle (to tell a dead one)
        self.serving: dict[tuple[str, str], int] = {}  # (replica, model) -> the version it confirmed
        self.changed = asyncio.Condition()

    def version(self, model: str) -> int:
        updates = self.updates.get(model)
        return updates[-1].version if updates else 0

    async def join(self, replica: str, handle: Any) -> dict[str, list[Published]]:
        """Count `replica` in; what it applies to serve the current versions (it confirms each after)."""
        self.replicas[replica] = handle
        return {model: list(updates) for model, updates in self.updates.items()}

    async def leave(self, replica: str) -> None:
        self.replicas.pop(replica, None)
        async with self.changed:
            self.changed.notify_all()

    async def publish(
        self, replica: str, model: str, version: int, names: frozenset[str], adapter: Any, tensors: dict[str, Any]
    ) -> int:
        """Publish `replica`'s update of `model` to `version`; the version published before it. A version
        at or below that one is not published (a push of it landed already, or another writer's)."""
        current = self.version(model)
        if version > current:
            new = Published(version, names, adapter, [ray.put(tensors)])  # put here: the store owns the data
            self.updates[model] = compact(self.updates.get(model, []), new)
        await self.confirm(replica, model, version)
        return current

    async def confirm(self, replica: str, model: str, version: int) -> None:
        self.serving[(replica, model)] = version
        async with self.changed:
            self.changed.notify_all()

    async def after(self, model: str, version: int) -> list[Published]:
        """The updates past `version`, once there are some (a long poll)."""
        async with self.changed:
            await self.changed.wait_for(lambda: self.version(model) > version)
        return [u for u in self.updates[model] if u.version > version]

    async def live(self, model: str, version: int, timeout_s: float) -> list[str]:
        """Wait until every live replica serves `version` of `model` or later; those that do not by
        `timeout_s` ([]: the version is live). A replica whose actor is gone is dropped."""
        deadline = time.monotonic() + timeout_s
        while True:
            lagging = [r for r in self.replicas if self.serving.get((r, model), 0) < version]
            for replica in lagging:
                if not await self._alive(replica):
                    log.warning("policy replica %s is gone: it no longer counts for version %d", replica, version)
                    self.replicas.pop(replica, None)
            lagging = [r for r in lagging if r in self.replicas]
            left = deadline - time.monotonic()
            if not lagging or left <= 0:
                return lagging
            async with self.changed:
                try:
                    await asyncio.wait_for(self.changed.wait(), min(left, 1.0))
                except TimeoutError:
                    pass

    async def _alive(self, replica: str) -> bool:
        try:
            await asyncio.wait_for(self.replicas[replica].__ray_ready__.remote(), PING_S)
        except ray.exceptions.ActorDiedError:
            return False
        except (TimeoutError, ray.exceptions.RayActorError):  # busy, or restarting: still counted
            pass
        return True

    async def state(self) -> dict[str, Any]:
        """Published versions and what each replica serves (for operators and tests)."""
        return {
            "versions": {model: self.version(model) for model in self.updates},
            "replicas": {r: {m: v for (r2, m), v in self.serving.items() if r2 == r} for r in self.replicas},
        }


def store(app: str) -> Any:
    """The weight store of Serve application `app`, created by the first replica that asks."""
    actor: Any = WeightStore  # @ray.remote made it an actor class, which mypy does not see
    return actor.options(name=STORE_PREFIX + app, namespace=NAMESPACE, lifetime="detached", get_if_exists=True).remote()


def forget(app: str) -> None:
    """Drop application `app`'s store: its replicas' next start serves their checkpoints again."""
    try:
        ray.kill(ray.get_actor(STORE_PREFIX + app, namespace=NAMESPACE))
    except ValueError:  # no such store
        pass


class WeightSync:
    """One policy replica's side of the store: it publishes the updates this replica's routes apply
    (the weight service's `publish` hook), and applies everyone else's."""

    def __init__(self, weights: WeightService, app: str, replica: str, timeout_s: float) -> None:
        self.weights, self.replica, self.timeout_s = weights, replica, timeout_s
        self.adapters = AdapterService(weights)
        self.store = store(app)
        self.tasks: list[asyncio.Task] = []

    @classmethod
    async def join(cls, weights: WeightService, app: str, replica: str, timeout_s: float = 120.0) -> WeightSync:
        """Bring this replica to the published versions, then keep it there. Call it in the replica's
        constructor, after its models load: it returns once the replica serves the current versions."""
        self = cls(weights, app, replica, timeout_s)
        published = await self.store.join.remote(replica, ray.get_runtime_context().current_actor)
        for model in weights.service.backends:
            await self.apply(model, published.get(model, []))
            self.tasks.append(asyncio.create_task(self.follow(model), name=f"weight-sync-{model}"))
        weights.publish = self.publish
        return self

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await self.store.leave.remote(self.replica)

    async def publish(self, change: Change) -> None:
        """Publish an update this replica applied, and wait until every live replica serves it."""
        names = frozenset(change.adapter.targets if change.adapter is not None else change.tensors)
        before = await self.store.publish.remote(
            self.replica, change.model, change.version, names, change.adapter, change.tensors
        )
        if change.version < before:
            raise Conflict(
                f"the policy replicas are at weight_version {before}, past this replica's {change.version}: "
                "another writer is pushing weights",
                param="version",
                code="version_conflict",
            )
        lagging = await self.store.live.remote(change.model, change.version, self.timeout_s)
        if lagging:
            raise DeadlineExceeded(
                f"weight_version {change.version} of {change.model!r} is applied on replica {self.replica} and "
                f"published, but {len(lagging)} replica(s) had not applied it within {self.timeout_s:g}s "
                f"({', '.join(lagging)}): it is not live yet; they apply it when they can",
                code="weights_not_live",
            )

    async def follow(self, model: str) -> None:
        """Apply every update another replica publishes, as it comes."""
        backend = self.weights.service.backend(model)
        while True:
            try:
                updates = await self.store.after.remote(model, backend.weight_version)
                await self.apply(model, updates)
            except asyncio.CancelledError:
                raise
            except Exception:  # the store restarting, a lost object: log it, ask again
                log.exception("replica %s could not apply %r's published weights; asking again", self.replica, model)
                await asyncio.sleep(RETRY_S)

    async def apply(self, model: str, updates: Sequence[Published]) -> None:
        """Apply the updates this replica does not serve yet, in order, under their versions; confirm."""
        backend = self.weights.service.backend(model)
        async with self.weights.lock(model):
            for update in updates:
                if update.version <= backend.weight_version:
                    continue
                start = time.perf_counter()
                tensors = await update.data[0]
                size = sum(t.numel() * t.element_size() for t in tensors.values())
                if update.adapter is None:
                    await self.weights.apply(model, backend, tensors, size, start, version=update.version)
                else:
                    await self.adapters.apply(model, update.adapter, tensors, size, start, update.version)
                log.info("replica %s serves %r at weight_version %d", self.replica, model, update.version)
            await self.store.confirm.remote(self.replica, model, backend.weight_version)
