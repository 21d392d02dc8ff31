"""A real reward-server subprocess: correct scores, a 4xx for every kind of bad request, and still serving."""

from __future__ import annotations

import io

import httpx
import msgpack
import numpy as np
import pytest
from PIL import Image

from protocol import MEDIA_TYPE, RewardClient, build_request, pack, unpack


def pil_jpeg_kb(image: np.ndarray) -> float:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=95)
    return len(buf.getvalue()) / 1000


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    smooth = np.repeat(np.linspace(0, 255, 48, dtype=np.uint8)[None, :, None], 48, axis=0).repeat(3, axis=2)
    return np.stack([rng.integers(0, 256, (48, 48, 3), dtype=np.uint8), smooth, np.zeros((48, 48, 3), np.uint8)])


@pytest.mark.parametrize("encoding", ["raw", "png"])
def test_scores_are_minus_jpeg_kilobytes(compression_server, images, encoding):
    with RewardClient(compression_server.url) as client:
        reply = client.submit(images, ["a", "b", "c"], [{}, {}, {}], encoding=encoding).result(timeout=30)
    expected = [-pil_jpeg_kb(im) for im in images]
    assert reply.scores == pytest.approx(expected, abs=1e-12)
    assert reply.info["jpeg_kb"] == pytest.approx([-s for s in expected])
    assert reply.scorer == "compression" and reply.elapsed_ms > 0
    assert expected[0] < expected[1] < expected[2] < 0  # noise compresses worst


def test_incompressibility_is_plus_jpeg_kilobytes(start_server, images):
    server = start_server("--model", "incompressibility")
    with RewardClient(server.url) as client:
        reply = client.submit(images, ["x"] * 3).result(timeout=30)
    assert reply.scores == pytest.approx([pil_jpeg_kb(im) for im in images], abs=1e-12)


def _post(url: str, body: bytes, content_type: str = MEDIA_TYPE, **kw) -> httpx.Response:
    return httpx.post(f"{url}/v1/score", content=body, headers={"content-type": content_type}, timeout=30, **kw)


def _wrong_length(images):
    body = msgpack.unpackb(build_request(images, ["a"] * 3))
    body["images"][1]["data"] = body["images"][1]["data"][:-5]
    return pack(body)


@pytest.mark.parametrize(
    "make_body, content_type, status, code, field",
    [
        (lambda im: b"\xc1garbage", MEDIA_TYPE, 400, "malformed_body", None),
        (lambda im: build_request(im, ["a"] * 3)[:-100], MEDIA_TYPE, 400, "malformed_body", None),
        (lambda im: pack([1, 2, 3]), MEDIA_TYPE, 400, "malformed_body", None),
        (_wrong_length, MEDIA_TYPE, 422, "invalid_request", "images.1.data"),
        (lambda im: build_request(im, ["a"] * 3)[:0] + pack({**msgpack.unpackb(build_request(im, ["a"] * 3)), "prompts": ["a"]}), MEDIA_TYPE, 422, "invalid_request", "prompts"),
        (lambda im: build_request(im, ["a"] * 3), "application/json", 415, "unsupported_media_type", "content-type"),
        (lambda im: build_request(np.zeros((8, 256, 256, 3), np.uint8), ["a"] * 8), MEDIA_TYPE, 413, "payload_too_large", "body"),
    ],
    ids=["garbage", "truncated", "not-a-map", "wrong-raw-length", "prompt-count", "content-type", "oversize"],
)
def test_bad_requests_get_4xx_and_server_keeps_serving(compression_server, images, make_body, content_type, status, code, field):
    response = _post(compression_server.url, make_body(images), content_type)
    assert response.status_code == status
    assert response.headers["content-type"] == MEDIA_TYPE
    error = unpack(response.content)
    assert error["version"] == 1 and error["error"]["code"] == code and error["error"]["field"] == field
    assert error["error"]["message"]
    assert compression_server.healthy()
    # and real work still goes through
    with RewardClient(compression_server.url) as client:
        assert len(client.submit(images, ["a"] * 3).result(timeout=30).scores) == 3


def test_streamed_oversize_body_is_refused_without_content_length(compression_server):
    chunks = (bytes(64 * 1024) for _ in range(40))  # 2.5 MiB, chunked: no content-length to check up front
    response = _post(compression_server.url, chunks)
    assert response.status_code == 413
    assert compression_server.healthy()


def test_json_endpoints(compression_server):
    assert httpx.get(f"{compression_server.url}/readyz").json() == {"ready": True}
    info = httpx.get(f"{compression_server.url}/v1/info").json()
    assert info["scorer"] == "compression" and info["version"] == 1 and "JPEG" in info["description"]
    assert info["limits"]["max_body_bytes"] == 1024 * 1024


def test_unknown_scorer_is_a_clear_startup_error(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent / "reward-server"
    result = subprocess.run([str(exe), "--model", "nope"], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "unknown scorer 'nope'" in result.stderr and "compression" in result.stderr
