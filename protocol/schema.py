"""The msgpack wire contract of ``POST /v1/score`` and ``POST /v1/score_grad`` as pydantic models (see
protocol/README.md).

Limits are not constants: a server passes its own through the validation context
(``ScoreRequest.model_validate(obj, context={"limits": limits})``), and the defaults apply otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from protocol.zero_copy import MAX_ELEMENTS

VERSION = 1
MEDIA_TYPE = "application/x-msgpack"
Encoding = Literal["raw", "png", "jpeg", "f16", "f32"]
# raw: uint8 HWC (/v1/score); f16 / f32: little-endian float HWC in [0, 1] (/v1/score_grad)
FLOAT_ENCODINGS = {"f16": "<f2", "f32": "<f4"}
ITEMSIZE = {"raw": 1, "f16": 2, "f32": 4}  # bytes per value of the encodings whose data is the pixels themselves
GradientDtype = Literal["float16", "float32"]
GRADIENT_DTYPES = {"float16": "<f2", "float32": "<f4"}


@dataclass(frozen=True)
class Limits:
    max_images: int = 256
    max_pixels: int = 1024 * 1024  # per image (height x width)
    max_body_bytes: int = 256 * 1024 * 1024
    max_elements: int = MAX_ELEMENTS  # msgpack values per body (see protocol.zero_copy)
    # Video requests (protocol/README.md, "Video"); frames share max_pixels. Wan 2.1 and HunyuanVideo sample 81
    # and 129 frames; 2 GiB is 27 Wan 480p videos (81 x 480 x 832 x 3 bytes, 97 MB each).
    max_videos: int = 64
    max_frames: int = 256  # per video
    max_video_bytes: int = 2 * 1024**3  # decoded bytes of all the videos of one request


def _binary(value: Any) -> bytes | memoryview:
    if isinstance(value, (bytes, memoryview)):
        return value
    if isinstance(value, bytearray):
        return bytes(value)
    raise ValueError(f"must be binary (msgpack bin), got {type(value).__name__}")


# Raw image bytes: ``bytes``, or a read-only view of the request body when the server parsed it in place.
Payload = Annotated[Any, PlainValidator(_binary), WithJsonSchema({"type": "string", "format": "binary"})]


def _integer(value: Any) -> Any:
    if type(value) is not int:  # bool is an int subclass, and lax validation takes 3.0 and "3"
        raise ValueError(f"must be an integer, got {type(value).__name__} {value!r}")
    return value


Version = Annotated[Literal[1], BeforeValidator(_integer)]


def _limits(info: ValidationInfo) -> Limits:
    return (info.context or {}).get("limits", Limits())


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Image(_Wire):
    # strict: an int on the wire, not "8", 8.0 or True (which lax validation made height 1)
    height: int = Field(gt=0, strict=True)
    width: int = Field(gt=0, strict=True)
    channels: Annotated[Literal[3], BeforeValidator(_integer)] = 3
    encoding: Encoding
    data: Payload

    @model_validator(mode="after")
    def _size(self, info: ValidationInfo) -> "Image":
        limit = _limits(info).max_pixels
        if self.height * self.width > limit:
            raise ValueError(f"height: {self.height}x{self.width} pixels exceed the limit of {limit} per image")
        itemsize = ITEMSIZE.get(self.encoding)
        expected = self.height * self.width * self.channels * (itemsize or 1)
        if itemsize is not None and len(self.data) != expected:
            raise ValueError(
                f"data: {self.encoding} data has {len(self.data)} bytes, "
                f"height x width x channels x {itemsize} = {expected}"
            )
        return self


class ScoreRequest(_Wire):
    encodings: ClassVar[tuple[str, ...]] = ("raw", "png", "jpeg")  # /v1/score scores uint8 images

    version: Version = VERSION
    request_id: str = Field(max_length=200)
    images: list[Image] = Field(min_length=1)
    prompts: list[str]
    metadata: list[dict[str, Any]]

    @field_validator("images", mode="before")
    @classmethod
    def _count(cls, images: Any, info: ValidationInfo) -> Any:
        limit = _limits(info).max_images
        if isinstance(images, list) and len(images) > limit:
            raise ValueError(f"{len(images)} images exceed the limit of {limit} per request")
        return images

    @field_validator("images")
    @classmethod
    def _encodings(cls, images: list[Image]) -> list[Image]:
        for i, image in enumerate(images):
            if image.encoding not in cls.encodings:
                raise ValueError(
                    f"{i}.encoding: this endpoint takes {', '.join(cls.encodings)} images, got {image.encoding}"
                )
        return images

    @model_validator(mode="after")
    def _lengths(self) -> "ScoreRequest":
        for name in ("prompts", "metadata"):
            if len(getattr(self, name)) != len(self.images):
                raise ValueError(f"{name}: has {len(getattr(self, name))} entries for {len(self.images)} images")
        return self


class ScoreGradRequest(ScoreRequest):
    """``/v1/score_grad``: float images (f16 / f32), and the dtype the gradients come back in."""

    encodings: ClassVar[tuple[str, ...]] = tuple(FLOAT_ENCODINGS)

    gradient_dtype: GradientDtype = "float32"


VIDEO_VERSION = 1  # the layout of a video item (protocol/README.md, "Video"); bumped if it ever changes


class Video(_Wire):
    """F frames of height x width x 3 uint8: ``raw``, one bin of F x H x W x 3 bytes (frame-major, each frame
    HWC row-major, as numpy's (F, H, W, 3)); ``png`` / ``jpeg``, a list of F files, one per frame."""

    frames: int = Field(gt=0, strict=True)
    height: int = Field(gt=0, strict=True)
    width: int = Field(gt=0, strict=True)
    channels: Annotated[Literal[3], BeforeValidator(_integer)] = 3
    encoding: Literal["raw", "png", "jpeg"]
    data: Annotated[Any, WithJsonSchema({"oneOf": [{"type": "string", "format": "binary"}, {"type": "array"}]})]

    @model_validator(mode="after")
    def _size(self, info: ValidationInfo) -> "Video":
        limits = _limits(info)
        if self.frames > limits.max_frames:
            raise ValueError(f"frames: {self.frames} frames exceed the limit of {limits.max_frames} per video")
        if self.height * self.width > limits.max_pixels:
            raise ValueError(
                f"height: {self.height}x{self.width} pixels exceed the limit of {limits.max_pixels} per frame"
            )
        if self.encoding == "raw":
            expected = self.frames * self.height * self.width * self.channels
            try:
                data = _binary(self.data)
            except ValueError as exc:
                raise ValueError(f"data: raw video {exc}") from None
            if len(data) != expected:
                raise ValueError(f"data: raw data has {len(data)} bytes, frames x height x width x 3 = {expected}")
        else:
            if not isinstance(self.data, list) or len(self.data) != self.frames:
                got = f"{len(self.data)} entries" if isinstance(self.data, list) else type(self.data).__name__
                raise ValueError(f"data: {self.encoding} video data must be a list of {self.frames} files, got {got}")
            data = []
            for j, frame in enumerate(self.data):
                try:
                    data.append(_binary(frame))
                except ValueError as exc:
                    raise ValueError(f"data.{j}: {exc}") from None
        object.__setattr__(self, "data", data)  # frozen model: bytearray made bytes, as Image's data
        return self

    @property
    def decoded_bytes(self) -> int:
        return self.frames * self.height * self.width * self.channels


class VideoScoreRequest(_Wire):
    """``/v1/score`` with ``videos`` in place of ``images``: one score per video (protocol/README.md)."""

    version: Version = VERSION
    video_version: Annotated[Literal[1], BeforeValidator(_integer)]  # required: the client says which layout
    request_id: str = Field(max_length=200)
    videos: list[Video] = Field(min_length=1)
    prompts: list[str]
    metadata: list[dict[str, Any]]

    @field_validator("videos", mode="before")
    @classmethod
    def _count(cls, videos: Any, info: ValidationInfo) -> Any:
        limit = _limits(info).max_videos
        if isinstance(videos, list) and len(videos) > limit:
            raise ValueError(f"{len(videos)} videos exceed the limit of {limit} per request")
        return videos

    @model_validator(mode="after")
    def _shapes(self) -> "VideoScoreRequest":
        for name in ("prompts", "metadata"):
            if len(getattr(self, name)) != len(self.videos):
                raise ValueError(f"{name}: has {len(getattr(self, name))} entries for {len(self.videos)} videos")
        first = self.videos[0]
        for i, video in enumerate(self.videos):
            if (video.frames, video.height, video.width) != (first.frames, first.height, first.width):
                raise ValueError(
                    f"videos.{i}: video is {video.frames}x{video.height}x{video.width} (frames x height x width) "
                    f"but videos.0 is {first.frames}x{first.height}x{first.width}; send videos of one shape per request"
                )
        return self

    @property
    def decoded_bytes(self) -> int:
        return sum(video.decoded_bytes for video in self.videos)


def check_scores(scores: Any, info: Any, expected: int) -> tuple[list[float], dict[str, list[Any]]]:
    """The one check of a scorer's output, wherever it runs (a server, in process) and on every reply.

    Returns the scores as ``expected`` finite floats and ``info`` as lists of one entry per image (numpy
    scalars made plain); raises ``ValueError("scores.3: ...")`` naming the first problem.
    """
    try:
        values = [float(s) for s in scores]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"scores: not a sequence of numbers ({exc})") from None
    if len(values) != expected:
        raise ValueError(f"scores: {len(values)} scores for {expected} images")
    for i, s in enumerate(values):
        if not math.isfinite(s):
            raise ValueError(f"scores.{i}: score {s} is not finite")
    if not isinstance(info, dict):
        raise ValueError(f"info: must be a map of per-image lists, got {type(info).__name__}")
    checked = {}
    for key, entries in info.items():
        if isinstance(entries, (str, bytes, dict)) or not hasattr(entries, "__len__"):
            raise ValueError(f"info.{key}: must be a list of one entry per image, got {type(entries).__name__}")
        if len(entries) != expected:
            raise ValueError(f"info.{key}: has {len(entries)} entries for {expected} images")
        checked[str(key)] = [e.item() if hasattr(e, "item") and hasattr(e, "dtype") else e for e in entries]
    return values, checked


class ScoreReply(_Wire):
    version: Literal[1] = VERSION
    request_id: str
    scores: list[float]
    info: dict[str, list[Any]] = {}
    scorer: str
    elapsed_ms: float = Field(ge=0)

    @model_validator(mode="after")
    def _checked(self) -> "ScoreReply":
        check_scores(self.scores, self.info, len(self.scores))
        return self


class ScoreGradReply(ScoreReply):
    """Each image's score and the gradient of that score with respect to its pixels: per image, height x
    width x 3 little-endian values of ``gradient_dtype`` (HWC, as the request's images)."""

    gradients: list[Payload]
    gradient_dtype: GradientDtype

    @model_validator(mode="after")
    def _one_gradient_per_score(self) -> "ScoreGradReply":
        if len(self.gradients) != len(self.scores):
            raise ValueError(f"gradients: {len(self.gradients)} gradients for {len(self.scores)} scores")
        return self


class ErrorDetail(_Wire):
    code: str
    message: str
    field: str | None = None


class ErrorReply(_Wire):
    version: Literal[1] = VERSION
    error: ErrorDetail
