"""msgpack unpacking that leaves every ``bin`` payload in place, as a memoryview of the body.

msgpack-python copies each ``bin`` into a fresh ``bytes``: for a 25 MB request of raw images that is 25 MB of
newly faulted pages, most of the server's decode time (bench/protocol.py). Walking the few hundred headers
of a request in Python and slicing the body instead costs well under a millisecond; the image bytes are then
copied once, straight into the model batch.

Decodes the msgpack a server needs to read: nil, bool, int, float, str, bin, array and map (keys str or
bytes, as msgpack's ``strict_map_key``). Extension types, invalid UTF-8, duplicate map keys, truncated or
trailing bytes, nesting deeper than ``MAX_DEPTH`` and more than ``max_elements`` values in the body raise
``ValueError`` with the byte offset.

The element budget is what keeps a small body from costing a lot: every value costs a Python object, and
``b"\xdd\x00\x2d\xc6\xc0" + b"\x90" * 3_000_000`` (3 MB: an array of three million empty arrays) would cost
seconds of CPU and ~70x its size in memory. Each array or map header is checked against the budget left (and
against the bytes left, one per element at least) before anything is built, so such a body is refused at
its first header.
"""

from __future__ import annotations

import struct
from typing import Any

MAX_DEPTH = 256
MAX_ELEMENTS = 100_000  # a full request (256 images, prompts, VQA metadata) needs a few thousand

# First byte -> struct format of the value (ints, floats) or of the length (bin, str, array, map) that follows.
_CONSTANTS = {0xC0: None, 0xC2: False, 0xC3: True}
_INTS = {0xCC: ">B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">Q", 0xD0: ">b", 0xD1: ">h", 0xD2: ">i", 0xD3: ">q"}
_FLOATS = {0xCA: ">f", 0xCB: ">d"}
_LENGTHS = {  # family -> {byte: length format}
    "bin": {0xC4: ">B", 0xC5: ">H", 0xC6: ">I"},
    "str": {0xD9: ">B", 0xDA: ">H", 0xDB: ">I"},
    "array": {0xDC: ">H", 0xDD: ">I"},
    "map": {0xDE: ">H", 0xDF: ">I"},
}
_FAMILY = {byte: (family, fmt) for family, table in _LENGTHS.items() for byte, fmt in table.items()}


def unpack_views(body: bytes | bytearray | memoryview, max_elements: int = MAX_ELEMENTS) -> Any:
    """The object in ``body``, with ``bin`` values as read-only memoryviews into it (no copy)."""
    view = memoryview(body).cast("B")
    if not view.readonly:
        view = view.toreadonly()
    reader = _Reader(view, max_elements)
    obj = reader.value(0)
    if reader.pos != len(view):
        raise ValueError(f"{len(view) - reader.pos} trailing bytes after the object at offset {reader.pos}")
    return obj


class TooManyValues(ValueError):
    """The body declares more values than the budget allows (a limit, not malformed msgpack)."""


class _Reader:
    def __init__(self, view: memoryview, max_elements: int):
        self.view, self.pos = view, 0
        self.budget, self.max_elements = max_elements, max_elements

    def _claim(self, n: int, at: int) -> None:
        """Charge ``n`` values to the body's budget before any of them is built."""
        left = len(self.view) - self.pos
        if n > left:
            raise ValueError(f"truncated: the container at offset {at} declares {n} values, {left} bytes left")
        if n > self.budget:
            raise TooManyValues(
                f"too many values: the container at offset {at} declares {n}; the limit is {self.max_elements} per body"
            )
        self.budget -= n

    def _take(self, n: int) -> int:
        """Advance past ``n`` bytes; returns where they start."""
        start = self.pos
        if start + n > len(self.view):
            raise ValueError(f"truncated: {n} bytes needed at offset {start}, {len(self.view) - start} left")
        self.pos = start + n
        return start

    def _unpack(self, fmt: str) -> Any:
        return struct.unpack_from(fmt, self.view, self._take(struct.calcsize(fmt)))[0]

    def value(self, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise ValueError(f"nested deeper than {MAX_DEPTH} at offset {self.pos}")
        at = self._take(1)
        byte = self.view[at]
        if byte <= 0x7F:
            return byte
        if byte >= 0xE0:
            return byte - 0x100
        if 0x80 <= byte <= 0x8F:
            return self._map(byte & 0x0F, depth, at)
        if 0x90 <= byte <= 0x9F:
            return self._array(byte & 0x0F, depth, at)
        if 0xA0 <= byte <= 0xBF:
            return self._str(byte & 0x1F)
        if byte in _CONSTANTS:
            return _CONSTANTS[byte]
        if byte in _INTS:
            return self._unpack(_INTS[byte])
        if byte in _FLOATS:
            return self._unpack(_FLOATS[byte])
        if byte in _FAMILY:
            family, fmt = _FAMILY[byte]
            n = self._unpack(fmt)
            if family == "bin":
                start = self._take(n)
                return self.view[start : start + n]
            if family == "str":
                return self._str(n)
            if family == "array":
                return self._array(n, depth, at)
            return self._map(n, depth, at)
        raise ValueError(
            f"unsupported msgpack type byte 0x{byte:02x} at offset {at} (extension types are not accepted)"
        )

    def _str(self, n: int) -> str:
        start = self._take(n)
        try:
            return str(self.view[start : start + n], "utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"invalid UTF-8 in the string at offset {start}: {exc.reason}") from None

    def _array(self, n: int, depth: int, at: int) -> list:
        self._claim(n, at)
        return [self.value(depth + 1) for _ in range(n)]

    def _map(self, n: int, depth: int, at: int) -> dict:
        self._claim(2 * n, at)
        out = {}
        for _ in range(n):
            at = self.pos
            key = self.value(depth + 1)
            if isinstance(key, memoryview):
                key = key.tobytes()
            elif not isinstance(key, str):
                raise ValueError(f"map key at offset {at} is {type(key).__name__}; keys must be str or bytes")
            if key in out:  # msgpack-python keeps the last value; a request must not say two things
                raise ValueError(f"duplicate map key {key!r} at offset {at}")
            out[key] = self.value(depth + 1)
        return out
