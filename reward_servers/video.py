"""What a reward server does with a video request (protocol/README.md, "Video"): the image path's checks,
budgets and batching, with one score per video.

A scorer with ``score_videos`` (temporal) gets whole videos, batched with other requests' videos of the same
shape; any other scorer gets every frame as an image, batched with other requests' frames and images of the
same size, and the frame scores are pooled per video (``--video-pooling``, scorers/video.py).
"""

from __future__ import annotations

import time
from starlette.concurrency import run_in_threadpool

from protocol import ProtocolError, ScoreReply, VideoScoreRequest
from protocol.video import check_frames, decode_videos
from scorers.video import frames_of, native, pool, unsupported


def video_info(service) -> dict | None:
    """``GET /v1/info``'s ``video`` (``service``: the reward_servers.service.ScoringService): how this server
    scores videos, or None when it refuses them."""
    from protocol.schema import VIDEO_VERSION

    pooling = service.options.video_pooling
    if unsupported(service.probe, pooling) is not None:
        return None
    whole = native(service.probe)
    return {
        "version": VIDEO_VERSION,
        "scoring": "video" if whole else "frames",  # whole videos (temporal), or each frame as an image
        "pooling": None if whole else pooling,
        "min_frames": service.probe.min_frames,
    }


async def score_videos(service, request: VideoScoreRequest) -> ScoreReply:
    """One score per video of ``request``; refused (4xx naming the field) before anything is decoded when the
    scorer cannot score videos, the videos are too short for it, or they do not fit the server's budgets."""
    reason = unsupported(service.probe, service.options.video_pooling)
    if reason is not None:
        raise ProtocolError(422, "invalid_request", reason, "videos")
    if not service.ready:
        raise ProtocolError(503, "not_ready", "the scorer is not loaded (starting or shutting down)")
    start = time.perf_counter()
    whole = native(service.probe)
    check_frames(request, service.probe.min_frames, service.name)
    service.check_fits(request)
    service.check(request.prompts, request.metadata)
    # the queue counts what a model call takes: whole videos for score_videos, frames for an image scorer
    queued = len(request.videos) if whole else sum(video.frames for video in request.videos)
    with service.decoded_budget(request.decoded_bytes, "videos"):
        with service.batcher.receiving():
            service.batcher.reserve(queued, "videos", "videos" if whole else "frames")
            try:
                if all(video.encoding == "raw" for video in request.videos):
                    videos = decode_videos(request)  # views of the body; the batcher copies them once
                else:
                    videos = await run_in_threadpool(decode_videos, request)  # real work: off the event loop
            except BaseException:
                service.batcher.release(queued)
                raise
            if whole:
                scored = service.batcher.submit(videos, request.prompts, request.metadata, video=True)
            else:
                frames, prompts, metadata, counts = frames_of(videos, request.prompts, request.metadata)
                scored = service.batcher.submit(frames, prompts, metadata)
        output = await scored
    if not whole:
        output = pool(output, counts, service.options.video_pooling)
    return ScoreReply(
        request_id=request.request_id,
        scores=output.scores.tolist(),
        info=output.info,
        scorer=service.name,
        elapsed_ms=(time.perf_counter() - start) * 1000,
    )  # the batcher checked the frame (or video) output; ScoreReply checks the pooled one
