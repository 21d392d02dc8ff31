"""HTTP routes of a reward server: ``POST /v1/score`` and ``POST /v1/score_grad`` (msgpack); health,
readiness, info and metrics."""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
import threading
import time
from contextlib import asynccontextmanager
from typing import Callable

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from protocol import (
    MEDIA_TYPE,
    VERSION,
    ProtocolError,
    ScoreGradRequest,
    ScoreRequest,
    VideoScoreRequest,
    pack,
    parse_request,
)
from reward_servers.service import ScoringService, ServingOptions
from reward_servers.video import video_info
from scorers.scorer import Scorer

log = logging.getLogger("reward_servers")
RETRY_AFTER_S = 1


def create_app(make_scorer: Callable[[], Scorer], options: ServingOptions = ServingOptions()) -> FastAPI:
    service = ScoringService(make_scorer, options)
    token = options.token.encode() if options.token else None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.load()
        _drain_on_sigterm(service, options.drain_delay_s)
        yield
        # uvicorn has already waited for in-flight requests (SIGTERM drains); now stop the replicas.
        await service.close()

    app = FastAPI(title=f"reward-server ({service.name})", lifespan=lifespan)
    app.state.service = service

    @app.exception_handler(ProtocolError)
    async def protocol_error(request: Request, exc: ProtocolError) -> Response:
        log.warning("rejected %s %s: %s", request.method, request.url.path, exc)
        headers = {"retry-after": str(RETRY_AFTER_S)} if exc.status in (429, 503) else {}
        if exc.status == 401:
            headers["www-authenticate"] = "Bearer"
        return _msgpack(exc.to_wire(), exc.status, headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        log.exception("internal error on %s", request.url.path)
        return _msgpack(ProtocolError(500, "internal", f"{type(exc).__name__}: {exc}").to_wire(), 500)

    _add_score_routes(app, service, options, token)
    _add_status_routes(app, service, options, token)
    return app


def _add_score_routes(app: FastAPI, service: ScoringService, options: ServingOptions, token: bytes | None) -> None:
    """``POST /v1/score`` and ``POST /v1/score_grad``: authenticate, check the media type, read the body within
    its limits, parse it off the event loop, score, and count every outcome."""
    limits = options.limits

    async def handle(request: Request, model) -> Response:
        start, status, images = time.perf_counter(), "500", 0
        try:
            if token is not None and not _bearer_matches(request.headers.get("authorization", ""), token):
                raise ProtocolError(401, "unauthorized", "missing or wrong bearer token", "authorization")
            content_type = request.headers.get("content-type", "").split(";")[0].strip()
            if content_type != MEDIA_TYPE:
                raise ProtocolError(
                    415,
                    "unsupported_media_type",
                    f"content-type must be {MEDIA_TYPE}, got {content_type!r}",
                    "content-type",
                )
            body = await _read_body(request, limits.max_body_bytes, options.body_timeout_s)
            # Off the event loop: even within the element budget a body can take tens of milliseconds to walk,
            # and /healthz and every other client must not wait for it.
            parsed = await run_in_threadpool(parse_request, body, limits, model)
            # counted in images a model looks at: a video's frames
            images = (
                sum(v.frames for v in parsed.videos) if isinstance(parsed, VideoScoreRequest) else len(parsed.images)
            )
            reply = await service.score(parsed)
            status = "200"
            return _msgpack(reply.model_dump(), 200)
        except ProtocolError as exc:
            status = str(exc.status)
            raise
        except ClientDisconnect:  # the client hung up mid-body: nobody to answer, nothing went wrong here
            status = "client_closed"
            log.info("client closed the connection before its request body arrived")
            return Response(status_code=499)
        finally:
            service.metrics.request(status, images, time.perf_counter() - start)

    @app.post(
        "/v1/score",
        summary="Score a batch of images or videos (msgpack body and reply; see protocol/README.md)",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
            }
        },
        responses=_SCORE_RESPONSES,
    )
    async def score(request: Request) -> Response:
        return await handle(request, ScoreRequest)

    @app.post(
        "/v1/score_grad",
        summary="Score float images and return each score's gradient with respect to the pixels "
        "(see protocol/README.md)",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
            }
        },
        responses={
            **_SCORE_RESPONSES,
            501: {"description": "the scorer has no differentiable path", "content": _MSGPACK},
        },
    )
    async def score_grad(request: Request) -> Response:
        return await handle(request, ScoreGradRequest)


