"""What a reward server does with a parsed request: decode images, run the scorer, check its output.

Kept apart from the HTTP routes so batching, replicas and metrics can grow here without touching them.
"""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from protocol import ProtocolError, ScoreReply, ScoreRequest, decode_images
from reward_servers.scorer import Scorer

log = logging.getLogger("reward_servers")


class ScoringService:
    def __init__(self, scorer: Scorer, device: str = "cpu"):
        self.scorer, self.device = scorer, device
        self.ready = False
        self._lock = asyncio.Lock()  # one model call at a time per loaded model

    async def load(self) -> None:
        await run_in_threadpool(self.scorer.load, self.device)
        self.ready = True

    async def score(self, request: ScoreRequest) -> ScoreReply:
        if not self.ready:
            raise ProtocolError(503, "not_ready", "the scorer is still loading")
        start = time.perf_counter()
        if all(image.encoding == "raw" for image in request.images):
            images = decode_images(request)  # one memcpy: cheaper than a thread hop
        else:
            images = await run_in_threadpool(decode_images, request)  # PNG/JPEG decoding is real work
        async with self._lock:
            output = await run_in_threadpool(self.scorer.score, images, request.prompts, request.metadata)
        elapsed_ms = (time.perf_counter() - start) * 1000
        try:
            reply = ScoreReply(
                request_id=request.request_id,
                scores=np.asarray(output.scores, dtype=np.float64).tolist(),
                info=output.info,
                scorer=self.scorer.name,
                elapsed_ms=elapsed_ms,
            )
            if len(reply.scores) != len(images):
                raise ValueError(f"{len(reply.scores)} scores for {len(images)} images")
        except (ValidationError, ValueError) as exc:
            raise ProtocolError(500, "scorer_error", f"scorer {self.scorer.name} returned bad output: {exc}")
        log.info(
            "scored request=%s images=%d elapsed_ms=%.1f", request.request_id, len(images), elapsed_ms
        )
        return reply
