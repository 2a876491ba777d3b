"""Prometheus metrics of the reward service, in a registry of its own (one per server).

Requests, latency and queue depth are the base's (`assay.base.metrics`); batches, items,
score values and the requests of remote rewards to their servers are this service's. Label
values come only from names the server declares (its spec's reward names, its routes, its error
types): a request naming an unknown reward is counted
under `UNKNOWN`, so client text can never add series to /metrics (a 1 MiB reward name once grew
a scrape 1000-fold).
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import Counter, Histogram

from assay.base.metrics import SIZE_BUCKETS, RequestMetrics

# Reward values vary in scale (probabilities, logits, penalties); these buckets cover the usual ones.
VALUE_BUCKETS = (-10, -5, -2, -1, -0.5, -0.25, 0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1, 2, 5, 10)
UNKNOWN = "(unknown)"  # the one label of every reward name the server does not have


class Metrics(RequestMetrics):
    def __init__(self, rewards: Iterable[str] = ()) -> None:
        super().__init__("assay_rm", "reward", "Items waiting for a model batch")
        self.rewards = frozenset(rewards)  # the reward names that may be label values
        r = self.registry
        self.batch_size = Histogram(
            "assay_rm_batch_items", "Items per model batch", ["reward"], buckets=SIZE_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "assay_rm_batch_tokens",
            "Tokens per model batch",
            ["reward"],
            buckets=tuple(64 * b for b in SIZE_BUCKETS),
            registry=r,
        )
        self.items = Counter("assay_rm_items", "Scored items by reward and status", ["reward", "status"], registry=r)
        self.remote = Histogram(
            "assay_rm_remote_request_seconds",
            "Requests to the servers of rewards computed elsewhere (judge, remote.*), per attempt, by outcome",
            ["reward", "outcome"],
            registry=r,
        )
        self.values = Histogram(
            "assay_rm_reward_value",
            "Distribution of scores per reward id (watch for drift)",
            ["reward_id"],
            buckets=VALUE_BUCKETS,
            registry=r,
        )

    def reward_label(self, name: str) -> str:
        """`name` when the server declares that reward, else the one fixed `UNKNOWN`."""
        return name if name in self.rewards else UNKNOWN

    def on_remote_call(self, reward: str, outcome: str, seconds: float) -> None:
        """One attempt at a remote server: `outcome` is "ok" or the ErrorType its failure has."""
        self.remote.labels(reward, outcome).observe(seconds)

    def on_batch(self, reward: str, items: int, tokens: int) -> None:
        self.batch_size.labels(reward).observe(items)
        self.batch_tokens.labels(reward).observe(tokens)
