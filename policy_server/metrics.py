"""Prometheus metrics of the policy service, in a registry of their own (one per server).

Requests, latency and queue depth are the base's (`assay.base.metrics`, whose `Timer` records
them); tokens, sequences, batches, time to first token and weight updates are this service's.
Label values are the served model names, or "unknown" for any other (`PolicyService.model_label`).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from assay.base.metrics import SIZE_BUCKETS, RequestMetrics
from assay.policy_server.backends import GenerationOutput


class Metrics(RequestMetrics):
    """The policy service's metrics, labelled by served model.

    Tokens per second is `rate(assay_policy_generated_tokens_total)`. Time to first token is the
    server's: from a sequence's submission to its first sampled token (queue wait and prefill);
    without streaming, the client gets that token with the last one.
    """

    def __init__(self) -> None:
        super().__init__("assay_policy", "model", "Sequences waiting for a batch")
        r = self.registry
        self.prompt_tokens = Counter("assay_policy_prompt_tokens", "Prompt tokens received", ["model"], registry=r)
        self.generated_tokens = Counter("assay_policy_generated_tokens", "Tokens generated", ["model"], registry=r)
        self.sequences = Counter(
            "assay_policy_sequences",
            "Sequences finished, by finish reason (abort: cancelled)",
            ["model", "finish_reason"],
            registry=r,
        )
        self.batch_size = Histogram(
            "assay_policy_batch_sequences", "Sequences per decode batch", ["model"], buckets=SIZE_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "assay_policy_batch_tokens",
            "Prompt + max tokens per decode batch",
            ["model"],
            buckets=tuple(64 * b for b in SIZE_BUCKETS),
            registry=r,
        )
        self.first_token = Histogram(
            "assay_policy_time_to_first_token_seconds",
            "Submission to first sampled token, per sequence",
            ["model"],
            registry=r,
        )
        self.weight_version = Gauge("assay_policy_weight_version", "The weights serving now", ["model"], registry=r)
        self.weight_updates = Histogram(
            "assay_policy_weight_update_seconds",
            "Weight updates: reading, checking and swapping in",
            ["model"],
            registry=r,
        )
        self.weight_bytes = Counter(
            "assay_policy_weight_update_bytes", "Tensor bytes received by weight updates", ["model"], registry=r
        )

    def on_weights(self, model: str, version: int, size: int, seconds: float) -> None:
        self.weight_version.labels(model).set(version)
        self.weight_updates.labels(model).observe(seconds)
        self.weight_bytes.labels(model).inc(size)

    def on_batch(self, model: str, sequences: int, tokens: int) -> None:
        self.batch_size.labels(model).observe(sequences)
        self.batch_tokens.labels(model).observe(tokens)

    def on_finished(self, model: str, outputs: list[GenerationOutput]) -> None:
        """Every sequence a backend ended, aborted ones included (called from its worker thread)."""
        self.generated_tokens.labels(model).inc(sum(len(o.token_ids) for o in outputs))
        for o in outputs:
            self.sequences.labels(model, o.finish_reason).inc()
            if o.first_token_s is not None:
                self.first_token.labels(model).observe(o.first_token_s)
