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
  anything in proportion to that size; offsets in its errors are relative to the payload start.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from streamckpt.errors import ChecksumError, CorruptCheckpointError
from streamckpt.format.crc import crc32c, mask
from streamckpt.format.varint import decode_varint, encode_varint

__all__ = ["decode_strings", "encode_strings", "string_payload_size"]

_U32_MAX = 0xFFFFFFFF
_LENGTH_CHECKSUM_BYTES = 4


def _u32(big_endian: bool) -> struct.Struct:
    return struct.Struct(">I" if big_endian else "<I")


def _fixed_width_lengths(lengths: Sequence[int], big_endian: bool) -> bytes:
    """The bytes TF feeds to both checksums: each length as uint32, or uint64 when it must."""
    order = ">" if big_endian else "<"
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


def _read_lengths(payload: bytes | memoryview, count: int) -> tuple[list[int], int]:
    """Parse ``count`` varints from the payload start; return the lengths and the next offset."""
    head = bytes(payload[:count])
    if head.isascii():
        # Every byte below 0x80 means every varint is one byte long: the common case.
        return list(head), count
    lengths: list[int] = []
    pos = 0
    for _ in range(count):
        length, pos = decode_varint(payload, pos, max_bytes=10)
        lengths.append(length)
    return lengths, pos


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
    """
    size = len(payload)
    if count < 0:
        raise CorruptCheckpointError(f"negative string element count {count}")
    if count + _LENGTH_CHECKSUM_BYTES > size:
        # Each element takes at least one varint byte: refuse before building any list.
        raise CorruptCheckpointError(
            f"{count} strings need at least {count + _LENGTH_CHECKSUM_BYTES} bytes,"
            f" the payload has {size}"
        )
    lengths, pos = _read_lengths(payload, count)
    if pos + _LENGTH_CHECKSUM_BYTES > size:
        raise CorruptCheckpointError("string length checksum runs past the payload", offset=pos)
    length_crc = crc32c(_fixed_width_lengths(lengths, big_endian))
    stored_checksum = payload[pos : pos + _LENGTH_CHECKSUM_BYTES]
    (stored,) = _u32(big_endian).unpack(stored_checksum)
    if stored != mask(length_crc):
        raise ChecksumError(
            f"string length checksum mismatch: stored {stored:#010x},"
            f" computed {mask(length_crc):#010x}",
            offset=pos,
        )
    data_start = pos + _LENGTH_CHECKSUM_BYTES
    total = sum(lengths)
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
    for length in lengths:
        values.append(bytes(payload[at : at + length]))
        at += length
    return values
