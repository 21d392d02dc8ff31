"""The wire contract alone: encodings round-trip, every rule rejects with its field, garbage never crashes."""

from __future__ import annotations

import io
import sys

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from protocol import Limits, ProtocolError, build_request, decode_images, pack, parse_reply, parse_request

images_strategy = st.integers(1, 4).flatmap(
    lambda n: st.tuples(st.integers(1, 24), st.integers(1, 24)).flatmap(
        lambda hw: arrays(np.uint8, (n, hw[0], hw[1], 3))
    )
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(images=images_strategy, encoding=st.sampled_from(["raw", "png"]), text=st.text(max_size=30))
def test_lossless_round_trip(images, encoding, text):
    prompts = [text] * len(images)
    metadata = [{"i": i, "tags": [text], "nested": {"x": 1.5}} for i in range(len(images))]
    request = parse_request(build_request(images, prompts, metadata, "rid", encoding))
    assert request.request_id == "rid" and request.prompts == prompts and request.metadata == metadata
    np.testing.assert_array_equal(decode_images(request), images)


@settings(max_examples=30, deadline=None)
@given(images=images_strategy)
def test_jpeg_round_trip_is_what_pil_decodes(images):
    decoded = decode_images(parse_request(build_request(images, ["p"] * len(images), encoding="jpeg")))
    for original, got in zip(images, decoded):
        buf = io.BytesIO()
        Image.fromarray(original).save(buf, format="JPEG", quality=95)
        np.testing.assert_array_equal(got, np.asarray(Image.open(buf).convert("RGB")))


def _request(**overrides):
    body = {
        "version": 1,
        "request_id": "r",
        "images": [{"height": 2, "width": 2, "channels": 3, "encoding": "raw", "data": bytes(12)}],
        "prompts": ["a"],
        "metadata": [{}],
    }
    body.update(overrides)
    return body


def _image(**overrides):
    image = {"height": 2, "width": 2, "channels": 3, "encoding": "raw", "data": bytes(12)}
    image.update(overrides)
    return image


@pytest.mark.parametrize(
    "body, status, field",
    [
        (_request(version=2), 422, "version"),
        (_request(request_id=None), 422, "request_id"),
        (_request(images=[]), 422, "images"),
        (_request(prompts=["a", "b"]), 422, "prompts"),
        (_request(metadata=[]), 422, "metadata"),
        (_request(images=[_image(data=bytes(11))]), 422, "images.0.data"),
        (_request(images=[_image(encoding="gif")]), 422, "images.0.encoding"),
        (_request(images=[_image(channels=4, data=bytes(16))]), 422, "images.0.channels"),
        (_request(images=[_image(height=0)]), 422, "images.0.height"),
        # the protocol's integers are integers (True was height 1; "8" and 8.0 were taken as 8)
        (_request(images=[_image(height=True, width=4, data=bytes(12))]), 422, "images.0.height"),
        (_request(images=[_image(height="2")]), 422, "images.0.height"),
        (_request(images=[_image(width=2.0)]), 422, "images.0.width"),
        (_request(images=[_image(channels=3.0)]), 422, "images.0.channels"),
        (_request(version=True), 422, "version"),
        (_request(images=[_image(height=2000, width=2000, data=b"")]), 422, "images.0.height"),
        (_request(images=[_image()] * 3, prompts=["a"] * 3, metadata=[{}] * 3), 422, "images"),
        (_request(extra=1), 422, "extra"),
        (
            _request(images=[_image(), _image(height=1, data=bytes(6))], prompts=["a", "b"], metadata=[{}, {}]),
            422,
            "images.1",
        ),
        (_request(images=[_image(encoding="png", data=b"not a png")]), 422, "images.0"),
    ],
)
def test_every_rule_names_its_field(body, status, field):
    limits = Limits(max_images=2, max_pixels=64 * 64)
    with pytest.raises(ProtocolError) as err:
        decode_images(parse_request(pack(body), limits))
    assert (err.value.status, err.value.field) == (status, field), err.value


def test_declared_size_must_match_encoded_image():
    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(buf, format="PNG")
    with pytest.raises(ProtocolError, match="declared 2x2") as err:
        decode_images(parse_request(pack(_request(images=[_image(encoding="png", data=buf.getvalue())]))))
    assert err.value.field == "images.0"


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=200))
def test_garbage_bytes_raise_protocol_errors_only(body):
    try:
        parse_request(body)
    except ProtocolError as exc:
        assert 400 <= exc.status < 500
    else:  # a random byte string that happens to be a valid request is fine, but essentially impossible
        pass


