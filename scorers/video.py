"""Scoring videos, uint8 (N, F, H, W, 3), with any scorer: the same functions in a reward server and in-process.

A scorer with ``score_videos`` (the temporal scorer) scores whole videos. Any other scorer whose frame scores
do not depend on the rest of the batch (``Scorer.per_frame``) scores each frame as an image, and the frame
scores are pooled per video: ``mean`` (the frame-averaged reward of video benchmarks such as VBench's
per-frame aesthetic and imaging quality, https://github.com/Vchitect/VBench) or ``min`` (the worst frame: a
video is only as good as its worst frame, and a policy cannot trade one broken frame for many fine ones).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from scorers.scorer import ScoreOutput, Scorer

POOLINGS = ("mean", "min")


def native(scorer: Scorer) -> bool:
    """Whether the scorer scores whole videos itself (``score_videos(videos (N, F, H, W, 3), prompts, metadata)``)."""
    return callable(getattr(scorer, "score_videos", None))


def unsupported(scorer: Scorer, pooling: str | None) -> str | None:
    """Why ``scorer`` cannot score videos with this ``pooling`` (None: frame pooling off), or None if it can."""
    if native(scorer):
        return None
    if pooling is None:
        return f"this server scores images only (scorer {scorer.name}; start it with --video-pooling mean or min)"
    if pooling not in POOLINGS:
        raise ValueError(f"video pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    if not scorer.per_frame:
        return f"scorer {scorer.name} compares the images of a batch with each other: its frame scores cannot be pooled"
    return None


def frames_of(
    videos: Sequence[np.ndarray], prompts: Sequence[str], metadata: Sequence[dict[str, Any]]
) -> tuple[list[np.ndarray], list[str], list[dict[str, Any]], list[int]]:
    """Every frame as an image with its video's prompt and metadata, and the number of frames of each video."""
    counts = [len(video) for video in videos]
    frames = [frame for video in videos for frame in video]  # views: no pixel is copied
    frame_prompts = [p for p, n in zip(prompts, counts) for _ in range(n)]
    frame_metadata = [m for m, n in zip(metadata, counts) for _ in range(n)]
    return frames, frame_prompts, frame_metadata, counts


def pool(output: ScoreOutput, counts: Sequence[int], pooling: str) -> ScoreOutput:
    """Frame scores (and info) as one score per video: ``info["frame_scores"]`` holds each video's frame scores
    and every info entry of the scorer becomes, per video, the list of its frames' entries."""
    reduce = {"mean": np.mean, "min": np.min}[pooling]
    scores, frame_scores, info = [], [], {key: [] for key in output.info}
    start = 0
    for n in counts:
        part = np.asarray(output.scores[start : start + n], dtype=np.float64)
        scores.append(float(reduce(part)))
        frame_scores.append(part.tolist())
        for key, entries in output.info.items():
            info[key].append(list(entries[start : start + n]))
        start += n
    return ScoreOutput(np.asarray(scores, dtype=np.float64), {"frame_scores": frame_scores, **info})


def score_videos(
    scorer: Scorer,
    videos: np.ndarray | Sequence[np.ndarray],
    prompts: Sequence[str],
    metadata: Sequence[dict[str, Any]] | None = None,
    pooling: str = "mean",
) -> ScoreOutput:
    """One score per video, in-process (a reward server does the same, its frames batched with other requests)."""
    metadata = list(metadata) if metadata is not None else [{} for _ in prompts]
    reason = unsupported(scorer, pooling)
    if reason is not None:
        raise ValueError(f"videos: {reason}")
    short = [i for i, video in enumerate(videos) if len(video) < scorer.min_frames]
    if short:
        raise ValueError(f"videos.{short[0]}: scorer {scorer.name} takes videos of at least {scorer.min_frames} frames")
    if native(scorer):
        return scorer.score_videos(np.stack(list(videos)), list(prompts), metadata)
    frames, frame_prompts, frame_metadata, counts = frames_of(videos, prompts, metadata)
    scorer.check(frame_prompts, frame_metadata)
    return pool(scorer.score(np.stack(frames), frame_prompts, frame_metadata), counts, pooling)