def _add_status_routes(app: FastAPI, service: ScoringService, options: ServingOptions, token: bytes | None) -> None:
    """Liveness, readiness, what the server scores and its limits, Prometheus metrics."""
    limits = options.limits

    @app.get("/healthz", summary="Alive")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get(
        "/readyz", summary="Model loaded and serving", responses={503: {"description": "still loading, or draining"}}
    )
    async def readyz() -> JSONResponse:
        ready = service.ready and not service.draining
        return JSONResponse({"ready": ready, "draining": service.draining}, status_code=200 if ready else 503)

    @app.get("/v1/info", summary="What this server scores (and, given a bearer token, whether it is accepted)")
    async def info(request: Request) -> dict:
        given = request.headers.get("authorization")
        return {
            "version": VERSION,
            "scorer": service.name,
            "description": service.description,
            "max_batch": service.max_batch,
            "differentiable": service.differentiable,  # whether /v1/score_grad serves
            "images": service.probe.scores_images,  # whether /v1/score takes images (temporal: videos only)
            "video": video_info(service),  # how videos are scored (protocol/README.md, "Video"); None: refused
            "replicas": options.devices,
            "limits": {
                "max_images": limits.max_images,
                "max_pixels": limits.max_pixels,
                "max_body_bytes": limits.max_body_bytes,
                "max_elements": limits.max_elements,
                "max_videos": limits.max_videos,
                "max_frames": limits.max_frames,
                "max_video_bytes": limits.max_video_bytes,
                "max_queue": options.max_queue,
                "max_decoded_bytes": options.max_decoded_bytes,
                "body_timeout_s": options.body_timeout_s,
            },
            "auth": token is not None,
            # An authenticated no-op: a trainer checks its token here before any model loads.
            "authorized": None if given is None else (token is None or _bearer_matches(given, token)),
        }

    @app.get(
        "/metrics",
        summary="Prometheus metrics",
        response_class=PlainTextResponse,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    async def metrics() -> Response:
        return Response(service.render_metrics(), media_type="text/plain; version=0.0.4")


_MSGPACK = {MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}}
_SCORE_RESPONSES = {
    200: {"description": "scores: a msgpack reply map", "content": _MSGPACK},
    **{
        code: {"description": f"{what}: a msgpack error map", "content": _MSGPACK}
        for code, what in [
            (400, "malformed body"),
            (401, "missing or wrong bearer token"),
            (408, "body not received in time"),
            (413, "body, values, images or decoded pixels over a limit"),
            (415, "wrong content type"),
            (422, "invalid request"),
            (500, "scorer failure"),
            (503, "overloaded or loading"),
        ]
    },
}


def _msgpack(obj: dict, status: int, headers: dict[str, str] | None = None) -> Response:
    return Response(pack(obj), status_code=status, media_type=MEDIA_TYPE, headers=headers)


def _bearer_matches(header: str, token: bytes) -> bool:
    """``Authorization: Bearer <token>``; the scheme is case-insensitive (RFC 7235), the token compared in
    constant time."""
    scheme, _, given = header.strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token)


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes | bytearray:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes, and with 408 if it
    has not fully arrived ``timeout_s`` after the headers (a stalled upload must not hold a connection)."""
    too_large = ProtocolError(413, "payload_too_large", f"body exceeds the limit of {limit} bytes", "body")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large

    async def read() -> bytes | bytearray:
        if declared.isdigit():  # filled in place: chunks and their join would hold the body twice
            body, size = bytearray(int(declared)), 0
            async for chunk in request.stream():
                if size + len(chunk) > len(body):
                    raise ProtocolError(
                        400, "malformed_body", f"body longer than its content-length {declared}", "body"
                    )
                body[size : size + len(chunk)] = chunk
                size += len(chunk)
            return body
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        raise ProtocolError(408, "request_timeout", f"the body did not arrive within {timeout_s:g} s", "body") from None


def _drain_on_sigterm(service: ScoringService, delay_s: float) -> None:
    """On SIGTERM, say "not ready" at once (a load balancer stops sending), then let uvicorn drain.

    uvicorn owns the signal while it serves; its handler stops accepting and waits for the requests in flight.
    Ours runs first and, with a drain delay, keeps accepting for ``delay_s`` so that the balancer sees /readyz
    fail before the listening socket closes.
    """
    if threading.current_thread() is not threading.main_thread():  # signals exist only there (e.g. TestClient)
        return
    uvicorn_handler = signal.getsignal(signal.SIGTERM)
    if not callable(uvicorn_handler):
        return
    loop = asyncio.get_running_loop()

    def on_sigterm(signum, frame):
        if service.draining:  # a second SIGTERM does not wait again
            return uvicorn_handler(signum, frame)
        service.draining = True
        log.info("SIGTERM: not ready; draining in %.1f s", delay_s)
        if delay_s > 0:
            loop.call_soon_threadsafe(loop.call_later, delay_s, uvicorn_handler, signum, None)
        else:
            uvicorn_handler(signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)
