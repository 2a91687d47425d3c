"""DT_STRING tensor payloads (spec 7.3 and 7.5).

Layout of ``n`` strings::

    varint64 len(s_0) ... varint64 len(s_{n-1})   n varints
    fixed32  L                                     masked CRC of the lengths
    bytes    s_0 ... s_{n-1}                       back to back, no separators

Invariants this module keeps:

* ``L`` and the entry checksum are computed over the lengths as *fixed-width* integers (4 bytes
  when a length fits in 32 bits, else 8), never over the varint bytes. So the entry checksum
  that ``BundleEntryProto.crc32c`` stores is **not** the CRC of the payload bytes: only a
  decoder that has parsed the lengths can verify it, hence ``expected_crc`` on
  :func:`decode_strings`.
* In a big-endian bundle the fixed-width lengths and the stored ``L`` are big-endian; the
  varints are byte-order free.
* The decoder checks every size the payload claims against ``len(payload)`` before it allocates
  anything in proportion to that size, and builds its list of values only once both checksums
  hold; offsets in its errors are relative to the payload start.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from streamckpt.errors import ChecksumError, CorruptCheckpointError
from streamckpt.format.crc import crc32c, mask
from streamckpt.format.varint import decode_varints, encode_varint

__all__ = ["decode_strings", "encode_strings", "min_string_payload_size", "string_payload_size"]

_U32_MAX = 0xFFFFFFFF
_LENGTH_CHECKSUM_BYTES = 4
# Lengths are parsed and checksummed this many at a time (a bounded buffer per chunk).
_CHUNK_ELEMENTS = 1 << 14


def min_string_payload_size(count: int) -> int:
    """Bytes at least taken by ``count`` strings: a length byte each, then the checksum."""
    return count + _LENGTH_CHECKSUM_BYTES


def _u32(big_endian: bool) -> struct.Struct:
    return struct.Struct(">I" if big_endian else "<I")


def _fixed_width_lengths(lengths: Sequence[int] | np.ndarray[Any, Any], big_endian: bool) -> bytes:
    """The bytes TF feeds to both checksums: each length as uint32, or uint64 when it must."""
    order = ">" if big_endian else "<"
    if isinstance(lengths, np.ndarray):
        if not len(lengths) or int(lengths.max()) <= _U32_MAX:
            return lengths.astype(f"{order}u4").tobytes()
        lengths = lengths.tolist()
    if not lengths or max(lengths) <= _U32_MAX:
        return struct.pack(f"{order}{len(lengths)}I", *lengths)
    return b"".join(struct.pack(f"{order}{'I' if n <= _U32_MAX else 'Q'}", n) for n in lengths)


def _varint_size(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def string_payload_size(values: Sequence[bytes]) -> int:
    """Payload size without building it, so a writer can plan offsets before encoding."""
    return _LENGTH_CHECKSUM_BYTES + sum(_varint_size(len(v)) + len(v) for v in values)


def encode_strings(values: Sequence[bytes], *, big_endian: bool = False) -> tuple[bytes, int]:
    """Return ``(payload, entry_crc)``; ``entry_crc`` is already masked, as the index stores it."""
    lengths = [len(v) for v in values]
    if all(n < 0x80 for n in lengths):
        varints = bytes(lengths)
    else:
        varints = b"".join(encode_varint(n) for n in lengths)
    length_crc = crc32c(_fixed_width_lengths(lengths, big_endian))
    stored_checksum = _u32(big_endian).pack(mask(length_crc))
    payload = b"".join([varints, stored_checksum, *values])
    data_start = len(varints) + _LENGTH_CHECKSUM_BYTES
    entry_crc = crc32c(stored_checksum, length_crc)
    entry_crc = crc32c(memoryview(payload)[data_start:], entry_crc)
    return payload, mask(entry_crc)


def _length_chunks(
    payload: bytes | memoryview, count: int
) -> Iterator[tuple[np.ndarray[Any, Any], int]]:
    """The ``count`` element lengths a chunk at a time, each with the offset after it.

    A chunk whose bytes are all below 0x80 is that many one-byte varints, the common case,
    and is yielded as a view of those bytes; others are decoded in numpy.
    """
    pos = 0
    for first in range(0, count, _CHUNK_ELEMENTS):
        wanted = min(_CHUNK_ELEMENTS, count - first)
        head = np.frombuffer(
            payload, dtype=np.uint8, count=min(wanted, len(payload) - pos), offset=pos
        )
        if len(head) == wanted and not (head & 0x80).any():
            pos += wanted
            yield head, pos
            continue
        lengths, pos = decode_varints(payload, pos, wanted)
        yield lengths, pos


def _chunk_sum(lengths: np.ndarray[Any, Any]) -> int:
    if lengths.dtype == np.uint8 or int(lengths.max()) < 1 << 40:
        return int(lengths.sum(dtype=np.uint64))  # at most 2**56 for a chunk: no overflow
    return sum(lengths.tolist())


def decode_strings(
    payload: bytes | memoryview,
    count: int,
    *,
    big_endian: bool = False,
    expected_crc: int | None = None,
) -> list[bytes]:
    """Split a DT_STRING payload of ``count`` elements, verifying the length checksum.

    ``expected_crc`` is the masked ``BundleEntryProto.crc32c``; when given it is verified here,
    because the entry checksum covers fixed-width lengths rather than the stored varints and
    so cannot be computed from the raw payload bytes alone.

    The lengths are checksummed and summed a chunk at a time, so a payload whose lengths or
    checksums are wrong is refused in memory bounded by the chunk, however many elements its
    entry claims; only a payload that passes both checksums gets its list of values.
    """
    size = len(payload)
    if count < 0:
        raise CorruptCheckpointError(f"negative string element count {count}")
    if min_string_payload_size(count) > size:
        # Each element takes at least one varint byte: refuse before reading any.
        raise CorruptCheckpointError(
            f"{count} strings need at least {min_string_payload_size(count)} bytes,"
            f" the payload has {size}"
        )
    length_crc = 0
    total = 0
    pos = 0
    for lengths, after in _length_chunks(payload, count):
        length_crc = crc32c(_fixed_width_lengths(lengths, big_endian), length_crc)
        total += _chunk_sum(lengths)
        pos = after
    if pos + _LENGTH_CHECKSUM_BYTES > size:
        raise CorruptCheckpointError("string length checksum runs past the payload", offset=pos)
    stored_checksum = payload[pos : pos + _LENGTH_CHECKSUM_BYTES]
    (stored,) = _u32(big_endian).unpack(stored_checksum)
    if stored != mask(length_crc):
        raise ChecksumError(
            f"string length checksum mismatch: stored {stored:#010x},"
            f" computed {mask(length_crc):#010x}",
            offset=pos,
        )
    data_start = pos + _LENGTH_CHECKSUM_BYTES
    if data_start + total != size:
        raise CorruptCheckpointError(
            f"string lengths sum to {total} bytes but {size - data_start} follow the length"
            " checksum",
            offset=data_start,
        )
    if expected_crc is not None:
        entry_crc = crc32c(stored_checksum, length_crc)
        entry_crc = mask(crc32c(payload[data_start:], entry_crc))
        if entry_crc != expected_crc:
            raise ChecksumError(
                f"string tensor checksum mismatch: stored {expected_crc:#010x},"
                f" computed {entry_crc:#010x}"
            )
    values: list[bytes] = []
    at = data_start
    for lengths, _ in _length_chunks(payload, count):
        for length in lengths.tolist():
            values.append(bytes(payload[at : at + length]))
            at += length
    return values
