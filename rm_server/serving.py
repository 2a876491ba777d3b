"""The serving layer: validate a request, run its reward, build the response.

HTTP (`http_api.py`) and gRPC (`grpc_api.py`) both call `RewardService`, with the protocol
models, so the two cannot drift apart. Request-level problems raise `assay.base.errors.ServiceError`;
per-item problems become `ItemResult.error`. Metrics are recorded here, once for both.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Sequence

from assay.base.errors import LOADING_RETRY_AFTER_S, InvalidRequest, NotReady
from assay.rm_server.config import Limits
from assay.rm_server.errors import UnknownReward
from assay.rm_server.metrics import Metrics
from assay.rm_server.protocol import (
    CompareItem,
    CompareRequest,
    CompareResponse,
    CompareResult,
    ErrorInfo,
    ErrorType,
    Granularity,
    ItemResult,
    RewardInfo,
    RewardsResponse,
    ScoreItem,
    ScoreRequest,
    ScoreResponse,
    TokenScore,
)
from assay.rm_server.rewards import Item, ItemFailure, Outcome, Reward
from assay.rm_server.rewards.base import DEADLINE
from assay.rm_server.rewards.endpoint import Endpoint
from assay.rm_server.rewards.model import ModelReward


class RewardService:
    def __init__(self, rewards: dict[str, Reward], limits: Limits | None = None, metrics: Metrics | None = None):
        self.rewards = rewards
        self.limits = limits or Limits()
        self.metrics = metrics or Metrics(rewards)
        self.started = False
        for name, r in rewards.items():
            if hasattr(r, "on_batch"):
                r.on_batch = self.metrics.on_batch
            if isinstance(endpoint := getattr(r, "endpoint", None), Endpoint):  # the judge, remote.*
                endpoint.on_call = functools.partial(self.metrics.on_remote_call, name)

    async def start(self) -> None:
        """Start every reward at once (each model reward loads in a worker process of its own); if
        any fails, close them all and raise the first failure."""
        outcomes = await asyncio.gather(*(r.start() for r in self.rewards.values()), return_exceptions=True)
        if failed := [o for o in outcomes if isinstance(o, BaseException)]:
            await self.close()
            raise failed[0]
        self.started = True

    @property
    def ready(self) -> bool:
        """Started, and every reward can score (none has a model worker restarting)."""
        return self.started and all(r.ready() for r in self.rewards.values())

    async def close(self) -> None:
        self.started = False
        for r in self.rewards.values():
            await r.close()

    def queue_depths(self) -> dict[str, int]:
        return {name: r.queue_depth() for name, r in self.rewards.items()}

    def list_rewards(self) -> RewardsResponse:
        return RewardsResponse(
            rewards=[
                RewardInfo(
                    name=name,
                    type=r.type,
                    reward_id=r.reward_id,
                    needs_reference=r.needs_reference,
                    granularities=sorted(r.granularities, key=list(Granularity).index),
                    pairwise=r.pairwise,
                    pinned=r.pinned,
                )
                for name, r in self.rewards.items()
            ]
        )

    # --- score -------------------------------------------------------------------------------

    async def score(self, req: ScoreRequest) -> ScoreResponse:
        reward = self.reward(req.reward)
        if reward.pairwise:
            raise InvalidRequest(f"reward {req.reward!r} is pairwise: send its items to /v1/compare")
        if req.granularity not in reward.granularities:
            allowed = ", ".join(g.value for g in sorted(reward.granularities, key=list(Granularity).index))
            raise InvalidRequest(
                f"reward {req.reward!r} does not give {req.granularity.value} scores (it gives {allowed})"
            )
        self._check_items(reward, req.items, [i.response for i in req.items])
        items = [Item(i.conversation, i.response, i.reference, i.id, i.metadata) for i in req.items]
        outcomes = await self._with_deadline(reward.score(items, req.granularity), len(items), req.timeout_s)
        results = []
        for item, o in zip(req.items, outcomes, strict=True):
            if isinstance(o, ItemFailure):
                results.append(ItemResult(id=item.id, score=None, error=ErrorInfo(type=o.type, message=o.message)))
                self.metrics.items.labels(req.reward, o.type.value).inc()
                continue
            results.append(
                ItemResult(
                    id=item.id,
                    score=o.value,
                    steps=o.steps,
                    tokens=[TokenScore(text=t, score=s) for t, s in o.tokens] if o.tokens is not None else None,
                )
            )
            self.metrics.items.labels(req.reward, "ok").inc()
            self.metrics.values.labels(reward.reward_id).observe(o.value)
        return ScoreResponse(reward=req.reward, reward_id=reward.reward_id, results=results)

    # --- compare -----------------------------------------------------------------------------

    async def compare(self, req: CompareRequest) -> CompareResponse:
        reward = self.reward(req.reward)
        self._check_items(reward, req.items, [i.response_a + i.response_b for i in req.items])
        pairs = [
            (
                Item(i.conversation, i.response_a, i.reference, i.id, i.metadata),
                Item(i.conversation, i.response_b, i.reference, i.id, i.metadata),
            )
            for i in req.items
        ]
        outcomes = await self._with_deadline(reward.compare(pairs), len(pairs), req.timeout_s)
        results = []
        for item, o in zip(req.items, outcomes, strict=True):
            if isinstance(o, ItemFailure):
                results.append(CompareResult(id=item.id, prob_a=None, error=ErrorInfo(type=o.type, message=o.message)))
                self.metrics.items.labels(req.reward, o.type.value).inc()
                continue
            winner = "a" if o.prob_a > 0.5 else "b" if o.prob_a < 0.5 else "tie"
            results.append(
                CompareResult(id=item.id, prob_a=o.prob_a, winner=winner, scores=list(o.scores) if o.scores else None)
            )
            self.metrics.items.labels(req.reward, "ok").inc()
        return CompareResponse(reward=req.reward, reward_id=reward.reward_id, results=results)

    # --- whole texts (vLLM's pooling routes) --------------------------------------------------

    async def score_texts(
        self, name: str, texts: Sequence[str], *, add_special_tokens: bool, timeout_s: float | None = None
    ) -> tuple[ModelReward, list[tuple[Outcome, int]]]:
        """An outcome model's raw logit for each whole text, with the tokens it read, under this
        service's limits and deadline. Only outcome model rewards read a text whole."""
        reward = self.reward(name)
        if not isinstance(reward, ModelReward) or reward.process:
            raise InvalidRequest(
                f"reward {name!r} is {reward.type}: only model.outcome rewards score a whole text (vLLM's pooling "
                "routes send no prompt and response apart); score it through /v1/score"
            )
        if not texts:
            raise InvalidRequest("no input: send at least one text")
        if len(texts) > self.limits.max_items:
            raise InvalidRequest(f"{len(texts)} inputs in one request, more than the limit of {self.limits.max_items}")
        for i, text in enumerate(texts):
            if len(text) > self.limits.max_item_chars:
                raise InvalidRequest(
                    f"input {i} has {len(text)} characters, more than the limit of {self.limits.max_item_chars}"
                )
        work = reward.score_texts(texts, add_special_tokens)
        outcomes = await self._with_deadline(work, len(texts), timeout_s)
        outcomes = [o if isinstance(o, tuple) else (o, 0) for o in outcomes]  # the deadline's failures
        for o, _ in outcomes:
            self.metrics.items.labels(name, o.type.value if isinstance(o, ItemFailure) else "ok").inc()
        return reward, outcomes

    # --- shared ------------------------------------------------------------------------------

    def reward(self, name: str) -> Reward:
        """The reward of that name (404 `UnknownReward`; 503 while loading)."""
        if not self.started:
            raise NotReady("the reward service is still loading its models", retry_after_s=LOADING_RETRY_AFTER_S)
        try:
            return self.rewards[name]
        except KeyError:
            raise UnknownReward(f"unknown reward {name!r}; this server has {', '.join(self.rewards)}") from None

    def _check_items(self, reward: Reward, items: Sequence[ScoreItem | CompareItem], responses: Sequence[str]) -> None:
        """Refuse the request for its items' ids, sizes or missing references; `responses`: each
        item's response text (both responses of a compared pair)."""
        if not items:
            raise InvalidRequest("`items` is empty; send at least one item")
        if len(items) > self.limits.max_items:
            raise InvalidRequest(f"{len(items)} items in one request, more than the limit of {self.limits.max_items}")
        seen: set[str] = set()
        for item, response in zip(items, responses, strict=True):
            if item.id in seen:
                raise InvalidRequest(f"item id {item.id!r} appears twice; ids must be unique within a request")
            seen.add(item.id)
            if (size := _chars(item) + len(response)) > self.limits.max_item_chars:
                raise InvalidRequest(
                    f"item {item.id!r} has {size} characters, more than the limit of {self.limits.max_item_chars}"
                )
            if reward.needs_reference and item.reference is None:
                raise InvalidRequest(f"reward {reward.name!r} needs a `reference` and item {item.id!r} has none")

    async def _with_deadline(self, work, n: int, timeout_s: float | None) -> list:
        """Run a reward call under the request deadline.

        The rewards watch the deadline themselves (`rewards.base.DEADLINE`): items unfinished
        then fail with `timeout` and their queued work is dropped, finished ones keep their
        scores. The outer limit, a little later, is a backstop for work that does not watch."""
        timeout = min(timeout_s or self.limits.default_timeout_s, self.limits.max_timeout_s)
        token = DEADLINE.set(asyncio.get_running_loop().time() + timeout)
        try:
            return await asyncio.wait_for(work, timeout + 1.0)
        except TimeoutError:
            failure = ItemFailure(
                ErrorType.timeout, f"the request deadline of {timeout:g}s passed before scoring finished"
            )
            return [failure] * n
        finally:
            DEADLINE.reset(token)


def _chars(item: ScoreItem | CompareItem) -> int:
    """An item's size against `max_item_chars`, its response(s) aside: the prompt's text (or every
    message's), the reference, and the metadata as the JSON it arrived as."""
    prompt = item.prompt if item.prompt is not None else "".join(m.content for m in item.messages or ())
    metadata = len(json.dumps(item.metadata)) if item.metadata is not None else 0
    return len(prompt) + len(item.reference or "") + metadata
