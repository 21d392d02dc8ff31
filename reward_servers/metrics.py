"""Prometheus metrics of one reward server (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    def __init__(self, scorer: str):
        self.scorer = scorer
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("reward_requests", "Score requests by status", ["scorer", "status"], registry=r)
        self.images = Counter("reward_images", "Images in score requests by status", ["scorer", "status"], registry=r)
        self.latency = Histogram(
            "reward_request_seconds", "Score request latency", ["scorer"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "reward_batch_images", "Images per model batch", ["scorer"], buckets=BATCH_BUCKETS, registry=r
        )
        self.model_seconds = Counter("reward_model_seconds", "Time in the model", ["scorer", "replica"], registry=r)
        self.queue_depth = Gauge("reward_queue_images", "Images waiting for a replica", ["scorer"], registry=r)
        self.busy = Gauge("reward_replicas_busy", "Replicas scoring a batch now", ["scorer"], registry=r)

    def request(self, status: str, images: int, seconds: float) -> None:
        """``status``: the HTTP status sent, or ``client_closed`` when the client hung up before its answer."""
        self.requests.labels(self.scorer, str(status)).inc()
        self.images.labels(self.scorer, str(status)).inc(images)
        self.latency.labels(self.scorer).observe(seconds)

    def batch(self, replica: int, size: int, seconds: float) -> None:
        self.batch_size.labels(self.scorer).observe(size)
        self.model_seconds.labels(self.scorer, str(replica)).inc(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
