"""Adapters over the services: a reward served by rm_server behind the `Scorer` protocol.

    with RewardClient.http("http://127.0.0.1:8000") as client:
        result = STRATEGIES["best_of_n"](prompt, generator, RemoteScorer(client, "orm"), config)
        result.reward_id     # the id rm_server reported, the same one the trainer sees

With `messages`, the search's prompt is a conversation (rendered by the policy's chat template
for generation), and every item is sent to rm_server as that conversation (`messages`) plus the
response, not as the rendered text: a reward model with `chat_template: true` renders it with its
own tokenizer's template, which need not be the policy's.

A failed item comes back as a Score with value None and the server's error (never a 0); a failed
call raises the client's typed exception. No torch here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from assay.clients.reward import RewardClient
from assay.search.base import Granularity, Score


class RemoteScorer:
    """Reward `reward` of the rm_server that `client` talks to (HTTP or gRPC).

    A request for step scores from a reward that gives none (an outcome model) asks for its
    outcome score instead, as the in-process scorers do; the reward's granularities are
    looked up once, on the first such request.
    """

    def __init__(
        self,
        client: RewardClient,
        reward: str,
        *,
        timeout_s: float | None = None,
        messages: Sequence[Mapping[str, str]] | None = None,
    ) -> None:
        self.client = client
        self.reward = reward
        self.timeout_s = timeout_s
        # the conversation the items' prompt renders: sent in its place (see the module docstring)
        self.messages = None if messages is None else [dict(m) for m in messages]
        self._granularities: set[str] | None = None

    def _supports(self, granularity: str) -> bool:
        if self._granularities is None:
            info = next(
                (r for r in self.client.rewards(timeout_s=self.timeout_s).rewards if r.name == self.reward), None
            )
            self._granularities = set() if info is None else {g.value for g in info.granularities}
        return granularity in self._granularities

    def score(
        self, items: Sequence[tuple[str, str]], granularity: Granularity = "outcome", reference: str | None = None
    ) -> tuple[list[Score], str]:
        if not items:
            return [], self.client.reward_id(self.reward, timeout_s=self.timeout_s)
        ref = {} if reference is None else {"reference": reference}
        payload = [
            {**({"prompt": p} if self.messages is None else {"messages": self.messages}), "response": r, **ref}
            for p, r in items
        ]
        if granularity == "steps" and not self._supports("steps"):
            granularity = "outcome"
        reply = self.client.score(self.reward, payload, granularity=granularity, timeout_s=self.timeout_s)
        return [
            Score(
                value=r.score,
                steps=None if r.steps is None else tuple(r.steps),
                error=None if r.error is None else f"{r.error.type.value}: {r.error.message}",
            )
            for r in reply.results
        ], reply.reward_id
