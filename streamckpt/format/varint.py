"""LEB128 varints and little-endian fixed-width integers, as the index table uses them."""

from __future__ import annotations

import struct

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
    result = 0
    shift = 0
    end = len(buf)
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
