"""A scorer with controllable latency and failure, for load tests, drills and benchmarks (not for training)."""

from __future__ import annotations

import time

from reward_servers.scorer import ScoreOutput, Scorer


class SyntheticScorer(Scorer):
    name = "synthetic"
    description = "mean pixel value / 255 after a fixed delay; for load tests and drills, not training"
    max_batch = 256

    def __init__(self, latency_ms: float = 0.0, oom_above: int | None = None):
        self.latency_ms, self.oom_above = latency_ms, oom_above

    def score(self, images, prompts, metadata) -> ScoreOutput:
        if self.oom_above is not None and len(images) > self.oom_above:
            raise RuntimeError(f"CUDA out of memory (simulated for batches over {self.oom_above} images)")
        time.sleep(self.latency_ms / 1000)  # releases the GIL, like a model call
        return ScoreOutput(images.mean(axis=(1, 2, 3)) / 255, {"batch_size": [len(images)] * len(images)})
