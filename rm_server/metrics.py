"""Prometheus metrics of the reward service, in a registry of its own (one per server).

Label values come only from names the server declares (its spec's reward names, its routes,
its error types): a request naming an unknown reward is counted under `UNKNOWN`, so client
text can never add series to /metrics (a 1 MiB reward name once grew a scrape 1000-fold).
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Reward values vary in scale (probabilities, logits, penalties); these buckets cover the usual ones.
VALUE_BUCKETS = (-10, -5, -2, -1, -0.5, -0.25, 0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1, 2, 5, 10)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
UNKNOWN = "(unknown)"  # the one label of every reward name the server does not have


class Metrics:
    def __init__(self, rewards: Iterable[str] = ()) -> None:
        self.rewards = frozenset(rewards)  # the reward names that may be label values
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "assay_rm_requests", "Requests by route, reward and status code", ["route", "reward", "code"], registry=r
        )
        self.latency = Histogram(
            "assay_rm_request_seconds", "Request latency by route and reward", ["route", "reward"], registry=r
        )
        self.batch_size = Histogram(
            "assay_rm_batch_items", "Items per model batch", ["reward"], buckets=SIZE_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "assay_rm_batch_tokens", "Tokens per model batch", ["reward"],
            buckets=tuple(64 * b for b in SIZE_BUCKETS), registry=r,
        )
        self.queue_depth = Gauge("assay_rm_queue_depth", "Items waiting for a model batch", ["reward"], registry=r)
        self.items = Counter("assay_rm_items", "Scored items by reward and status", ["reward", "status"], registry=r)
        self.values = Histogram(
            "assay_rm_reward_value", "Distribution of scores per reward id (watch for drift)",
            ["reward_id"], buckets=VALUE_BUCKETS, registry=r,
        )

    def reward_label(self, name: str) -> str:
        """`name` when the server declares that reward, else the one fixed `UNKNOWN`."""
        return name if name in self.rewards else UNKNOWN

    def on_batch(self, reward: str, items: int, tokens: int) -> None:
        self.batch_size.labels(reward).observe(items)
        self.batch_tokens.labels(reward).observe(tokens)

    def render(self, queue_depths: dict[str, int]) -> bytes:
        for name, depth in queue_depths.items():
            self.queue_depth.labels(name).set(depth)
        return generate_latest(self.registry)
