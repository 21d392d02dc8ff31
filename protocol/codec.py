"""msgpack bodies and image payloads: bytes <-> validated models <-> uint8 numpy arrays."""

from __future__ import annotations

import io
from typing import Any, Sequence

import msgpack
import numpy as np
from pydantic import ValidationError

from protocol.errors import ProtocolError
from protocol.schema import (
    FLOAT_ENCODINGS,
    GRADIENT_DTYPES,
    VERSION,
    Encoding,
    GradientDtype,
    Image,
    Limits,
    ScoreGradReply,
    ScoreReply,
    ScoreRequest,
    VideoScoreRequest,
)
from protocol.zero_copy import TooManyValues, unpack_views


def pack(obj: dict[str, Any]) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(body: bytes) -> Any:
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise ProtocolError(400, "malformed_body", f"body is not valid msgpack: {exc}") from None


def encode_image(array: np.ndarray, encoding: Encoding = "raw", quality: int = 95) -> dict[str, Any]:
    """One HWC RGB array as a wire image map: uint8 for raw / png / jpeg, float in [0, 1] for f16 / f32."""
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"images must be HxWx3, got {array.shape}")
    height, width, _ = array.shape
    if encoding in FLOAT_ENCODINGS:
        if array.dtype.kind != "f":
            raise ValueError(f"{encoding} images must be float HxWx3 in [0, 1], got {array.dtype}")
        data = (
            np.ascontiguousarray(array, dtype=FLOAT_ENCODINGS[encoding]).reshape(-1).view(np.uint8).data
        )  # len(): bytes
        return {"height": height, "width": width, "channels": 3, "encoding": encoding, "data": data}
    if array.dtype != np.uint8:
        raise ValueError(f"images must be uint8 HxWx3, got {array.dtype} {array.shape}")
    if encoding == "raw":
        data = np.ascontiguousarray(array).reshape(-1).data  # a flat view: no copy, len() counts bytes
    else:
        from PIL import Image as PILImage

        buf = io.BytesIO()
        options = {"quality": quality} if encoding == "jpeg" else {"compress_level": 1}
        PILImage.fromarray(array).save(buf, format=encoding.upper(), **options)
        data = buf.getvalue()
    return {"height": height, "width": width, "channels": 3, "encoding": encoding, "data": data}


def decode_image(image: Image, field: str) -> np.ndarray:
    """A validated wire image as an HWC uint8 array (read-only for raw data: no copy).

    PNG and JPEG files must be whole: PIL fills what a truncated file lacks with grey whenever some library
    in the process has set ``ImageFile.LOAD_TRUNCATED_IMAGES``, and a scorer would score the made-up pixels.
    So a PNG's chunk checksums and end chunk are verified, and a JPEG must end with its end-of-image marker.
    (A JPEG corrupted in the middle cannot be told from a real one: the format has no checksum.)
    """
    shape = (image.height, image.width, image.channels)
    if image.encoding == "raw":
        return np.frombuffer(image.data, dtype=np.uint8).reshape(shape)
    if image.encoding in FLOAT_ENCODINGS:
        array = np.frombuffer(image.data, dtype=FLOAT_ENCODINGS[image.encoding]).reshape(shape)
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise ProtocolError(422, "invalid_image", f"{image.encoding} values must be finite and in [0, 1]", field)
        return array
    from PIL import Image as PILImage

    fmt = image.encoding.upper()
    try:
        if fmt == "JPEG" and bytes(image.data[-2:]) != b"\xff\xd9":
            raise ValueError("truncated: the file does not end with the JPEG end-of-image marker")
        with PILImage.open(io.BytesIO(image.data), formats=[fmt]) as pil:
            if pil.size != (image.width, image.height):  # checked before any pixel is decoded
                raise ProtocolError(
                    422,
                    "invalid_image",
                    f"image is {pil.width}x{pil.height} (width x height), declared {image.width}x{image.height}",
                    field,
                )
            if fmt == "PNG":
                pil.verify()  # reads the chunks and their CRCs without decompressing
        with PILImage.open(io.BytesIO(image.data), formats=[fmt]) as pil:
            array = np.asarray(pil.convert("RGB"))
    except ProtocolError:
        raise
    except Exception as exc:
        raise ProtocolError(422, "invalid_image", f"cannot decode {image.encoding}: {exc}", field) from None
    if array.shape != shape:
        raise ProtocolError(422, "invalid_image", f"decoded shape {array.shape} differs from declared {shape}", field)
    return array


