"""Temporal consistency of a video: the mean cosine similarity of the CLIP image embeddings of consecutive frames.

The "frame consistency" of Esser et al. 2023 (Gen-1, https://arxiv.org/abs/2302.03011, section 4: the average
cosine similarity of the CLIP embeddings of consecutive frames), close to VBench's background consistency
(https://github.com/Vchitect/VBench, vbench/background_consistency.py, which also compares each frame with the
first). 1.0 for a still video; flicker and jumps lower it. The embeddings are the CLIP scorer's
(``scorers.clip.ClipEmbedder``): the same checkpoints, ``--checkpoint tiny`` / ``tiny-shapes`` offline.
"""

from __future__ import annotations

import numpy as np

from scorers.clip import ClipEmbedder
from scorers.scorer import ScoreOutput, Scorer


class TemporalConsistency(Scorer):
    name = "temporal"
    description = (
        "temporal consistency: mean cosine similarity of CLIP image embeddings of consecutive frames "
        "(1 = still; videos only, at least 2 frames)"
    )
    max_batch = 8  # videos per model call; their frames are embedded ``frame_batch`` at a time
    scores_images = False
    min_frames = 2  # one pair of consecutive frames

    def __init__(
        self, checkpoint: str = "openai/clip-vit-large-patch14", processor: str | None = None, frame_batch: int = 64
    ):
        self.clip = ClipEmbedder(checkpoint, processor)
        self.frame_batch = int(frame_batch)
        if self.frame_batch < 1:
            raise ValueError(f"frame_batch: must be at least 1, got {frame_batch!r}")

    def requirements(self) -> dict[str, tuple[str, str | None, str]]:
        return self.clip.requirements()

    def load(self, device: str = "cpu") -> None:
        self.clip.load(device)

    def score(self, images, prompts, metadata) -> ScoreOutput:
        # A server refuses image requests before they reach here (Scorer.scores_images); in-process callers hear why.
        raise ValueError("images: the temporal scorer scores videos (N, F, H, W, 3), not images")

    def score_videos(self, videos: np.ndarray, prompts, metadata) -> ScoreOutput:
        """One score per video of a uint8 (N, F, H, W, 3) batch; each video's consecutive-frame cosines in ``info``."""
        n, f = videos.shape[:2]
        if f < self.min_frames:
            raise ValueError(f"videos: {f} frame(s); temporal consistency needs at least {self.min_frames}")
        frames = videos.reshape(n * f, *videos.shape[2:])
        embeddings = np.concatenate(
            [
                self.clip.images(frames[s : s + self.frame_batch]).cpu().numpy()
                for s in range(0, len(frames), self.frame_batch)
            ]
        ).astype(np.float64)
        embeddings = embeddings.reshape(n, f, -1)  # L2-normalised: a dot product is the cosine
        cosines = (embeddings[:, 1:] * embeddings[:, :-1]).sum(-1)  # (N, F - 1)
        return ScoreOutput(
            cosines.mean(axis=1),
            {"frame_cosines": cosines.tolist(), "min_cosine": cosines.min(axis=1).tolist()},
        )
