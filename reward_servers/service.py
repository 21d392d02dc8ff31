"""What a reward server does with a parsed request: check it, admit it, decode images, batch them onto
replicas, check the output.

Kept apart from the HTTP routes: this is the part that knows about models, devices and batching.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from starlette.concurrency import run_in_threadpool

from protocol import (
    Limits,
    ProtocolError,
    ScoreGradReply,
    ScoreGradRequest,
    ScoreReply,
    ScoreRequest,
    VideoScoreRequest,
    decode_image_list,
)
from protocol.schema import GRADIENT_DTYPES, ITEMSIZE
from reward_servers.batcher import DynamicBatcher
from reward_servers.metrics import ServerMetrics
from reward_servers.video import score_videos
from scorers.scorer import Scorer, differentiable


@dataclass
class ServingOptions:
    devices: list[str] = field(default_factory=lambda: ["cpu"])  # one replica per entry
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 4096  # images waiting, all requests together
    max_decoded_bytes: int = 2 * 1024**3  # decoded pixels held by requests in flight, all together
    body_timeout_s: float = 30.0
    drain_delay_s: float = 0.0
    token: str | None = None
    limits: Limits = Limits()
    # How an image scorer's frame scores become a video's score (scorers/video.py): "mean", "min", or None to
    # refuse videos (a scorer with score_videos scores them whatever this says).
    video_pooling: str | None = "mean"


class ScoringService:
    def __init__(self, make_scorer: Callable[[], Scorer], options: ServingOptions):
        self.make_scorer, self.options = make_scorer, options
        self.probe = make_scorer()  # constructing is cheap (weights load in load()); also replica 0
        self.name, self.description = self.probe.name, self.probe.description
        self.differentiable = differentiable(self.probe)  # serves /v1/score_grad
        # A scorer knows the largest batch its model takes (LLaVA: 16); the server never batches past it.
        self.max_batch = min(options.max_batch, self.probe.max_batch)
        self.metrics = ServerMetrics(self.name)
        self.batcher: DynamicBatcher | None = None
        self.ready = False
        self.draining = False  # set by SIGTERM: /readyz says 503 while the requests in flight finish
        self.decoded_bytes = 0  # pixels admitted and not yet answered

    async def load(self) -> None:
        """One replica per device, loaded one after another (a failing device stops start-up)."""
        replicas = [self.probe] + [self.make_scorer() for _ in self.options.devices[1:]]
        for scorer, device in zip(replicas, self.options.devices):
            await run_in_threadpool(scorer.load, device)
        self.batcher = DynamicBatcher(
            replicas, self.max_batch, self.options.max_wait_ms, self.options.max_queue, self.metrics.batch
        )
        self.batcher.start()
        self.ready = True

    def render_metrics(self) -> bytes:
        """/metrics, with the queue and the busy replicas as they are now: set on a request's arrival and reply
        instead, the queue read full after a replica had taken its batch."""
        if self.batcher is not None:
            self.metrics.queue_depth.labels(self.name).set(self.batcher.queued_images)
            self.metrics.busy.labels(self.name).set(self.batcher.busy)
        return self.metrics.render()

    async def close(self) -> None:
        self.ready = False
        if self.batcher is not None:
            await self.batcher.stop()

    async def score(self, request: ScoreRequest | VideoScoreRequest) -> ScoreReply:
        """A /v1/score request's reply; a ScoreGradRequest (/v1/score_grad) also gets each score's gradient, a
        VideoScoreRequest one score per video (reward_servers/video.py)."""
        if isinstance(request, VideoScoreRequest):
            return await score_videos(self, request)
        if not self.probe.scores_images:
            raise ProtocolError(
                422, "invalid_request", f"scorer {self.name} scores videos only: send videos (N, F, H, W, 3)", "images"
            )
        gradient = isinstance(request, ScoreGradRequest)
        if gradient and not self.differentiable:  # final: no retry or other replica can change it
            raise ProtocolError(
                501,
                "not_differentiable",
                f"scorer {self.name} has no differentiable path; "
                "/v1/score_grad serves aesthetic, clipscore and pickscore",
            )
        if not self.ready:
            raise ProtocolError(503, "not_ready", "the scorer is not loaded (starting or shutting down)")
        start = time.perf_counter()
        self.check_fits(request)
        self.check(request.prompts, request.metadata)
        n = len(request.images)
        with self.decoded_budget(
            sum(i.height * i.width * i.channels * ITEMSIZE.get(i.encoding, 1) for i in request.images)
        ):
            with self.batcher.receiving():  # from here until queued, a forming batch may wait for it
                self.batcher.reserve(n)  # before decoding: a compressed request expands only if it fits
                try:
                    if all(image.encoding in ITEMSIZE for image in request.images):
                        images = decode_image_list(request)  # views of the body; the batcher copies them once
                    else:
                        images = await run_in_threadpool(decode_image_list, request)  # real work: off the loop
                except BaseException:
                    self.batcher.release(n)
                    raise
                scored = self.batcher.submit(images, request.prompts, request.metadata, gradient)
            output = await scored
        reply = dict(
            request_id=request.request_id,
            scores=output.scores.tolist(),
            info=output.info,
            scorer=self.name,
            elapsed_ms=(time.perf_counter() - start) * 1000,
        )  # the batcher checked the output
        if not gradient:
            return ScoreReply(**reply)
        dtype = GRADIENT_DTYPES[request.gradient_dtype]
        return ScoreGradReply(
            **reply,
            gradient_dtype=request.gradient_dtype,
            gradients=[np.ascontiguousarray(g, dtype=dtype).tobytes() for g in output.gradients],
        )

    def check(self, prompts: list[str], metadata: list[dict]) -> None:
        """The scorer's own check of a request's prompts and metadata, as a 422 naming the field."""
        try:
            self.probe.check(prompts, metadata)
        except ValueError as exc:
            message = str(exc)
            field, _, message = message.partition(": ") if ": " in message else (None, "", message)
            raise ProtocolError(422, "invalid_request", message, field) from None

    def check_fits(self, request: ScoreRequest | VideoScoreRequest) -> None:
        """The scorer's own limits (Scorer.max_prompt_chars, max_side), before any work is queued: a 413 naming
        the first prompt too long, a 422 naming the first image (or video) it cannot take."""
        limit = self.probe.max_prompt_chars
        for i, prompt in enumerate(request.prompts):
            if len(prompt) > limit:
                raise ProtocolError(
                    413,
                    "payload_too_large",
                    f"{len(prompt)} characters; scorer {self.name} takes prompts of at most {limit}",
                    f"prompts.{i}",
                )
        side = self.probe.max_side
        name = "videos" if isinstance(request, VideoScoreRequest) else "images"
        for i, image in enumerate(getattr(request, name)):
            if side is not None and max(image.height, image.width) > side:
                raise ProtocolError(
                    422,
                    "invalid_request",
                    f"{image.height}x{image.width} pixels; scorer {self.name} takes sides of at most {side}",
                    f"{name}.{i}",
                )

    @contextlib.contextmanager
    def decoded_budget(self, nbytes: int, field: str = "images"):
        """Hold ``nbytes`` of the decoded-pixel budget while a request is decoded, queued and scored.

        ``max_queue`` counts images; this bounds memory, whatever the images' size and however well they
        compress on the wire (64 solid 1024 px PNGs are 345 KB in a body and 200 MB decoded).
        """
        limit = self.options.max_decoded_bytes
        if nbytes > limit:
            raise ProtocolError(
                413,
                "payload_too_large",
                f"the {field} decode to {nbytes} bytes; the server's limit is {limit}",
                field,
            )
        if self.decoded_bytes + nbytes > limit:
            raise ProtocolError(
                503, "overloaded", f"{self.decoded_bytes} bytes of decoded images in flight; the limit is {limit}"
            )
        self.decoded_bytes += nbytes
        try:
            yield
        finally:
            self.decoded_bytes -= nbytes
