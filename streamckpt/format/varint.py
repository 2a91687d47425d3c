"""LEB128 varints and little-endian fixed-width integers, as the index table uses them."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from streamckpt.errors import CorruptCheckpointError

_FIXED32 = struct.Struct("<I")
_FIXED64 = struct.Struct("<Q")

MAX_VARINT32_BYTES = 5
MAX_VARINT64_BYTES = 10


def encode_varint(value: int) -> bytes:
    """Unsigned LEB128; ``value`` must fit in 64 bits."""
    if value < 0 or value >= 1 << 64:
        raise ValueError(f"varint out of range: {value}")
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def decode_varint(buf: bytes | memoryview, pos: int, *, max_bytes: int = 10) -> tuple[int, int]:
    """Decode one varint at ``pos``; return ``(value, next_pos)``.

    Raises CorruptCheckpointError when the varint runs past the buffer or past ``max_bytes``
    (5 for 32-bit fields, 10 for 64-bit ones), so a run of 0x80 bytes cannot loop for long.
    """
    end = len(buf)
    # one to three bytes (lengths, dtypes, dims, sizes and offsets under 2 MiB): no loop
    if pos + 2 < end and max_bytes >= 3:
        b0 = buf[pos]
        if b0 < 0x80:
            return b0, pos + 1
        b1 = buf[pos + 1]
        if b1 < 0x80:
            return (b0 & 0x7F) | (b1 << 7), pos + 2
        b2 = buf[pos + 2]
        if b2 < 0x80:
            return (b0 & 0x7F) | ((b1 & 0x7F) << 7) | (b2 << 14), pos + 3
    result = 0
    shift = 0
    for i in range(max_bytes):
        if pos + i >= end:
            raise CorruptCheckpointError("varint runs past the end of its block", offset=pos)
        byte = buf[pos + i]
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            if result >= (1 << 32 if max_bytes <= MAX_VARINT32_BYTES else 1 << 64):
                raise CorruptCheckpointError("varint overflows its width", offset=pos)
            return result, pos + i + 1
        shift += 7
    raise CorruptCheckpointError(f"varint longer than {max_bytes} bytes", offset=pos)


def decode_varints(
    buf: bytes | memoryview, pos: int, count: int
) -> tuple[np.ndarray[Any, np.dtype[np.uint64]], int]:
    """Decode ``count`` consecutive 64-bit varints at ``pos``: ``(values, next_pos)``.

    The same values and errors as ``count`` calls of :func:`decode_varint`, in numpy: a
    payload of millions of multi-byte lengths takes milliseconds, not a Python loop per
    element. Memory is a few words per byte of the ``10 * count`` bytes looked at, so callers
    pass a bounded ``count``. Anything irregular (too few varints, one too long or
    overflowing) is handed to the scalar decoder, which raises the precise error.
    """
    if count <= 0:
        return np.zeros(0, dtype=np.uint64), pos
    # lengths below 2**14 (two bytes) are the rule: look that far first, then at the most
    for span in (2 * count + MAX_VARINT64_BYTES, MAX_VARINT64_BYTES * count):
        available = min(len(buf) - pos, span)
        window = np.frombuffer(
            buf, dtype=np.uint8, count=max(available, 0), offset=min(pos, len(buf))
        )
        ends = np.flatnonzero(window < 0x80)[:count]
        if len(ends) == count:
            break
    else:
        ends = None
    if ends is not None:
        starts = np.empty(count, dtype=np.int64)
        starts[0] = 0
        starts[1:] = ends[:-1] + 1
        widths = ends - starts + 1
        longest = int(widths.max())
        last_bytes = window[ends]
        if longest < MAX_VARINT64_BYTES or (
            longest == MAX_VARINT64_BYTES and not (last_bytes[widths == longest] > 1).any()
        ):
            values = np.zeros(count, dtype=np.uint64)
            for place in range(longest):
                inside = widths > place
                picked = window[starts[inside] + place] & 0x7F
                values[inside] |= picked.astype(np.uint64) << np.uint64(7 * place)
            return values, pos + int(ends[-1]) + 1
    for _ in range(count):  # irregular: let the scalar decoder find and name the problem
        _, pos = decode_varint(buf, pos)
    raise AssertionError("unreachable: the scalar decoder accepted what numpy refused")


def encode_fixed32(value: int) -> bytes:
    return _FIXED32.pack(value)


def encode_fixed64(value: int) -> bytes:
    return _FIXED64.pack(value)


def decode_fixed32(buf: bytes | memoryview, pos: int) -> int:
    if pos < 0 or pos + 4 > len(buf):
        raise CorruptCheckpointError("fixed32 runs past the end of its block", offset=pos)
    value: int = _FIXED32.unpack_from(buf, pos)[0]
    return value


def decode_fixed64(buf: bytes | memoryview, pos: int) -> int:
    if pos < 0 or pos + 8 > len(buf):
        raise CorruptCheckpointError("fixed64 runs past the end of its block", offset=pos)
    value: int = _FIXED64.unpack_from(buf, pos)[0]
    return value
