"""A reward computed in this process by rm_server's own code, for runs without the service.

    reward_fn = InProcessReward("correct")          # the embedded spec; or InProcessReward(name, spec=path)
    reward_fn(prompts, completions, reference=refs) # -> list[float | None], like RewardClient.as_reward_fn
    reward_fn.reward_id                             # the id rm_server serves the same reward under

The reward is built from the same spec by the same code (`rm_server.rewards.build_rewards`) and
served by the same serving layer (`RewardService`), on an event loop of its own thread, so the
scores and the reward id are the service's, without HTTP. That makes the cost of going through
the service measurable: the same trainer, the same reward, with and without the network.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from assay.clients.reward import reward_fn_items, reward_fn_scores
from assay.rm_server.protocol import ScoreRequest
from assay.rm_server.rewards import build_rewards
from assay.rm_server.serving import RewardService
from assay.rm_server.spec import dependencies, load_spec, reward_ids


class InProcessReward:
    def __init__(self, name: str, spec: str | Path | None = None, timeout_s: float = 120.0) -> None:
        loaded = load_spec(spec)
        if name not in loaded.rewards:
            raise ValueError(f"no reward {name!r} in the spec; it has {', '.join(loaded.rewards)}")
        needed = _closure(loaded, name)  # the reward and its parts: nothing else is loaded
        ids = reward_ids(loaded)
        built = build_rewards(loaded.model_copy(update={"rewards": {k: loaded.rewards[k] for k in needed}}), ids)
        self.name, self.reward_id, self.timeout_s = name, built[name].reward_id, timeout_s
        self.__name__ = name
        self._service = RewardService(built)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"reward-{name}", daemon=True)
        self._thread.start()
        self._run(self._service.start())

    def __call__(self, prompts: Sequence, completions: Sequence, **kw: Any) -> list[float | None]:
        items = reward_fn_items(prompts, completions, kw.get("reference"))
        if not items:
            return []
        reply = self._run(self._service.score(ScoreRequest(reward=self.name, items=items, timeout_s=self.timeout_s)))
        return reward_fn_scores(reply, self.reward_id)

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def close(self) -> None:
        if self._loop.is_running():
            self._run(self._service.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def __enter__(self) -> InProcessReward:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _closure(spec, name: str) -> set[str]:
    """The reward and every reward it is composed of."""
    todo, seen = [name], set()
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(dependencies(spec, n))
    return seen
