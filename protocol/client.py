"""``RewardClient``: score image batches on one or more reward servers over msgpack/HTTP.

Two ways in: ``await client.score(...)`` from async code, and ``client.submit(...)`` which returns a
``concurrent.futures.Future`` for synchronous loops (the trainer); ``score_grad`` / ``submit_grad`` the same
for ``/v1/score_grad`` (scores and their gradients to the pixels); ``score_videos`` / ``submit_videos`` for
uint8 (N, F, H, W, 3) videos (one score per video). ``submit`` runs on one background event
loop thread; it only touches numpy and bytes, never torch, so it cannot slow the caller's torch threads.

One server's status, synchronously and once (no retries: the caller decides whether to ask again):
``ready(url)`` (``GET /readyz``) and ``info(url, token)`` (``GET /v1/info``), what a trainer asks before any
model loads (trainer/preflight.py). Both raise ``Unreachable`` when nothing answers and ``RewardServerError``
for any other answer than the one asked for.

Retries: connection errors, timeouts, 429 and 503 are retried with capped exponential backoff (honouring
Retry-After), moving to the next URL each time, all under one total deadline. Everything else is final and
raises at once with the server's message: a 4xx means the request itself is wrong, a 500 ``scorer_error`` (or
a reply that fails ``check_scores``) is the scorer's deterministic failure, and retrying it on every replica
would only delay the error by minutes.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
import uuid
from typing import Any, Sequence

import httpx
import numpy as np
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, stop_after_delay, wait_exponential_jitter

from protocol.codec import parse_reply, reply_gradients, request_parts, unpack
from protocol.errors import ProtocolError, RewardServerError, Unreachable
from protocol.schema import MEDIA_TYPE, Encoding, GradientDtype, ScoreGradReply, ScoreReply
from protocol.video import video_request_parts

# Decoded pixels per video request: 64 MiB is 8 videos of 33 frames at 256 x 256, well under the server's default
# body (256 MiB) and video (2 GiB) limits; a raw 81-frame Wan 480p video (97 MB) goes alone.
DEFAULT_VIDEO_REQUEST_BYTES = 64 * 1024 * 1024


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, httpx.TransportError) or (isinstance(exc, RewardServerError) and exc.retryable)


class RewardClient:
    def __init__(
        self,
        urls: str | Sequence[str],
        timeout: float = 120.0,
        retries: int = 8,
        token: str | None = None,
        deadline: float = 600.0,
        max_backoff: float = 10.0,
    ):
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise ValueError("RewardClient needs at least one URL")
        self.timeout, self.retries, self.deadline, self.max_backoff = timeout, retries, deadline, max_backoff
        self._backoff = wait_exponential_jitter(multiplier=0.2, max=max_backoff, jitter=0.2)
        self._headers = {"content-type": MEDIA_TYPE, "accept": MEDIA_TYPE, **_authorization(self.urls, token)}
        self._next_url = itertools.cycle(range(len(self.urls)))
        self._http: httpx.AsyncClient | None = None
        self._http_loop: asyncio.AbstractEventLoop | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._loop_lock = threading.Lock()  # many threads may call submit first at once: one loop for all

    # -- async API -------------------------------------------------------------------------------------
    async def score(
        self,
        images: np.ndarray | Sequence[np.ndarray],
        prompts: Sequence[str],
        metadata: Sequence[dict[str, Any]] | None = None,
        encoding: Encoding = "raw",
        request_id: str | None = None,
    ) -> ScoreReply:
        """Score a uint8 NHWC batch; one score per image, in order."""
        parts = request_parts(images, prompts, metadata, request_id or uuid.uuid4().hex, encoding)
        return await self.score_body(parts, expected=len(prompts))

    async def score_grad(
        self,
        images: np.ndarray,
        prompts: Sequence[str],
        metadata: Sequence[dict[str, Any]] | None = None,
        encoding: Encoding = "f32",
        gradient_dtype: GradientDtype = "float32",
        request_id: str | None = None,
    ) -> tuple[ScoreGradReply, np.ndarray]:
        """Scores of a float NHWC batch in [0, 1] and each score's gradient with respect to its image's pixels
        (``/v1/score_grad``): the reply and the gradients as one float32 NHWC array."""
        parts = request_parts(images, prompts, metadata, request_id or uuid.uuid4().hex, encoding, gradient_dtype)
        reply = await self.score_body(parts, expected=len(prompts), path="/v1/score_grad", model=ScoreGradReply)
        try:
            return reply, reply_gradients(reply, images.shape[1:3])
        except ProtocolError as exc:
            raise RewardServerError(self.urls[0], 502, "bad_reply", exc.message, exc.field) from None

    async def score_videos(
        self,
        videos: np.ndarray | Sequence[np.ndarray],
        prompts: Sequence[str],
        metadata: Sequence[dict[str, Any]] | None = None,
        encoding: Encoding = "raw",
        request_id: str | None = None,
        max_request_bytes: int = DEFAULT_VIDEO_REQUEST_BYTES,
    ) -> ScoreReply:
        """Score a uint8 (N, F, H, W, 3) batch of videos; one score per video, in order (protocol/README.md,
        "Video"). Sent as several concurrent requests of at most ``max_request_bytes`` decoded pixels each (one
        video at least), so that a batch of long videos stays within the server's body and video limits; the
        replies are joined into one, each retried on its own."""
        metadata = list(metadata) if metadata is not None else [{} for _ in prompts]
        if len(videos) != len(prompts) or len(metadata) != len(prompts):
            raise ValueError(f"{len(videos)} videos, {len(prompts)} prompts and {len(metadata)} metadata entries")
        rid = request_id or uuid.uuid4().hex
        chunks = video_chunks([v.nbytes for v in videos], max_request_bytes)
        replies = await asyncio.gather(
            *(
                self.score_body(
                    video_request_parts(
                        videos[a:b], prompts[a:b], metadata[a:b], rid if len(chunks) == 1 else f"{rid}.{k}", encoding
                    ),
                    expected=b - a,
                )
                for k, (a, b) in enumerate(chunks)
            )
        )
        return join_replies(replies, rid)

    async def score_body(
        self,
        body: bytes | list[bytes | memoryview],
        expected: int | None = None,
        path: str = "/v1/score",
        model=ScoreReply,
    ) -> ScoreReply:
        """POST a ready body (bytes, or buffers to send in order) with the retry policy."""
        http = self._client()
        parts = [body] if isinstance(body, bytes) else body
        headers = {**self._headers, "content-length": str(sum(len(p) for p in parts))}

        async def stream():
            for part in parts:
                yield part

        start = time.monotonic()
        first = next(self._next_url)
        retrying = AsyncRetrying(
            stop=stop_after_delay(self.deadline) | stop_after_attempt(self.retries + 1),
            wait=self._wait,
            retry=retry_if_exception(_retryable),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                url = self.urls[(first + attempt.retry_state.attempt_number - 1) % len(self.urls)]
                left = max(0.1, self.deadline - (time.monotonic() - start))
                response = await http.post(
                    f"{url}{path}", content=stream(), headers=headers, timeout=min(self.timeout, left)
                )
                if response.status_code != 200:
                    raise _server_error(url, response)
                try:
                    return parse_reply(response.content, expected, model)
                except ProtocolError as exc:
                    raise RewardServerError(url, 502, "bad_reply", exc.message, exc.field) from None
        raise AssertionError("unreachable: tenacity re-raises the last error")

    def _wait(self, state) -> float:
        backoff = self._backoff(state)
        exc = state.outcome.exception() if state.outcome else None
        retry_after = getattr(exc, "retry_after", None)
        return min(self.max_backoff, max(backoff, retry_after or 0.0))

    def _client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._http is None:
            limits = httpx.Limits(max_connections=32, max_keepalive_connections=16)
            self._http = httpx.AsyncClient(limits=limits, timeout=self.timeout)
            self._http_loop = loop
        elif self._http_loop is not loop:
            raise RuntimeError("a RewardClient is bound to the first event loop that used it; make one per loop")
        return self._http

    # -- synchronous API -------------------------------------------------------------------------------
    def submit(self, images, prompts, metadata=None, encoding: Encoding = "raw", request_id=None):
        """Start scoring in the background; returns a ``concurrent.futures.Future[ScoreReply]``."""
        images = np.ascontiguousarray(images) if isinstance(images, np.ndarray) else list(images)
        coroutine = self.score(images, prompts, metadata, encoding, request_id)
        return asyncio.run_coroutine_threadsafe(coroutine, self._background_loop())

    def submit_videos(
        self,
        videos: np.ndarray | Sequence[np.ndarray],
        prompts,
        metadata=None,
        encoding: Encoding = "raw",
        request_id=None,
        max_request_bytes: int = DEFAULT_VIDEO_REQUEST_BYTES,
    ):
        """``score_videos`` in the background: a ``concurrent.futures.Future[ScoreReply]`` with one score per
        video of the uint8 (N, F, H, W, 3) batch."""
        videos = np.ascontiguousarray(videos) if isinstance(videos, np.ndarray) else list(videos)
        coroutine = self.score_videos(videos, prompts, metadata, encoding, request_id, max_request_bytes)
        return asyncio.run_coroutine_threadsafe(coroutine, self._background_loop())

    def submit_grad(
        self,
        images: np.ndarray,
        prompts,
        metadata=None,
        encoding: Encoding = "f32",
        gradient_dtype: GradientDtype = "float32",
    ):
        """``score_grad`` in the background; a ``concurrent.futures.Future[(ScoreGradReply, gradients)]``."""
        coroutine = self.score_grad(np.ascontiguousarray(images), prompts, metadata, encoding, gradient_dtype)
        return asyncio.run_coroutine_threadsafe(coroutine, self._background_loop())

    def _background_loop(self) -> asyncio.AbstractEventLoop:
        with self._loop_lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(target=self._loop.run_forever, name="reward-client", daemon=True)
                self._thread.start()
            return self._loop

    def close(self) -> None:
        """Cancel what is in flight, close the connection pool and stop the background loop (for ``submit``
        users); the futures of cancelled requests end cancelled."""
        with self._loop_lock:
            if self._loop is None:
                return
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            if not self._thread.is_alive():
                self._loop.close()
            self._loop = None

    async def _shutdown(self) -> None:
        """On the background loop: no request task may outlive it (asyncio would warn it was destroyed pending)."""
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._http is not None and self._http_loop is self._loop:
            await self._http.aclose()
            self._http = None

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    def __enter__(self) -> "RewardClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def video_chunks(sizes: Sequence[int], max_bytes: int) -> list[tuple[int, int]]:
    """Consecutive [start, stop) ranges of videos whose ``sizes`` (bytes) sum to at most ``max_bytes`` each, one
    video at least (a video over the limit alone goes as it is: the server's 413 says which limit)."""
    chunks, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        if i > start and total + size > max_bytes:
            chunks.append((start, i))
            start, total = i, 0
        total += size
    return [*chunks, (start, len(sizes))] if sizes else []


def join_replies(replies: Sequence[ScoreReply], request_id: str) -> ScoreReply:
    """The replies of consecutive parts of one batch as one reply (info keys as the first part's)."""
    if len(replies) == 1:
        return replies[0]
    return ScoreReply(
        request_id=request_id,
        scores=[s for r in replies for s in r.scores],
        info={key: [e for r in replies for e in r.info.get(key, [None] * len(r.scores))] for key in replies[0].info},
        scorer=replies[0].scorer,
        elapsed_ms=max(r.elapsed_ms for r in replies),
    )


def _server_error(url: str, response: httpx.Response) -> RewardServerError:
    code, message, field = "http_error", response.reason_phrase, None
    try:
        error = unpack(response.content)["error"]
        code, message, field = error["code"], error["message"], error.get("field")
    except Exception:  # not our error map (a proxy, a crash page): keep the HTTP reason
        if response.content:
            message = response.content[:200].decode("utf-8", "replace")
    retry_after = response.headers.get("retry-after", "")
    wait = float(retry_after) if retry_after.replace(".", "", 1).isdigit() else None
    return RewardServerError(url, response.status_code, code, message, field, retry_after=wait)


def _authorization(urls: list[str], token: str | None) -> dict[str, str]:
    """The header that carries ``token`` to ``urls`` (none without one). A request has one Authorization
    header, and httpx fills it with a URL's userinfo as Basic auth in place of the bearer token: the server
    would never see the token. Refused, never silently dropped."""
    from protocol.errors import has_credentials, redact_url

    if not token:
        return {}
    for url in urls:
        if has_credentials(url):
            raise ValueError(
                f"{redact_url(url)}: URL credentials and a bearer token together; a request carries one of "
                "them (the URL's as Basic auth would replace the token): give the token alone, or credentials in "
                "the URL alone for a proxy that checks them"
            )
    return {"authorization": f"Bearer {token}"}


# -- one server's status, synchronous (JSON endpoints) -----------------------------------------------------------
def ready(url: str, timeout: float = 5.0) -> None:
    """Returns when ``GET /readyz`` answers 200: the model is loaded and the server is not draining. Raises
    RewardServerError with the status otherwise (503: still loading, or draining), Unreachable when nothing
    answers within ``timeout`` s."""
    response = _get(url, "/readyz", {}, timeout)
    if response.status_code != 200:
        raise _server_error(url, response)


def info(url: str, token: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
    """``GET /v1/info``: what the server scores (``scorer``, ``description``, ``differentiable``), its limits,
    whether it needs a token (``auth``) and, with ``token`` sent as the scoring requests send it, whether it
    accepts it (``authorized``; None without a token). RewardServerError for an answer other than 200 with a
    JSON object (502 ``bad_reply`` for a body that is not one), Unreachable when nothing answers."""
    response = _get(url, "/v1/info", _authorization([url], token), timeout)
    if response.status_code != 200:
        raise _server_error(url, response)
    try:
        found = response.json()
    except ValueError as exc:
        raise RewardServerError(url, 502, "bad_reply", f"/v1/info is not JSON ({exc})") from None
    if not isinstance(found, dict):
        raise RewardServerError(url, 502, "bad_reply", f"/v1/info is a {type(found).__name__}, not an object")
    return found


def _get(url: str, path: str, headers: dict[str, str], timeout: float) -> httpx.Response:
    try:
        return httpx.get(f"{url}{path}", headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:  # refused, timed out, reset, a malformed reply...
        raise Unreachable(url, f"{type(exc).__name__}: {exc}") from exc