json_like = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=5)
    | st.binary(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(obj=json_like)
def test_wrong_schema_maps_raise_protocol_errors_only(obj):
    with pytest.raises(ProtocolError) as err:
        parse_request(msgpack.packb(obj, use_bin_type=True))
    assert err.value.status in (400, 422)


def test_reply_rules():
    good = {
        "version": 1,
        "request_id": "r",
        "scores": [1.0, 2.0],
        "info": {"a": ["x", "y"]},
        "scorer": "s",
        "elapsed_ms": 1.0,
    }
    assert parse_reply(pack(good), expected=2).scores == [1.0, 2.0]
    for bad, field in [
        ({**good, "scores": [1.0, float("nan")]}, "scores.1"),
        ({**good, "info": {"a": ["x"]}}, "info.a"),
    ]:
        with pytest.raises(ProtocolError) as err:
            parse_reply(pack(bad))
        assert err.value.field == field
    with pytest.raises(ProtocolError, match="1 scores for 2 images"):
        parse_reply(pack({**good, "scores": [1.0], "info": {}}), expected=2)


def test_protocol_does_not_import_torch():
    import subprocess

    code = "import sys, protocol; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def _encoded(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files_are_invalid_even_where_pil_would_pad_them(fmt, monkeypatch):
    """Some library in a scorer's process may set LOAD_TRUNCATED_IMAGES; a cut file must still be refused,
    not scored as the grey PIL makes up for the missing part."""
    from PIL import ImageFile

    from protocol import decode_image
    from protocol.schema import Image as WireImage

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    array = np.random.default_rng(0).integers(0, 256, (32, 24, 3), dtype=np.uint8)
    data = _encoded(array, fmt)
    whole = decode_image(WireImage(height=32, width=24, encoding=fmt.lower(), data=data), "images.0")
    assert whole.shape == (32, 24, 3)
    for cut in (len(data) // 2, 20):
        with pytest.raises(ProtocolError) as err:
            decode_image(WireImage(height=32, width=24, encoding=fmt.lower(), data=data[:-cut]), "images.0")
        assert (err.value.status, err.value.code, err.value.field) == (422, "invalid_image", "images.0")


def test_declared_height_and_width_are_checked_not_just_their_product():
    from protocol import decode_image
    from protocol.schema import Image as WireImage

    data = _encoded(np.zeros((32, 24, 3), np.uint8), "PNG")  # 24 wide, 32 high
    with pytest.raises(ProtocolError, match="image is 24x32 .* declared 32x24") as err:
        decode_image(WireImage(height=24, width=32, encoding="png", data=data), "images.0")
    assert err.value.status == 422 and err.value.code == "invalid_image"


def test_requests_carry_the_protocol_version_constant(monkeypatch):
    import protocol.codec

    monkeypatch.setattr(protocol.codec, "VERSION", 7)
    assert msgpack.unpackb(build_request(np.zeros((1, 2, 2, 3), np.uint8), ["a"]))["version"] == 7


@pytest.mark.parametrize(
    "scores, info, message",
    [
        ([1.0, float("nan")], {}, "scores.1: score nan is not finite"),
        ([1.0], {}, "scores: 1 scores for 2 images"),
        ([1.0, 2.0], {"answer": ["only one"]}, "info.answer: has 1 entries for 2 images"),
        ([1.0, 2.0], {"answer": "ab"}, "info.answer: must be a list"),
        (None, {}, "scores: not a sequence"),
    ],
)
def test_scorer_output_is_checked_by_one_function(scores, info, message):
    from protocol import check_scores

    with pytest.raises(ValueError, match=message):
        check_scores(scores, info, 2)
    assert check_scores(np.array([1.0, 2.0]), {"n": np.array([1, 2])}, 2) == ([1.0, 2.0], {"n": [1, 2]})
