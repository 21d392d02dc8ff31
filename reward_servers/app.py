"""HTTP routes of a reward server: ``POST /v1/score`` (msgpack); health, readiness, info and metrics."""

from __future__ import annotations

import hmac
import logging
import time
from contextlib import asynccontextmanager
from typing import Callable

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse

from protocol import MEDIA_TYPE, VERSION, ProtocolError, pack, parse_request
from reward_servers.scorer import Scorer
from reward_servers.service import ScoringService, ServingOptions

log = logging.getLogger("reward_servers")
RETRY_AFTER_S = 1


def create_app(make_scorer: Callable[[], Scorer], options: ServingOptions = ServingOptions()) -> FastAPI:
    service = ScoringService(make_scorer, options)
    limits = options.limits
    expected_auth = f"Bearer {options.token}".encode() if options.token else None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.load()
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

    @app.post(
        "/v1/score",
        summary="Score a batch of images (msgpack body and reply; see protocol/README.md)",
        openapi_extra={"requestBody": {"required": True, "content": {MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}}}},
        responses=_SCORE_RESPONSES,
    )
    async def score(request: Request) -> Response:
        start, status, images = time.perf_counter(), 500, 0
        try:
            if expected_auth is not None:
                given = request.headers.get("authorization", "").encode()
                if not hmac.compare_digest(given, expected_auth):
                    raise ProtocolError(401, "unauthorized", "missing or wrong bearer token", "authorization")
            content_type = request.headers.get("content-type", "").split(";")[0].strip()
            if content_type != MEDIA_TYPE:
                raise ProtocolError(415, "unsupported_media_type", f"content-type must be {MEDIA_TYPE}, got {content_type!r}", "content-type")
            with service.receiving():  # batches forming now may wait for this request
                body = await _read_body(request, limits.max_body_bytes)
                # Inline, not in a worker thread: parsing walks the headers and leaves the pixels in the body
                # (0.4 ms for 25 MB), less than a thread hop costs (bench/protocol.py).
                parsed = parse_request(body, limits)
            images = len(parsed.images)
            reply = await service.score(parsed)
            status = 200
            return _msgpack(reply.model_dump(), 200)
        except ProtocolError as exc:
            status = exc.status
            raise
        finally:
            service.metrics.request(status, images, time.perf_counter() - start)

    @app.get("/healthz", summary="Alive")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", summary="Model loaded and serving", responses={503: {"description": "still loading, or draining"}})
    async def readyz() -> JSONResponse:
        return JSONResponse({"ready": service.ready}, status_code=200 if service.ready else 503)

    @app.get("/v1/info", summary="What this server scores")
    async def info() -> dict:
        return {
            "version": VERSION,
            "scorer": service.name,
            "description": service.description,
            "max_batch": options.max_batch,
            "replicas": options.devices,
            "limits": {"max_images": limits.max_images, "max_pixels": limits.max_pixels, "max_body_bytes": limits.max_body_bytes},
            "auth": expected_auth is not None,
        }

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4")

    return app


_MSGPACK = {MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}}
_SCORE_RESPONSES = {
    200: {"description": "scores: a msgpack reply map", "content": _MSGPACK},
    **{code: {"description": f"{what}: a msgpack error map", "content": _MSGPACK} for code, what in [
        (400, "malformed body"), (401, "missing or wrong bearer token"), (413, "body too large"),
        (415, "wrong content type"), (422, "invalid request"), (500, "scorer failure"), (503, "overloaded or loading"),
    ]},
}


def _msgpack(obj: dict, status: int, headers: dict[str, str] | None = None) -> Response:
    return Response(pack(obj), status_code=status, media_type=MEDIA_TYPE, headers=headers)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    too_large = ProtocolError(413, "payload_too_large", f"body exceeds the limit of {limit} bytes", "body")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)
