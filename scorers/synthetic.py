"""A scorer with controllable latency and failure, for load tests, drills and benchmarks (not for training)."""

from __future__ import annotations

import time

from scorers.scorer import ScoreOutput, Scorer


class SyntheticScorer(Scorer):
    name = "synthetic"
    description = "mean pixel value / 255 after a fixed delay; for load tests and drills, not training"
    max_batch = 256

    def __init__(
        self,
        latency_ms: float = 0.0,
        oom_above: int | None = None,
        fail_prompt: str | None = None,
        nan_prompt: str | None = None,
    ):
        self.latency_ms, self.oom_above = latency_ms, oom_above
        self.fail_prompt, self.nan_prompt = fail_prompt, nan_prompt

    def score(self, images, prompts, metadata) -> ScoreOutput:
        if self.oom_above is not None and len(images) > self.oom_above:
            raise RuntimeError(f"CUDA out of memory (simulated for batches over {self.oom_above} images)")
        if self.fail_prompt is not None and self.fail_prompt in prompts:
            raise ValueError(f"cannot score the prompt {self.fail_prompt!r} (simulated scorer bug)")
        time.sleep(self.latency_ms / 1000)  # releases the GIL, like a model call
        scores = images.mean(axis=(1, 2, 3)) / 255
        if self.nan_prompt is not None:
            scores[[p == self.nan_prompt for p in prompts]] = float("nan")
        return ScoreOutput(scores, {"batch_size": [len(images)] * len(images)})
