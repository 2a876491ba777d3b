"""The reward service in this process: a reward-client transport over rm_server's own serving layer.

    from assay.clients import RewardClient
    from assay.rm_server.local import LocalTransport

    with RewardClient(LocalTransport(rewards=["correct"]), timeout_s=300) as rm:
        reward_fn = rm.as_reward_fn("correct")  # the service's scores and reward id, no network

Like httpx's ASGI transport, it puts the service behind the client's own interface: the rewards
are built from the same spec by the same code (`rewards.build_rewards`) and answered by the same
serving layer (`serving.RewardService`), on an event loop in the transport's own thread, so the
scores and reward ids are the service's. The client above it keeps its deadlines, retries and
id checks, and whoever holds the client (the trainer) cannot tell it from a remote one. That
makes the cost of the service measurable: the same run, with and without the network.

A request the service refuses (`errors.ServiceError`) becomes the client's typed error through
the client's own table (`clients.errors.BY_ERROR_TYPE`), as it does over HTTP and gRPC.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterable
from pathlib import Path
from typing import Any, TypeVar

from assay.base.errors import ServiceError
from assay.clients.errors import BY_ERROR_TYPE, DeadlineExceeded, RewardServiceError, ServerError
from assay.rm_server.errors import error_type
from assay.rm_server.protocol import CompareRequest, CompareResponse, RewardsResponse, ScoreRequest, ScoreResponse
from assay.rm_server.rewards import build_rewards
from assay.rm_server.serving import RewardService
from assay.rm_server.spec import SpecFile, dependencies, load_spec, reward_ids

T = TypeVar("T")
WHERE = "in-process rm_server"  # how its errors name the server


class LocalTransport:
    """The reward transport's methods (`score`, `compare`, `rewards`, `probe`, `close`), answered here.

    `spec`: a reward spec file (default: the embedded one, as `assay rm serve`). `rewards`: the
    names to serve, each loaded with the rewards it is composed of and nothing else (a reward
    model or judge no one asked for is never loaded); None serves every reward of the spec.
    """

    def __init__(self, spec: str | Path | None = None, rewards: Iterable[str] | None = None) -> None:
        loaded = load_spec(spec)
        names = list(loaded.rewards) if rewards is None else list(rewards)
        unknown = [n for n in names if n not in loaded.rewards]
        if unknown:
            known = ", ".join(loaded.rewards)
            raise ValueError(f"no reward {', '.join(map(repr, unknown))} in the spec; it has {known}")
        needed = _closure(loaded, names)
        served = loaded.model_copy(update={"rewards": {k: v for k, v in loaded.rewards.items() if k in needed}})
        # ids from the whole spec, as the service computes them (a composite's id covers its parts')
        self._service = RewardService(build_rewards(served, reward_ids(loaded)))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rm-server-local", daemon=True)
        self._thread.start()
        self._run(self._service.start(), None)

    def score(self, req: ScoreRequest, timeout: float) -> ScoreResponse:
        return self._run(self._service.score(req), timeout)

    def compare(self, req: CompareRequest, timeout: float) -> CompareResponse:
        return self._run(self._service.compare(req), timeout)

    def rewards(self, timeout: float) -> RewardsResponse:
        return self._service.list_rewards()

    def probe(self, what: str, timeout: float) -> bool:
        """health: the service's loop runs; ready: its rewards are loaded and started."""
        return self._loop.is_running() and (what == "health" or self._service.ready)

    def close(self) -> None:
        """Stop the rewards (their worker threads and processes) and the loop; a second call does nothing."""
        if self._loop.is_running():
            self._run(self._service.close(), None)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def _run(self, work: Coroutine[Any, Any, T], timeout: float | None) -> T:
        """`work` on the service's loop, waited on for `timeout` seconds; refusals raised as the client's."""
        future = asyncio.run_coroutine_threadsafe(work, self._loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()  # the service stops its work for this request, as when an HTTP caller hangs up
            raise DeadlineExceeded(f"{WHERE}: no answer within {timeout:g}s") from None
        except ServiceError as exc:
            raise client_error(exc) from None


def client_error(exc: ServiceError) -> RewardServiceError:
    """The exception a client of the service over HTTP would raise for the same refusal."""
    kind = error_type(exc)
    cls = BY_ERROR_TYPE.get(kind, ServerError)
    return cls(f"{WHERE}: {exc.message}", status=exc.status, type=kind, retry_after_s=exc.retry_after_s)


def _closure(spec: SpecFile, names: Iterable[str]) -> set[str]:
    """The rewards named and every reward they are composed of."""
    todo, seen = list(names), set()
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(dependencies(spec, name))
    return seen
