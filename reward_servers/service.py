"""What a reward server does with a parsed request: decode images, batch them onto replicas, check output.

Kept apart from the HTTP routes: this is the part that knows about models, devices and batching.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable

from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from protocol import Limits, ProtocolError, ScoreReply, ScoreRequest, decode_image_list
from reward_servers.batcher import DynamicBatcher
from reward_servers.metrics import ServerMetrics
from reward_servers.scorer import Scorer


@dataclass
class ServingOptions:
    devices: list[str] = field(default_factory=lambda: ["cpu"])  # one replica per entry
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 4096  # images waiting, all requests together
    token: str | None = None
    limits: Limits = Limits()


class ScoringService:
    def __init__(self, make_scorer: Callable[[], Scorer], options: ServingOptions):
        self.make_scorer, self.options = make_scorer, options
        self.probe = make_scorer()  # constructing is cheap (weights load in load()); also replica 0
        self.name, self.description = self.probe.name, self.probe.description
        self.metrics = ServerMetrics(self.name)
        self.batcher: DynamicBatcher | None = None
        self.ready = False

    async def load(self) -> None:
        """One replica per device, loaded one after another (a failing device stops start-up)."""
        replicas = [self.probe] + [self.make_scorer() for _ in self.options.devices[1:]]
        for scorer, device in zip(replicas, self.options.devices):
            await run_in_threadpool(scorer.load, device)
        self.batcher = DynamicBatcher(
            replicas, self.options.max_batch, self.options.max_wait_ms, self.options.max_queue, self.metrics.batch
        )
        self.batcher.start()
        self.ready = True

    async def close(self) -> None:
        self.ready = False
        if self.batcher is not None:
            await self.batcher.stop()

    def receiving(self):
        return self.batcher.receiving() if self.batcher is not None else contextlib.nullcontext()

    async def score(self, request: ScoreRequest) -> ScoreReply:
        if not self.ready:
            raise ProtocolError(503, "not_ready", "the scorer is not loaded (starting or shutting down)")
        start = time.perf_counter()
        try:
            self.probe.check(request.prompts, request.metadata)
        except ValueError as exc:
            message = str(exc)
            field, _, message = message.partition(": ") if ": " in message else (None, "", message)
            raise ProtocolError(422, "invalid_request", message, field) from None
        if all(image.encoding == "raw" for image in request.images):
            images = decode_image_list(request)  # views of the body; the batcher copies them once
        else:
            images = await run_in_threadpool(decode_image_list, request)  # PNG/JPEG decoding is real work
        self.metrics.queue_depth.labels(self.name).set(self.batcher.queued_images + len(images))
        output = await self.batcher.score(images, request.prompts, request.metadata)
        self.metrics.queue_depth.labels(self.name).set(self.batcher.queued_images)
        try:
            return ScoreReply(
                request_id=request.request_id,
                scores=output.scores.tolist(),
                info=output.info,
                scorer=self.name,
                elapsed_ms=(time.perf_counter() - start) * 1000,
            )
        except ValidationError as exc:
            bad = ProtocolError.from_validation(exc)
            raise ProtocolError(500, "scorer_error", f"scorer {self.name} returned bad output: {bad.message}", bad.field) from None
