"""BundleEntryProto bytes written and read by hand: one entry, or many at once as columns.

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

Reading mirrors it: :func:`entry_fields` walks one entry (anything unusual is left to
protobuf), :func:`entry_columns` reads a block's worth of entries spelled as above at once
in numpy (anything else is left to :func:`entry_fields`). Neither raises: they return what
they read or say they did not, and ``bundle.decode_entry`` judges (``test_bundle.py``,
``test_bulk_decode.py``).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from streamckpt.errors import CorruptCheckpointError
from streamckpt.format.record import Record
from streamckpt.format.varint import decode_varint, encode_varint

if TYPE_CHECKING:
    from numpy.typing import NDArray

__all__ = [
    "EntryColumns",
    "EntryFields",
    "entry_columns",
    "entry_fields",
    "entry_head",
    "entry_tail",
    "entry_tails",
    "slice_field",
    "spell_entries",
]

_FIXED32 = struct.Struct("<I")
_SHARD_ID, _OFFSET, _SIZE, _CRC32C = 0x18, 0x20, 0x28, 0x35
_MAX_TAIL = 3 * (1 + 10) + 5
_MAX_COLUMN_RANK = 8
_set = object.__setattr__
_HIGH_BITS = np.uint64(0x8080808080808080)
_LOW_BITS = np.uint64(0x7F7F7F7F7F7F7F7F)
_PACK_STEPS = tuple(  # join neighbouring groups: 7 bits in 8, 14 in 16, 28 in 32
    (np.uint64(low), np.uint64(low << lane), np.uint64(lane - bits))
    for low, lane, bits in (
        (0x007F007F007F007F, 8, 7),
        (0x00003FFF00003FFF, 16, 14),
        (0x000000000FFFFFFF, 32, 28),
    )
)


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


EntryFields = tuple[int, tuple[int, ...], int, int, int, int]


def entry_fields(raw: bytes) -> EntryFields | None:
    """Decode the entries TF and we write (fields 1-6, dims with sizes only) without protobuf.

    A plain Python walk over a few dozen bytes is several times faster than building a proto
    message, which matters for indexes of 100,000 tensors. Anything else (slices, dimension
    names, unknown fields, odd encodings, values protobuf would read as negative, malformed
    bytes) returns None and goes through protobuf, so that the two paths never disagree and
    protobuf alone judges what is malformed. Every position is checked against the end of the
    enclosing field before it is read.
    """
    try:
        return _walk_fields(raw)
    except CorruptCheckpointError:  # a varint running past the bytes: protobuf decides
        return None


def _walk_fields(raw: bytes) -> EntryFields | None:
    dtype = shard = offset = size = crc = 0
    shape: list[int] = []
    pos, end = 0, len(raw)
    while pos < end:
        tag = raw[pos]
        pos += 1
        if tag in (0x08, 0x18, 0x20, 0x28):  # varint fields 1, 3, 4, 5
            if pos < end and raw[pos] < 0x80:  # one byte: most dtypes, shards, small sizes
                number = raw[pos]
                pos += 1
            else:
                number, pos = decode_varint(raw, pos)
            if tag == 0x08:
                if number >= 1 << 31:
                    return None  # an enum protobuf reads as negative
                dtype = number
            elif tag == 0x18:
                if number >= 1 << 31:
                    return None  # a negative int32: let protobuf and the checks say so
                shard = number
            elif number >= 1 << 63:
                return None  # a negative int64
            elif tag == 0x20:
                offset = number
            else:
                size = number
        elif tag == 0x35:  # fixed32 field 6
            if pos + 4 > end:
                return None
            crc = int.from_bytes(raw[pos : pos + 4], "little")
            pos += 4
        elif tag == 0x12:  # field 2, the shape
            length, pos = decode_varint(raw, pos)
            stop = pos + length
            if stop > end:
                return None
            while pos < stop:
                if raw[pos] != 0x12:  # only `dim` entries
                    return None
                if pos + 1 < stop and raw[pos + 1] < 0x80:  # a dim's length: one byte
                    dim_length, pos = raw[pos + 1], pos + 2
                else:
                    dim_length, pos = decode_varint(raw, pos + 1)
                dim_stop = pos + dim_length
                if dim_stop > stop:
                    return None  # a dim running past its shape (`12 02 12 05`)
                dim = 0
                while pos < dim_stop:
                    if raw[pos] != 0x08:  # only `size`
                        return None
                    if pos + 1 < dim_stop and raw[pos + 1] < 0x80:
                        dim, pos = raw[pos + 1], pos + 2
                    else:
                        dim, pos = decode_varint(raw, pos + 1)
                if pos != dim_stop or dim >= 1 << 63:
                    return None
                shape.append(dim)
            if pos != stop:
                return None
        else:
            return None
    return dtype, tuple(shape), shard, offset, size, crc


class EntryColumns(Record):
    """The fields of many entries, one numpy row each (see :func:`entry_columns`).

    ``usual[i]`` says whether row ``i`` was read at all; the other columns of a row that was
    not hold nothing meaningful. ``dims[i, :rank[i]]`` is the shape, and the row's other
    dims are 1, so that its product is the number of elements.
    """

    __slots__ = ("crc32c", "dims", "dtype", "offset", "rank", "shard_id", "size", "usual")
    usual: NDArray[np.bool_]
    dtype: NDArray[np.int64]
    rank: NDArray[np.int64]
    dims: NDArray[np.uint64]
    shard_id: NDArray[np.uint64]
    offset: NDArray[np.uint64]
    size: NDArray[np.uint64]
    crc32c: NDArray[np.uint64]

    def __init__(
        self,
        usual: NDArray[np.bool_],
        dtype: NDArray[np.int64],
        rank: NDArray[np.int64],
        dims: NDArray[np.uint64],
        shard_id: NDArray[np.uint64],
        offset: NDArray[np.uint64],
        size: NDArray[np.uint64],
        crc32c: NDArray[np.uint64],
    ) -> None:
        _set(self, "usual", usual)
        _set(self, "dtype", dtype)
        _set(self, "rank", rank)
        _set(self, "dims", dims)
        _set(self, "shard_id", shard_id)
        _set(self, "offset", offset)
        _set(self, "size", size)
        _set(self, "crc32c", crc32c)


def entry_columns(block: bytes, starts: Sequence[int], stops: Sequence[int]) -> EntryColumns:
    """Decode the entries ``block[starts[i] : stops[i]]`` at once, as :func:`entry_fields`.

    Only the spelling of :func:`entry_head` + :func:`entry_tail` is read: a one-byte dtype,
    a shape of at most 8 dims whose length fits one byte, each dim a lone ``size``, fields 3
    to 6 each at most once and in order, varints of at most 8 bytes (below 2**56), and
    nothing after. A row in that spelling has the fields :func:`entry_fields` reads from it;
    any other row is marked not ``usual``, for the caller to hand to the scalar decoder.
    Every read position is checked against the end of its field, as there.
    """
    padded = np.zeros(len(block) + 8, dtype=np.uint8)
    padded[: len(block)] = np.frombuffer(block, dtype=np.uint8)
    # the 8 bytes from each position as one little-endian word (unaligned, read in place)
    words = np.ndarray((len(block) + 1,), dtype="<u8", buffer=padded, strides=(1,))
    start = np.asarray(starts, dtype=np.int64)
    stop = np.asarray(stops, dtype=np.int64)
    count = len(start)

    def at(pos: NDArray[np.int64]) -> NDArray[np.uint8]:
        # only rows still usual use what is read; clipping keeps the others in the buffer
        return padded.take(pos, mode="clip")

    has = (start + 1 < stop) & (at(start) == 0x08) & (at(start + 1) < 0x80)
    dtype = np.where(has, at(start + 1), 0).astype(np.int64)
    pos = start + 2 * has
    shape_length = at(pos + 1)
    usual = (pos + 1 < stop) & (at(pos) == 0x12) & (shape_length < 0x80)
    shape_end = pos + 2 + shape_length
    usual &= shape_end <= stop
    pos = pos + 2
    rank = np.zeros(count, dtype=np.int64)
    dims = np.ones((count, _MAX_COLUMN_RANK), dtype=np.uint64)
    for axis in range(_MAX_COLUMN_RANK + 1):
        live = usual & (pos < shape_end)
        if not live.any():
            break
        if axis == _MAX_COLUMN_RANK:
            usual &= ~live  # more dims than the columns hold
            break
        dim_length = at(pos + 1)
        dim_end = pos + 2 + dim_length
        dim, end, read = _varints(words, pos + 3, dim_end)
        empty = dim_length == 0  # `12 00`: a dim of size 0
        good = (at(pos) == 0x12) & (dim_length < 0x80) & (dim_end <= shape_end)
        good &= empty | ((at(pos + 2) == 0x08) & read & (end == dim_end))
        usual &= ~live | good
        dims[:, axis] = np.where(live, np.where(empty, 0, dim), 1)
        rank += live
        pos = np.where(live, dim_end, pos)
    usual &= pos == shape_end
    tail = []
    for tag in (_SHARD_ID, _OFFSET, _SIZE):
        has = usual & (pos < stop) & (at(pos) == tag)
        value, end, read = _varints(words, pos + 1, stop)
        usual &= ~has | read
        tail.append(np.where(has, value, np.uint64(0)))
        pos = np.where(has, end, pos)
    has = usual & (pos + 5 <= stop) & (at(pos) == _CRC32C)
    crc = words.take(pos + 1, mode="clip") & np.uint64(0xFFFFFFFF)
    usual &= pos + 5 * has == stop
    return EntryColumns(
        usual=usual,
        dtype=dtype,
        rank=rank,
        dims=dims,
        shard_id=tail[0],
        offset=tail[1],
        size=tail[2],
        crc32c=np.where(has, crc, np.uint64(0)),
    )


def _varints(
    words: NDArray[np.uint64], pos: NDArray[np.int64], stop: NDArray[np.int64]
) -> tuple[NDArray[np.uint64], NDArray[np.int64], NDArray[np.bool_]]:
    """The varint at each ``pos`` that ends before its ``stop``: ``(values, ends, read)``.

    ``words[p]`` holds the 8 bytes from ``p``. ``read`` is False where no varint ends within
    8 bytes and before ``stop``: longer ones are left to the scalar decoder.
    """
    word = words.take(pos, mode="clip")
    ends = ~word & _HIGH_BITS  # the high bit of each byte that can end a varint
    first = ends & (~ends + np.uint64(1))  # the lowest: 1 << (8 * length - 1), or 0
    length = (np.bitwise_count(first - np.uint64(1)).astype(np.int64) + 1) // 8
    read = (first != 0) & (pos + length <= stop)
    value = word & ((first << np.uint64(1)) - np.uint64(1)) & _LOW_BITS
    for low, high, shift in _PACK_STEPS:  # 7-bit groups in byte lanes, to one number
        value = (value & low) | ((value & high) >> shift)
    return value, pos + length, read
