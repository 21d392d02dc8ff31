"""protocol.zero_copy decodes what msgpack decodes, leaves bin payloads in the body, refuses the rest."""

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import build_request, parse_request
from protocol.zero_copy import MAX_DEPTH, unpack_views

values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
    | st.binary(max_size=70000),
    lambda children: (
        st.lists(children, max_size=20)
        | st.dictionaries(st.text(max_size=5) | st.binary(max_size=3), children, max_size=20)
    ),
    max_leaves=30,
)


def materialise(obj):
    if isinstance(obj, memoryview):
        return obj.tobytes()
    if isinstance(obj, dict):
        return {k: materialise(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [materialise(v) for v in obj]
    return obj


@settings(max_examples=300, deadline=None)
@given(obj=values)
def test_decodes_what_msgpack_decodes(obj):
    body = msgpack.packb(obj, use_bin_type=True)
    assert materialise(unpack_views(body)) == msgpack.unpackb(body, raw=False, strict_map_key=False)


def test_single_precision_floats():
    assert unpack_views(msgpack.packb([1.5, -2.25], use_single_float=True)) == [1.5, -2.25]


def test_raw_images_are_views_of_the_body_not_copies():
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    body = build_request(images, ["a", "b", "c"])
    request = parse_request(body)
    data = request.images[1].data
    assert isinstance(data, memoryview) and data.readonly and data.obj is body
    assert np.array_equal(np.frombuffer(data, np.uint8).reshape(8, 8, 3), images[1])


@pytest.mark.parametrize(
    "body, message",
    [
        (b"\x92\x01", "truncated"),
        (b"\xc6\x00\x00\x00\x10abc", "truncated"),
        (b"\x01\x02", "1 trailing bytes"),
        (b"\xd4\x01\x00", "type byte 0xd4"),  # fixext 1
        (b"\xc1", "type byte 0xc1"),  # never used
        (b"\x81\x01\x02", "keys must be str or bytes"),
        (b"\xa2\xff\xfe", "invalid UTF-8"),
        (b"\x91" * (MAX_DEPTH + 2) + b"\x00", "nested deeper"),
    ],
)
def test_refuses_with_a_reason(body, message):
    with pytest.raises(ValueError, match=message):
        unpack_views(body)


def test_an_element_heavy_body_is_refused_at_its_first_header():
    """Three million empty arrays in 3 MB: refused before a single one is built (it cost 12 s and 212 MB)."""
    from protocol.zero_copy import TooManyValues

    n = 3_000_000
    with pytest.raises(TooManyValues, match="container at offset 0 declares 3000000"):
        unpack_views(b"\xdd" + n.to_bytes(4, "big") + b"\x90" * n)


def test_the_element_budget_counts_every_value_of_the_body():
    body = msgpack.packb([[1, 2], {"a": 3}])  # 2 + 2 + 2 (a map entry is a key and a value)
    assert unpack_views(body, max_elements=6) == [[1, 2], {"a": 3}]
    with pytest.raises(ValueError, match="limit is 5 per body"):
        unpack_views(body, max_elements=5)
    # a container cannot declare more values than there are bytes left
    with pytest.raises(ValueError, match="declares 1000 values, 1 bytes left"):
        unpack_views(b"\xdc\x03\xe8\x01")


def test_duplicate_map_keys_are_refused():
    with pytest.raises(ValueError, match="duplicate map key 'a'"):
        unpack_views(b"\x82\xa1a\x01\xa1a\x02")  # {"a": 1, "a": 2}
