"""BundleEntryProto bytes written by hand: one entry, or many at once from columns.

An index of a million entries (a job of 1,024 processes) spent most of its encoding time
building protobuf messages, about 10 µs an entry. The message is small and fixed, so its
bytes are spelled here directly, exactly as protobuf serializes it (fields in number order,
proto3 zeros left out, a ``oneof`` length written even when 0, the shape always present):

====  ========  =========================================================
 1    varint    dtype
 2    message   shape: ``dim`` (2) messages of ``size`` (1)
 3    varint    shard_id
 4    varint    offset
 5    varint    size
 6    fixed32   crc32c (masked)
 7    message   slices: ``extent`` (1) messages of ``start`` (1), ``length`` (2)
====  ========  =========================================================

``tests/format/test_entries.py`` holds every function here to protobuf's own bytes.
Entries that share a dtype and shape share their head (:func:`entry_head`); what differs
between them (fields 3 to 6) is spelled for many entries at once by :func:`entry_tails`.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from streamckpt.format.varint import encode_varint

__all__ = ["entry_head", "entry_tail", "entry_tails", "slice_field", "spell_entries"]

_FIXED32 = struct.Struct("<I")
_SHARD_ID, _OFFSET, _SIZE, _CRC32C = 0x18, 0x20, 0x28, 0x35
_MAX_TAIL = 3 * (1 + 10) + 5


def _message(tag: int, body: bytes) -> bytes:
    return bytes((tag,)) + encode_varint(len(body)) + body


def entry_head(dtype: int, shape: Sequence[int]) -> bytes:
    """Fields 1 and 2: the dtype and the shape (TF always writes the shape, even ``()``)."""
    dims = b"".join(_message(0x12, b"\x08" + encode_varint(d) if d else b"") for d in shape)
    dtype_field = b"\x08" + encode_varint(dtype) if dtype else b""
    return dtype_field + _message(0x12, dims)


def entry_tail(shard_id: int, offset: int, size: int, crc32c: int) -> bytes:
    """Fields 3 to 6: where the bytes are and their checksum."""
    out = bytearray()
    if shard_id:
        out += b"\x18" + encode_varint(shard_id)
    if offset:
        out += b"\x20" + encode_varint(offset)
    if size:
        out += b"\x28" + encode_varint(size)
    if crc32c:
        out += b"\x35" + _FIXED32.pack(crc32c)
    return bytes(out)


def slice_field(extents: Sequence[tuple[int, int | None]]) -> bytes:
    """Field 7, one slice: ``(start, length)`` per axis, length None for a whole axis."""
    body = bytearray()
    for start, length in extents:
        extent = b"\x08" + encode_varint(start) if start else b""
        if length is not None:
            extent += b"\x10" + encode_varint(length)
        body += _message(0x0A, extent)
    return _message(0x3A, bytes(body))


def spell_entries(
    heads: Sequence[bytes],
    head_of: np.ndarray[Any, Any],
    shard_id: np.ndarray[Any, Any],
    offset: np.ndarray[Any, Any],
    size: np.ndarray[Any, Any],
    crc32c: np.ndarray[Any, Any],
) -> list[bytes]:
    """Many entries at once: ``heads[head_of[i]] + entry_tail(...)`` of each row's columns.

    Each row is spelled into a fixed-width byte matrix by numpy (its head copied in by one
    gather, then one varint byte position at a time over all rows) and cut to its length at
    the end: Python touches each entry once, to slice its bytes.
    """
    count = len(shard_id)
    head_width = max((len(h) for h in heads), default=0)
    width = head_width + _MAX_TAIL
    table = np.zeros((max(1, len(heads)), head_width), dtype=np.uint8)
    for i, head in enumerate(heads):
        table[i, : len(head)] = np.frombuffer(head, dtype=np.uint8)
    lengths = np.array([len(h) for h in heads] or [0], dtype=np.int64)
    rows_of = np.asarray(head_of, dtype=np.int64)
    matrix = np.zeros((count, width), dtype=np.uint8)
    matrix[:, :head_width] = table[rows_of]
    out = matrix.reshape(-1)
    pos = np.arange(count, dtype=np.int64) * width + lengths[rows_of]  # each row's next byte
    for tag, column in ((_SHARD_ID, shard_id), (_OFFSET, offset), (_SIZE, size)):
        values = np.asarray(column).astype(np.uint64)
        rows = np.flatnonzero(values)
        if not len(rows):
            continue
        values = values[rows]
        at = pos[rows]
        out[at] = tag
        at += 1
        length = np.ones(len(rows), dtype=np.int64)
        for k in range(1, 10):
            length += values >= np.uint64(1) << np.uint64(7 * k)
        for k in range(int(length.max())):
            live = length > k
            byte = (values[live] >> np.uint64(7 * k)) & np.uint64(0x7F)
            more = (length[live] > k + 1).astype(np.uint64) << np.uint64(7)
            out[at[live] + k] = (byte | more).astype(np.uint8)
        pos[rows] = at + length
    crcs = np.asarray(crc32c).astype(np.uint32)
    rows = np.flatnonzero(crcs)
    if len(rows):
        at = pos[rows]
        out[at] = _CRC32C
        for k in range(4):
            out[at + 1 + k] = ((crcs[rows] >> np.uint32(8 * k)) & np.uint32(0xFF)).astype(np.uint8)
        pos[rows] = at + 5
    raw = out.tobytes()
    starts = range(0, count * width, width)
    return [raw[start:stop] for start, stop in zip(starts, pos.tolist(), strict=True)]


def entry_tails(
    shard_id: np.ndarray[Any, Any],
    offset: np.ndarray[Any, Any],
    size: np.ndarray[Any, Any],
    crc32c: np.ndarray[Any, Any],
) -> list[bytes]:
    """``entry_tail`` of many entries at once (columns of non-negative integers)."""
    head_of = np.zeros(len(shard_id), dtype=np.int64)
    return spell_entries([b""], head_of, shard_id, offset, size, crc32c)
