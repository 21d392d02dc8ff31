"""Video items of ``POST /v1/score`` (protocol/README.md, "Video"): uint8 (N, F, H, W, 3) <-> msgpack bodies.

A video request is an image request with ``videos`` in place of ``images`` and ``video_version``; everything
else (version, request_id, prompts, metadata, the reply) is the image contract's. Raw videos travel as one
``bin`` each and come back as read-only views of the body, like raw images; PNG and JPEG videos are a list
of one file per frame, each decoded and checked exactly as an image of that encoding.
"""

from __future__ import annotations

from typing import Any, Sequence

import msgpack
import numpy as np

from protocol.codec import _bin_header, decode_image, encode_image
from protocol.errors import ProtocolError
from protocol.schema import VERSION, VIDEO_VERSION, Image, Video, VideoScoreRequest

VIDEO_ENCODINGS = ("raw", "png", "jpeg")


def _check_video(array: np.ndarray) -> None:
    if array.ndim != 4 or array.shape[3] != 3 or array.dtype != np.uint8:
        raise ValueError(f"videos must be uint8 FxHxWx3, got {array.dtype} {array.shape}")


def video_request_parts(
    videos: np.ndarray | Sequence[np.ndarray],
    prompts: Sequence[str],
    metadata: Sequence[dict[str, Any]] | None = None,
    request_id: str = "",
    encoding: str = "raw",
) -> list[bytes | memoryview]:
    """A video request body as buffers to send in order (see ``protocol.codec.request_parts``): ``videos`` is
    a uint8 (N, F, H, W, 3) array or a list of (F, H, W, 3) ones; raw pixels are not copied."""
    if encoding not in VIDEO_ENCODINGS:
        raise ValueError(f"video encoding must be one of {', '.join(VIDEO_ENCODINGS)}, got {encoding!r}")
    metadata = list(metadata) if metadata is not None else [{} for _ in prompts]
    packer = msgpack.Packer(use_bin_type=True)
    parts: list[bytes | memoryview] = []
    head = bytearray(packer.pack_map_header(6))
    for key, value in (("version", VERSION), ("video_version", VIDEO_VERSION), ("request_id", request_id)):
        head += packer.pack(key) + packer.pack(value)
    head += packer.pack("videos") + packer.pack_array_header(len(videos))
    for array in videos:
        _check_video(array)
        frames, height, width, _ = array.shape
        fields = {"frames": frames, "height": height, "width": width, "channels": 3, "encoding": encoding}
        head += packer.pack_map_header(6) + b"".join(packer.pack(x) for kv in fields.items() for x in kv)
        head += packer.pack("data")
        if encoding == "raw":  # one bin, frame after frame: a flat view of the array, no copy
            data = np.ascontiguousarray(array).reshape(-1).data
            parts += [bytes(head + _bin_header(len(data))), data]
            head.clear()
            continue
        head += packer.pack_array_header(frames)
        for frame in array:
            data = encode_image(frame, encoding)["data"]
            head += _bin_header(len(data)) + data
    head += packer.pack("prompts") + packer.pack(list(prompts)) + packer.pack("metadata") + packer.pack(metadata)
    return [*parts, bytes(head)]


def build_video_request(*args: Any, **kwargs: Any) -> bytes:
    """A video request body from a uint8 (N, F, H, W, 3) batch; see ``video_request_parts``."""
    return b"".join(video_request_parts(*args, **kwargs))


def decode_video(video: Video, field: str) -> np.ndarray:
    """A validated wire video as an (F, H, W, 3) uint8 array (a read-only view of the body for raw data)."""
    shape = (video.frames, video.height, video.width, video.channels)
    if video.encoding == "raw":
        return np.frombuffer(video.data, dtype=np.uint8).reshape(shape)
    out = np.empty(shape, np.uint8)
    for j, data in enumerate(video.data):
        frame = Image.model_construct(
            height=video.height, width=video.width, channels=video.channels, encoding=video.encoding, data=data
        )  # already validated as a part of the video
        out[j] = decode_image(frame, f"{field}.data.{j}")
    return out


def decode_videos(request: VideoScoreRequest) -> list[np.ndarray]:
    """The request's videos as (F, H, W, 3) uint8 arrays, all of one shape (the schema checked it)."""
    return [decode_video(video, f"videos.{i}") for i, video in enumerate(request.videos)]


def check_frames(request: VideoScoreRequest, min_frames: int, scorer: str) -> None:
    """422 naming the first video shorter than a scorer takes (the temporal scorer compares frame pairs)."""
    for i, video in enumerate(request.videos):
        if video.frames < min_frames:
            raise ProtocolError(
                422,
                "invalid_request",
                f"{video.frames} frame(s); scorer {scorer} takes videos of at least {min_frames}",
                f"videos.{i}.frames",
            )
