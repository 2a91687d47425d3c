"""DT_VARIANT tensor payloads as opaque bytes per element (spec 7.4).

Each element is ``varint64 len ; len bytes ; fixed32 masked running checksum``. One running
CRC-32C is carried across all elements: it takes the length as an 8-byte little-endian
integer (not the varint, and not 4 bytes as strings do), then the element bytes, and after
its masked value is written it also takes those 4 written bytes. ``BundleEntryProto.crc32c``
is the mask of the final running CRC, which is therefore not the CRC of the payload bytes;
:func:`decode_variants` verifies it when given ``expected_crc``.

The element bytes are serialized ``VariantTensorDataProto`` messages; they are not parsed
here. TF writes variants only in the host byte order and cannot read them across byte
orders, so there is no endianness switch.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from streamckpt.errors import ChecksumError, CorruptCheckpointError
from streamckpt.format.crc import crc32c, mask
from streamckpt.format.varint import decode_varint, encode_varint

__all__ = ["decode_variants", "encode_variants", "min_variant_payload_size"]

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
# The smallest element: a one-byte varint (length 0) and its 4-byte checksum.
_MIN_ELEMENT_BYTES = 5


def min_variant_payload_size(count: int) -> int:
    """Bytes at least taken by ``count`` elements.

    Nothing follows the last element, so zero elements take zero bytes (what TF and we write
    for an empty variant tensor).
    """
    return count * _MIN_ELEMENT_BYTES


def encode_variants(values: Sequence[bytes]) -> tuple[bytes, int]:
    """Return ``(payload, entry_crc)``; ``entry_crc`` is already masked, as the index stores it."""
    parts: list[bytes] = []
    running = 0
    for value in values:
        parts.append(encode_varint(len(value)))
        running = crc32c(_U64.pack(len(value)), running)
        parts.append(value)
        running = crc32c(value, running)
        stored = _U32.pack(mask(running))
        parts.append(stored)
        running = crc32c(stored, running)
    return b"".join(parts), mask(running)


def decode_variants(
    payload: bytes | memoryview, count: int, *, expected_crc: int | None = None
) -> list[bytes]:
    """Split a DT_VARIANT payload of ``count`` elements, verifying each running checksum.

    ``expected_crc`` is the masked ``BundleEntryProto.crc32c``; when given it is verified too.
    Offsets in errors are relative to the payload start.
    """
    size = len(payload)
    if count < 0:
        raise CorruptCheckpointError(f"negative variant element count {count}")
    if min_variant_payload_size(count) > size:
        raise CorruptCheckpointError(
            f"{count} variant elements need at least {min_variant_payload_size(count)} bytes,"
            f" the payload has {size}"
        )
    values: list[bytes] = []
    running = 0
    pos = 0
    for index in range(count):
        length, body = decode_varint(payload, pos, max_bytes=10)
        if length > size - body - _U32.size:
            raise CorruptCheckpointError(
                f"variant element {index} claims {length} bytes,"
                f" {max(size - body - _U32.size, 0)} are left",
                offset=pos,
            )
        element = payload[body : body + length]
        running = crc32c(_U64.pack(length), running)
        running = crc32c(element, running)
        checksum_at = body + length
        stored_checksum = payload[checksum_at : checksum_at + _U32.size]
        (stored,) = _U32.unpack(stored_checksum)
        if stored != mask(running):
            raise ChecksumError(
                f"variant element {index} checksum mismatch: stored {stored:#010x},"
                f" computed {mask(running):#010x}",
                offset=checksum_at,
            )
        running = crc32c(stored_checksum, running)
        values.append(bytes(element))
        pos = checksum_at + _U32.size
    if pos != size:
        raise CorruptCheckpointError(
            f"{size - pos} bytes follow the last variant element", offset=pos
        )
    if expected_crc is not None and mask(running) != expected_crc:
        raise ChecksumError(
            f"variant tensor checksum mismatch: stored {expected_crc:#010x},"
            f" computed {mask(running):#010x}"
        )
    return values