def request_parts(
    images: np.ndarray | Sequence[np.ndarray],
    prompts: Sequence[str],
    metadata: Sequence[dict[str, Any]] | None = None,
    request_id: str = "",
    encoding: Encoding = "raw",
    gradient_dtype: GradientDtype | None = None,
) -> list[bytes | memoryview]:
    """A request body as a list of buffers whose concatenation is the msgpack map; image data not copied.

    Sending the parts one after another saves building a second copy of a large batch (a 25 MB body costs
    more in fresh-page faults than in copying). ``gradient_dtype``: a /v1/score_grad request.
    """
    metadata = list(metadata) if metadata is not None else [{} for _ in prompts]
    packer = msgpack.Packer(use_bin_type=True)
    parts: list[bytes | memoryview] = []
    head = bytearray()  # small msgpack pieces, coalesced so each write carries real data
    head += packer.pack_map_header(5 if gradient_dtype is None else 6) + packer.pack("version") + packer.pack(VERSION)
    if gradient_dtype is not None:
        head += packer.pack("gradient_dtype") + packer.pack(gradient_dtype)
    head += packer.pack("request_id") + packer.pack(request_id) + packer.pack("images")
    head += packer.pack_array_header(len(images))
    for array in images:
        image = encode_image(array, encoding)
        data = image.pop("data")
        head += packer.pack_map_header(5) + b"".join(packer.pack(x) for kv in image.items() for x in kv)
        head += packer.pack("data") + _bin_header(len(data))
        parts += [bytes(head), data]
        head.clear()
    head += packer.pack("prompts") + packer.pack(list(prompts)) + packer.pack("metadata") + packer.pack(metadata)
    return [*parts, bytes(head)]


def _bin_header(n: int) -> bytes:
    """msgpack's bin 8/16/32 header for ``n`` bytes of payload."""
    if n < 1 << 8:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 1 << 16:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


def build_request(*args: Any, **kwargs: Any) -> bytes:
    """A request body from a uint8 NHWC batch (or a list of HWC arrays); see ``request_parts``."""
    return b"".join(request_parts(*args, **kwargs))


def parse_request(
    body: bytes | bytearray | memoryview, limits: Limits = Limits(), model=ScoreRequest
) -> ScoreRequest | VideoScoreRequest:
    """A validated request (``model``: ScoreGradRequest for /v1/score_grad; a /v1/score body with ``videos``
    gives a VideoScoreRequest); its raw image and video data are views of ``body`` (see ``protocol.zero_copy``)."""
    try:
        obj = unpack_views(body, limits.max_elements)
    except TooManyValues as exc:
        raise ProtocolError(413, "payload_too_large", str(exc), "body") from None
    except ValueError as exc:
        raise ProtocolError(400, "malformed_body", f"body is not valid msgpack: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(400, "malformed_body", f"body must be a msgpack map, got {type(obj).__name__}")
    if "videos" in obj:  # the video extension (protocol/README.md, "Video"); a body without it is as before
        if model is not ScoreRequest:
            raise ProtocolError(422, "invalid_request", f"{model.__name__} takes images only, not videos", "videos")
        model = VideoScoreRequest
    try:
        request = model.model_validate(obj, context={"limits": limits})
    except ValidationError as exc:
        raise ProtocolError.from_validation(exc) from None
    if isinstance(request, VideoScoreRequest) and request.decoded_bytes > limits.max_video_bytes:
        # declared sizes only: nothing has been decoded yet
        raise ProtocolError(
            413,
            "payload_too_large",
            f"the videos decode to {request.decoded_bytes} bytes; the limit is {limits.max_video_bytes} per request "
            "(max_video_bytes)",
            "videos",
        )
    return request


def decode_image_list(request: ScoreRequest) -> list[np.ndarray]:
    """The request's images as HWC uint8 arrays (raw ones are views of the body: no copy)."""
    first = request.images[0]
    for i, image in enumerate(request.images):
        if (image.height, image.width) != (first.height, first.width):
            raise ProtocolError(
                422,
                "invalid_request",
                f"image is {image.height}x{image.width} but images.0 is {first.height}x{first.width}; "
                "send images of one size per request",
                f"images.{i}",
            )
    return [decode_image(image, f"images.{i}") for i, image in enumerate(request.images)]


def decode_images(request: ScoreRequest) -> np.ndarray:
    """The request's images as one uint8 NHWC batch; all images in a request must share one size."""
    return np.stack(decode_image_list(request))


def parse_reply(body: bytes, expected: int | None = None, model=ScoreReply) -> ScoreReply:
    obj = unpack(body)
    try:
        reply = model.model_validate(obj)
    except ValidationError as exc:
        raise ProtocolError.from_validation(exc) from None
    if expected is not None and len(reply.scores) != expected:
        raise ProtocolError(502, "bad_reply", f"{len(reply.scores)} scores for {expected} images", "scores")
    return reply


def reply_gradients(reply: ScoreGradReply, shape: tuple[int, int]) -> np.ndarray:
    """The gradients of a /v1/score_grad reply as one float32 NHWC array (images of ``shape`` (H, W))."""
    dtype = GRADIENT_DTYPES[reply.gradient_dtype]
    out = []
    for i, data in enumerate(reply.gradients):
        if len(data) != shape[0] * shape[1] * 3 * np.dtype(dtype).itemsize:
            raise ProtocolError(
                502,
                "bad_reply",
                f"gradient {i} has {len(data)} bytes for a {shape[0]}x{shape[1]}x3 {reply.gradient_dtype} image",
                f"gradients.{i}",
            )
        out.append(np.frombuffer(data, dtype=dtype).reshape(*shape, 3))
    grads = np.stack(out).astype(np.float32)
    if not np.isfinite(grads).all():
        raise ProtocolError(502, "bad_reply", "a gradient is not finite", "gradients")
    return grads
