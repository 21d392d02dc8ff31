"""Videos on the wire (protocol/README.md, "Video"): round trips, image requests byte for byte as before, every
limit refused naming its field, and real reward-servers (this checkout's, as subprocesses) scoring videos
frame by frame with pooling, and whole with the temporal scorer."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path

import httpx
import msgpack
import numpy as np
import pytest
from conftest import ServerProcess, free_port
from PIL import Image

from protocol import (
    MEDIA_TYPE,
    Limits,
    ProtocolError,
    RewardClient,
    RewardServerError,
    ScoreGradRequest,
    ScoreRequest,
    VideoScoreRequest,
    build_request,
    build_video_request,
    decode_images,
    decode_videos,
    pack,
    parse_request,
    unpack,
)

ROOT = Path(__file__).resolve().parents[1]
BRANCH_POINT = "d0ec147d3b76052d1d8e527341c6b264099d3f97"  # the last commit before the video extension


def videos_of(n: int = 3, frames: int = 4, height: int = 24, width: int = 32, seed: int = 0) -> np.ndarray:
    """uint8 (n, frames, height, width, 3) whose videos compress differently: noise, a moving ramp, flat grey."""
    rng = np.random.default_rng(seed)
    ramp = np.broadcast_to(np.linspace(0, 255, width, dtype=np.uint8)[None, :, None], (height, width, 3))
    kinds = [
        lambda: rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8),
        lambda: np.stack([np.roll(ramp, 3 * f, axis=1) for f in range(frames)]),
        lambda: np.full((frames, height, width, 3), 128, np.uint8),
    ]
    return np.stack([kinds[i % 3]() for i in range(n)])


# -- the wire format ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("encoding", ["raw", "png", "jpeg"])
def test_video_round_trip(encoding):
    videos = videos_of()
    metadata = [{"i": i, "tags": ["x"]} for i in range(3)]
    request = parse_request(build_video_request(videos, ["a", "b", "c"], metadata, "rid", encoding))
    assert isinstance(request, VideoScoreRequest) and request.video_version == 1
    assert (request.request_id, request.prompts, request.metadata) == ("rid", ["a", "b", "c"], metadata)
    assert [(v.frames, v.height, v.width, v.encoding) for v in request.videos] == [(4, 24, 32, encoding)] * 3
    decoded = np.stack(decode_videos(request))
    if encoding == "jpeg":  # each frame exactly what PIL decodes of the frame's own JPEG
        for video, got in zip(videos, decoded):
            for frame, frame_got in zip(video, got):
                buf = io.BytesIO()
                Image.fromarray(frame).save(buf, format="JPEG", quality=95)
                np.testing.assert_array_equal(frame_got, np.asarray(Image.open(buf).convert("RGB")))
    else:
        np.testing.assert_array_equal(decoded, videos)


def test_raw_videos_are_views_of_the_body_and_one_bin_each():
    videos = videos_of(2)
    body = build_video_request(videos, ["a", "b"])
    decoded = decode_videos(parse_request(body))
    assert all(not v.flags.writeable and np.shares_memory(v, np.frombuffer(body, np.uint8)) for v in decoded)
    wire = msgpack.unpackb(body)
    assert list(wire) == ["version", "video_version", "request_id", "videos", "prompts", "metadata"]
    assert wire["videos"][0]["data"] == videos[0].tobytes()  # frame after frame, each HWC row-major


def _at_branch_point(folder: Path) -> None:
    """The branch point's protocol package, in a subprocess run in ``folder``, builds IMAGE_BODIES' requests and
    parses ``folder/video.bin`` (its error to ``video.err``)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", BRANCH_POINT, "protocol"], capture_output=True)
    if archive.returncode != 0:
        pytest.skip(f"commit {BRANCH_POINT[:7]} is not in this clone: {archive.stderr.decode()[:200]}")
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    code = (
        "import os, protocol\n"
        "assert protocol.__file__.startswith(os.getcwd()), protocol.__file__  # the old package, not this one\n"
        + IMAGE_BODIES
        + "from protocol import ProtocolError, parse_request\n"
        "try:\n    parse_request(open('video.bin', 'rb').read())\n"
        "except ProtocolError as e:\n    open('video.err', 'w').write(f'{e.status} {e.field}')\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=folder, check=True, env={**os.environ, "PYTHONPATH": ""})


# Deterministic image requests: raw, png (zlib, deterministic for one zlib build) and jpeg (one libjpeg build).
IMAGE_BODIES = """
import numpy as np
from protocol import build_request
images = np.random.default_rng(43).integers(0, 256, (3, 8, 12, 3), dtype=np.uint8)
for encoding in ("raw", "png", "jpeg"):
    body = build_request(images, ["a red cube", "b", ""], [{"i": 1}, {}, {"tags": ["x"]}], "r-43", encoding)
    open(f"{encoding}.bin", "wb").write(body)
"""
# sha256 of raw.bin as the branch point's build_request made it (raw bytes need no codec, so it never varies)
RAW_IMAGE_BODY_SHA256 = "58c6bbc53b9cce75b45d9f9e1f1d363c417d82dfd4b423b00f8d85c6feb51f8d"


def test_image_requests_are_byte_for_byte_as_before(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(IMAGE_BODIES, {})  # this checkout's build_request
    assert hashlib.sha256((tmp_path / "raw.bin").read_bytes()).hexdigest() == RAW_IMAGE_BODY_SHA256
    before = tmp_path / "before"
    before.mkdir()
    (before / "video.bin").write_bytes(build_video_request(videos_of(1), ["a"]))
    _at_branch_point(before)
    for encoding in ("raw", "png", "jpeg"):
        body = (tmp_path / f"{encoding}.bin").read_bytes()
        assert body == (before / f"{encoding}.bin").read_bytes(), encoding
        assert type(parse_request(body)) is ScoreRequest and len(decode_images(parse_request(body))) == 3
    # a server from before the extension answers a video with a 422 naming a field (it misses images), not a 500
    assert (before / "video.err").read_text() == "422 images"


def _video(**overrides):
    video = {"frames": 2, "height": 2, "width": 2, "channels": 3, "encoding": "raw", "data": bytes(24)}
    return {**video, **overrides}


def _request(**overrides):
    body = {"version": 1, "video_version": 1, "request_id": "r", "videos": [_video()], "prompts": ["a"]}
    return {**body, "metadata": [{}], **overrides}


LIMITS = Limits(max_pixels=64 * 64, max_videos=2, max_frames=4, max_video_bytes=4 * 64 * 64 * 3)


@pytest.mark.parametrize(
    "body, status, field",
    [
        (_request(videos=[_video(frames=5, data=bytes(60))]), 422, "videos.0.frames"),
        (_request(videos=[_video()] * 3, prompts=["a"] * 3, metadata=[{}] * 3), 422, "videos"),
        (_request(videos=[_video(height=65, width=64, data=bytes(2 * 65 * 64 * 3))]), 422, "videos.0.height"),
        # 2 videos of 4 frames of 64 x 64: twice max_video_bytes, refused from the declared sizes (413)
        (_request(videos=[_video(frames=4, height=64, width=64, data=bytes(49152))] * 2, prompts=["a"] * 2,
                  metadata=[{}] * 2), 413, "videos"),
        (_request(videos=[_video(data=bytes(23))]), 422, "videos.0.data"),
        (_request(videos=[_video(data=[bytes(12)] * 2)]), 422, "videos.0.data"),  # raw is one bin
        (_request(videos=[_video(encoding="png", data=[b"x"])]), 422, "videos.0.data"),  # 1 file for 2 frames
        (_request(videos=[_video(encoding="png", data=[b"x", "y"])]), 422, "videos.0.data.1"),
        (_request(videos=[_video(encoding="f32")]), 422, "videos.0.encoding"),
        (_request(videos=[_video(frames=2.0)]), 422, "videos.0.frames"),
        (_request(videos=[_video(frames=0)]), 422, "videos.0.frames"),
        (_request(videos=[_video(), _video(frames=1, data=bytes(12))], prompts=["a", "b"], metadata=[{}, {}]),
         422, "videos.1"),
        (_request(video_version=2), 422, "video_version"),
        ({k: v for k, v in _request().items() if k != "video_version"}, 422, "video_version"),
        (_request(images=[]), 422, "images"),
        (_request(prompts=["a", "b"]), 422, "prompts"),
        (_request(videos=[]), 422, "videos"),
    ],
)  # fmt: skip
def test_every_video_rule_names_its_field(body, status, field):
    with pytest.raises(ProtocolError) as err:
        decode_videos(parse_request(pack(body), LIMITS))
    assert (err.value.status, err.value.field) == (status, field), err.value


def test_the_decoded_size_is_refused_before_any_frame_is_decoded():
    # 4 frames declared 1024 x 1024 whose files are 1 byte each: decoding would fail; the size check comes first
    body = _request(videos=[_video(frames=4, height=1024, width=1024, encoding="png", data=[b"x"] * 4)])
    with pytest.raises(ProtocolError, match="decode to 12582912 bytes") as err:
        parse_request(pack(body), Limits(max_video_bytes=12582911))
    assert (err.value.status, err.value.field) == (413, "videos")


def test_a_broken_frame_names_its_video_and_frame_and_score_grad_refuses_videos():
    body = msgpack.unpackb(build_video_request(videos_of(2, frames=3), ["a", "b"], encoding="png"))
    body["videos"][1]["data"][2] = body["videos"][1]["data"][2][:-20]  # cut short: the PNG's end chunk is gone
    with pytest.raises(ProtocolError) as err:
        decode_videos(parse_request(pack(body)))
    assert (err.value.status, err.value.code, err.value.field) == (422, "invalid_image", "videos.1.data.2")
    with pytest.raises(ProtocolError) as err:
        parse_request(build_video_request(videos_of(1), ["a"]), model=ScoreGradRequest)
    assert (err.value.status, err.value.field) == (422, "videos")


# -- real reward-servers -----------------------------------------------------------------------------------------
class CheckoutServer(ServerProcess):
    """``python -m reward_servers.cli`` from this checkout: the code under test, whichever checkout the venv's
    ``reward-server`` script imports."""

    def __init__(self, *args: str, log: Path):
        self.port = free_port()
        self.url, self.log = f"http://127.0.0.1:{self.port}", log
        command = [
            sys.executable,
            "-m",
            "reward_servers.cli",
            *args,
            "--port",
            str(self.port),
            "--log-level",
            "warning",
        ]
        self.proc = subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=open(log, "wb"),
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )


SERVERS = {
    # small limits: 4 videos, 6 frames, 0.1 MiB of decoded video per request, 20 frames queued
    "mean": ["--model", "compression", "--max-videos", "4", "--max-frames", "6", "--max-video-mb", "0.1"]
    + ["--max-queue", "20"],
    "min": ["--model", "compression", "--video-pooling", "min"],
    "none": ["--model", "compression", "--video-pooling", "none"],
    "temporal": ["--model", "temporal", "--checkpoint", "tiny-shapes"],
}


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("video-servers")
    started = {name: CheckoutServer(*args, log=folder / f"{name}.log") for name, args in SERVERS.items()}
    try:
        yield {name: server.wait_ready(120) for name, server in started.items()}  # started together: one wait
    finally:
        for server in started.values():
            server.stop()


def _post(url: str, body: bytes) -> httpx.Response:
    return httpx.post(f"{url}/v1/score", content=body, headers={"content-type": MEDIA_TYPE}, timeout=60)


@pytest.mark.parametrize("pooling, encoding", [("mean", "raw"), ("mean", "png"), ("min", "raw"), ("min", "jpeg")])
def test_frame_scores_are_pooled_per_video_as_scored_in_process(servers, pooling, encoding):
    from scorers.compression import JpegCompressibility

    videos = videos_of(3, frames=5)
    with RewardClient(servers[pooling].url) as client:
        reply = client.submit_videos(videos, ["a", "b", "c"], encoding=encoding).result(timeout=60)
    scorer = JpegCompressibility()
    scorer.load()
    # the frames the server decoded (PNG: the same pixels; JPEG: what PIL decodes), scored as images here
    sent = decode_videos(parse_request(build_video_request(videos, ["a", "b", "c"], encoding=encoding)))
    frame_scores = [scorer.score(video, ["x"] * len(video), [{}] * len(video)).scores for video in sent]
    pool = {"mean": np.mean, "min": np.min}[pooling]
    assert reply.scores == pytest.approx([pool(s) for s in frame_scores], abs=1e-12)
    assert reply.info["frame_scores"] == [pytest.approx(s.tolist(), abs=1e-12) for s in frame_scores]
    assert reply.info["jpeg_kb"] == [pytest.approx((-s).tolist(), abs=1e-12) for s in frame_scores]
    assert reply.scores[0] < reply.scores[1] < reply.scores[2] < 0  # noise compresses worst, flat grey best
    if pooling == "min":  # the worst frame, not the mean: the moving ramp's frames differ
        assert reply.scores[1] < np.mean(frame_scores[1])


@pytest.mark.parametrize(
    "videos, status, field",
    [
        (videos_of(1, frames=7), 422, "videos.0.frames"),  # --max-frames 6
        (videos_of(5, frames=1), 422, "videos"),  # --max-videos 4
        (videos_of(2, frames=6, height=48, width=64), 413, "videos"),  # 110,592 bytes > --max-video-mb 0.1
        (videos_of(4, frames=6), 413, "videos"),  # 24 frames > --max-queue 20
    ],
    ids=["frames", "videos", "bytes", "queue"],
)
def test_limits_name_their_field_and_the_server_serves_the_next_request(servers, videos, status, field):
    server = servers["mean"]
    response = _post(server.url, build_video_request(videos, ["a"] * len(videos)))
    error = unpack(response.content)["error"]
    assert (response.status_code, error["field"]) == (status, field), error
    with RewardClient(server.url) as client:
        with pytest.raises(RewardServerError) as err:
            client.submit_videos(videos, ["a"] * len(videos), max_request_bytes=1 << 30).result(timeout=60)
        assert (err.value.status, err.value.field) == (status, field)
        assert len(client.submit_videos(videos_of(2), ["a", "b"]).result(timeout=60).scores) == 2
    assert server.healthy()


def test_a_server_without_video_pooling_refuses_videos_and_still_scores_images(servers):
    server = servers["none"]
    response = _post(server.url, build_video_request(videos_of(1), ["a"]))
    error = unpack(response.content)["error"]
    assert (response.status_code, error["field"]) == (422, "videos") and "--video-pooling" in error["message"]
    assert httpx.get(f"{server.url}/v1/info").json()["video"] is None
    images = videos_of(3, frames=1)[:, 0]
    with RewardClient(server.url) as client:
        reply = client.submit(images, ["a", "b", "c"]).result(timeout=60)
    from scorers.compression import jpeg_size_kb

    assert reply.scores == pytest.approx([-jpeg_size_kb(image) for image in images], abs=1e-12)
    assert set(reply.info) == {"jpeg_kb"}  # the image reply as before: no frame_scores


def test_temporal_scores_a_still_video_one_and_random_frames_less(servers):
    from scorers.temporal import TemporalConsistency

    rng = np.random.default_rng(1)
    still = np.repeat(rng.integers(0, 256, (1, 1, 32, 32, 3), dtype=np.uint8), 5, axis=1)
    noise = rng.integers(0, 256, (1, 5, 32, 32, 3), dtype=np.uint8)
    videos = np.concatenate([still, noise])
    with RewardClient(servers["temporal"].url) as client:
        reply = client.submit_videos(videos, ["a", "b"]).result(timeout=60)
    assert reply.scores[0] == pytest.approx(1.0, abs=1e-5)
    assert reply.scores[1] < 0.95  # random frames share little (0.85 with the shipped shapes CLIP)
    assert reply.info["frame_cosines"][0] == pytest.approx([1.0] * 4, abs=1e-5) and len(reply.info["min_cosine"]) == 2
    local = TemporalConsistency("tiny-shapes")
    local.load()
    assert reply.scores == pytest.approx(local.score_videos(videos, ["a", "b"], [{}, {}]).scores.tolist(), abs=1e-5)


def test_temporal_refuses_images_and_one_frame_videos_then_serves(servers):
    server = servers["temporal"]
    response = _post(server.url, build_video_request(videos_of(2, frames=1), ["a", "b"]))
    assert (response.status_code, unpack(response.content)["error"]["field"]) == (422, "videos.0.frames")
    response = _post(server.url, build_request(videos_of(1, frames=1)[:, 0], ["a"]))
    assert (response.status_code, unpack(response.content)["error"]["field"]) == (422, "images")
    info = httpx.get(f"{server.url}/v1/info").json()
    assert info["images"] is False
    assert info["video"] == {"version": 1, "scoring": "video", "pooling": None, "min_frames": 2}
    with RewardClient(server.url) as client:
        assert len(client.submit_videos(videos_of(2, frames=2), ["a", "b"]).result(timeout=60).scores) == 2


def test_the_client_splits_a_batch_into_requests_and_joins_the_replies(servers):
    server = servers["min"]
    videos = videos_of(5, frames=3)
    before = server.metric("reward_requests_total", status="200")
    with RewardClient(server.url) as client:
        whole = client.submit_videos(videos, list("abcde"), max_request_bytes=1 << 30).result(timeout=60)
        split = client.submit_videos(videos, list("abcde"), max_request_bytes=2 * videos[0].nbytes).result(timeout=60)
    assert server.metric("reward_requests_total", status="200") - before == 1 + 3  # 5 videos, 2 a request
    assert split.scores == whole.scores and split.info == whole.info and len(split.scores) == 5
    info = httpx.get(f"{server.url}/v1/info").json()
    assert info["video"] == {"version": 1, "scoring": "frames", "pooling": "min", "min_frames": 1}
    assert info["limits"]["max_frames"] == 256 and info["limits"]["max_video_bytes"] == 2 << 30


def test_the_trainers_rewards_score_videos_in_process_and_remotely(servers):
    from trainer.config import RewardConfig
    from trainer.rewards import Rewards

    videos = videos_of(3, frames=4)
    local = Rewards(RewardConfig(scorer="compression"))
    remote = Rewards(RewardConfig(url=[servers["mean"].url]))
    try:
        here = local.submit(videos, ["a", "b", "c"], [{}] * 3)["compression"].result(timeout=60)
        there = remote.submit(videos, ["a", "b", "c"], [{}] * 3)["compression"].result(timeout=60)
    finally:
        local.close()
        remote.close()
    assert there.scores.tolist() == pytest.approx(here.scores.tolist(), abs=1e-12) and len(here.scores) == 3
    assert here.info["frame_scores"] == there.info["frame_scores"]
