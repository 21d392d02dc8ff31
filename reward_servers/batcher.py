"""Dynamic batching across requests and clients, over one or more model replicas.

Requests are cut into items of at most ``max_batch`` images and queued, requests taking turns item by item
(one request of many batches cannot hold the scorer until it is done). Each replica has a worker that takes
the next item and waits up to ``max_wait_ms`` for more to fill the batch, but only while more are on their
way: requests being received, or clients whose replies the last batch just sent (under many clients each
sends its next request as soon as it has its reply; not waiting for them splits the clients into two
half-size batches that take turns). A lone client is never kept waiting. It runs the scorer on its own thread
(one thread per replica: a GPU's CUDA context stays with it) and hands each item its slice of the result.
The queue is bounded in images, reserved before a request is decoded: past ``max_queue`` a request is
refused with 503 and Retry-After, so a client backs off instead of piling up latency. A batch that runs out
of GPU memory is halved and retried; a batch that fails otherwise is retried one request at a time, so only
the request that breaks the scorer fails. Every output goes through ``protocol.check_scores``.
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import contextlib
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import numpy as np

from protocol import ProtocolError, check_scores
from scorers.scorer import ScoreOutput, Scorer, concat, score_grad

log = logging.getLogger("reward_servers")


@dataclass
class _Item:
    images: list[np.ndarray]  # HWC, possibly views of a request body
    prompts: list[str]
    metadata: list[dict[str, Any]]
    future: asyncio.Future
    gradient: bool = False  # /v1/score_grad: scored with gradients, never batched with plain scoring
    video: bool = False  # whole videos (F, H, W, 3) for a scorer's score_videos, never batched with images
    turn: tuple[int, int] = (0, 0)  # (round, arrival): the order the batcher takes items in

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def kind(self) -> tuple:
        """What a model batch must share: the array shape and dtype, and how it is scored."""
        return self.images[0].shape, self.images[0].dtype, self.gradient, self.video


def is_out_of_memory(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


def split(output: ScoreOutput, sizes: list[int]) -> list[ScoreOutput]:
    parts, start = [], 0
    for n in sizes:
        gradients = output.gradients[start : start + n] if output.gradients is not None else None
        parts.append(
            ScoreOutput(
                output.scores[start : start + n], {k: v[start : start + n] for k, v in output.info.items()}, gradients
            )
        )
        start += n
    return parts


class DynamicBatcher:
    def __init__(
        self,
        replicas: list[Scorer],
        max_batch: int,
        max_wait_ms: float,
        max_queue: int,
        on_batch: Callable[[int, int, float], None] = lambda replica, size, seconds: None,
    ):
        self.replicas, self.max_batch, self.max_wait, self.max_queue = (
            replicas,
            max_batch,
            max_wait_ms / 1000,
            max_queue,
        )
        self.on_batch = on_batch
        self.pending: list[_Item] = []  # in turn order: (round, arrival), see submit
        self._turn, self._arrivals = 0, 0
        self.queued_images = 0
        self.busy = 0  # replicas scoring a batch now
        self.incoming = 0  # requests being received or parsed: they will queue soon
        self.returning = 0  # requests the last batch answered whose clients have not sent their next one yet
        self._returning_until = 0.0
        self._arrived = asyncio.Event()
        self._threads = [
            concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"replica-{i}") for i in range(len(replicas))
        ]
        self._workers: list[asyncio.Task] = []

    def start(self) -> None:
        self._workers = [asyncio.create_task(self._work(i)) for i in range(len(self.replicas))]

    async def stop(self) -> None:
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        gone = ProtocolError(503, "not_ready", "the server is shutting down")
        while self.pending:  # nothing waits forever: what was never scored gets a 503 to retry elsewhere
            item = self.pending.pop(0)
            if not item.future.done():
                item.future.set_exception(gone)
        for pool in self._threads:
            pool.shutdown(wait=False, cancel_futures=True)

    @contextlib.contextmanager
    def receiving(self):
        """Wrap a request from its first byte until it is queued (or refused): batches may wait for it."""
        self.incoming += 1
        self.returning = max(0, self.returning - 1)
        try:
            yield
        finally:
            self.incoming -= 1
            self._arrived.set()  # a waiting worker re-checks whether anything is still coming

    def reserve(self, n: int, field: str = "images", unit: str = "images") -> None:
        """Claim queue room for a request of ``n`` images (a video request: its frames, or its videos for a video
        scorer) before it is decoded (413 naming ``field``: never fits; 503: full)."""
        if n > self.max_queue:  # it would never fit: a retry cannot help
            raise ProtocolError(
                413, "payload_too_large", f"{n} {unit} exceed the server's queue of {self.max_queue}", field
            )
        if self.queued_images + n > self.max_queue:
            raise ProtocolError(
                503, "overloaded", f"{self.queued_images} images queued; the limit is {self.max_queue}", None
            )
        self.queued_images += n

    def release(self, n: int) -> None:
        """Give back a reservation whose request never reached ``submit`` (it failed to decode)."""
        self.queued_images -= n
        self._arrived.set()

    def submit(
        self,
        images: list[np.ndarray],
        prompts: list[str],
        metadata: list[dict[str, Any]],
        gradient: bool = False,
        video: bool = False,
    ) -> Awaitable[ScoreOutput]:
        """Queue a reserved request now; returns what to await for its scores (and gradients), in order.
        ``video``: ``images`` are whole videos (F, H, W, 3) for the scorer's ``score_videos``."""
        loop = asyncio.get_running_loop()
        items = [
            _Item(
                images[s : s + self.max_batch],
                prompts[s : s + self.max_batch],
                metadata[s : s + self.max_batch],
                loop.create_future(),
                gradient,
                video,
            )
            for s in range(0, len(prompts), self.max_batch)
        ]
        # Round-robin across requests (fair queueing): this request's j-th item waits behind every queued
        # item of rounds up to the current one + j, so a request of many batches takes turns with the ones
        # that arrive after it instead of holding the scorer until it is done.
        for j, item in enumerate(items):
            item.turn = (self._turn + j, self._arrivals)
            bisect.insort(self.pending, item, key=lambda queued: queued.turn)
        self._arrivals += 1
        self._arrived.set()
        return self._gather(items)

    @staticmethod
    async def _gather(items: list[_Item]) -> ScoreOutput:
        return concat(await asyncio.gather(*(item.future for item in items)))

    async def _next_batch(self) -> list[_Item]:
        while not self.pending:
            self._arrived.clear()
            await self._arrived.wait()
        loop = asyncio.get_running_loop()
        batch, size, deadline = [], 0, loop.time() + self.max_wait
        # one model batch holds one image (or video) shape, and scoring, scoring with gradients or scoring videos
        kind = self.pending[0].kind
        while True:
            while self.pending and size + len(self.pending[0]) <= self.max_batch and self.pending[0].kind == kind:
                item = self.pending.pop(0)
                self._turn = item.turn[0]
                batch.append(item)
                size += len(item)
            expected = self.incoming or (self.returning and loop.time() < self._returning_until)
            if size >= self.max_batch or self.pending or not expected or loop.time() >= deadline:
                break  # full, the next item does not fit, nothing is on its way, or waited long enough
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), deadline - loop.time())
            except asyncio.TimeoutError:
                pass
        self.queued_images -= size
        return batch

    async def _work(self, replica: int) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [item for item in await self._next_batch() if not item.future.done()]  # done: client gone
            if not batch:
                continue
            start = time.perf_counter()
            self.busy += 1
            try:
                results = await self._score_batch(replica, batch)
            finally:
                self.busy -= 1
            seconds = time.perf_counter() - start
            images = sum(len(item) for item in batch)
            self.on_batch(replica, images, seconds)
            log.info(
                "batch replica=%d images=%d requests=%d model_ms=%.1f queued=%d",
                replica,
                images,
                len(batch),
                seconds * 1000,
                self.queued_images,
            )
            self.returning = len(batch)
            self._returning_until = loop.time() + self.max_wait
            for item, result in zip(batch, results):
                if not item.future.done():
                    (item.future.set_exception if isinstance(result, Exception) else item.future.set_result)(result)

    async def _score_batch(self, replica: int, batch: list[_Item]) -> list[ScoreOutput | Exception]:
        """One result per item, whatever happens: its slice of the output, or the error that is its own."""
        prompts = [p for item in batch for p in item.prompts]
        metadata = [m for item in batch for m in item.metadata]
        try:
            # The one copy of the pixels on the server. On the event loop thread on purpose: a 25 MB buffer
            # allocated on a replica thread comes from a fresh glibc arena and page-faults every time.
            images = np.stack([image for item in batch for image in item.images])
            output = await asyncio.get_running_loop().run_in_executor(
                self._threads[replica], self._run, replica, images, prompts, metadata, batch[0].gradient, batch[0].video
            )
            return split(output, [len(item) for item in batch])
        except Exception as exc:
            if len(batch) > 1:  # one request may have broken the batch: score each alone, so only it fails
                log.warning(
                    "scorer failed on a batch of %d requests (%s: %s); retrying them one by one",
                    len(batch),
                    type(exc).__name__,
                    exc,
                )
                return [result for item in batch for result in await self._score_batch(replica, [item])]
            log.exception("scorer failed on a request of %d images", len(prompts))
            return [
                ProtocolError(
                    500, "scorer_error", f"scorer {self.replicas[replica].name} failed: {type(exc).__name__}: {exc}"
                )
            ]

    def _run(
        self,
        replica: int,
        images: np.ndarray,
        prompts: list[str],
        metadata: list[dict[str, Any]],
        gradient: bool = False,
        video: bool = False,
    ) -> ScoreOutput:
        """Score on the replica's thread; on out-of-memory, halve the batch and try again."""
        scorer = self.replicas[replica]
        try:
            if gradient:
                output = score_grad(scorer, images, prompts, metadata)
            elif video:
                output = scorer.score_videos(images, prompts, metadata)
            else:
                output = scorer.score(images, prompts, metadata)
        except Exception as exc:
            if not is_out_of_memory(exc) or len(prompts) == 1:
                raise
            torch = sys.modules.get("torch")
            if torch is not None and torch.cuda.is_available():
                torch.cuda.empty_cache()
            half = len(prompts) // 2
            log.warning("out of memory on %d images; retrying as %d + %d", len(prompts), half, len(prompts) - half)
            return concat(
                [
                    self._run(replica, images[:half], prompts[:half], metadata[:half], gradient, video),
                    self._run(replica, images[half:], prompts[half:], metadata[half:], gradient, video),
                ]
            )
        scores, info = check_scores(output.scores, output.info, len(prompts))
        if gradient and (
            output.gradients is None
            or output.gradients.shape != images.shape
            or not np.isfinite(output.gradients).all()
        ):
            raise ValueError(f"gradients: expected finite float gradients of shape {images.shape}")
        return ScoreOutput(np.asarray(scores, dtype=np.float64), info, output.gradients)
