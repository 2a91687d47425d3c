"""The immutable sorted table (LevelDB "SSTable" layout) that a bundle's .index file is.

This module holds the layout (handles, footer, block trailers) and the reading; writing, by
TensorFlow's exact rules, is :mod:`streamckpt.format.table_write`'s.

Reading is split into small pure steps so that the storage layer can fetch only what it needs:
the 48-byte footer gives the index block's handle; the index block maps separator keys to data
block handles; each block is verified (masked crc32c) and, if Snappy-compressed, inflated.
"""

from __future__ import annotations

from collections.abc import Iterator

from streamckpt.errors import ChecksumError, CorruptCheckpointError, TruncatedError
from streamckpt.format.block import (
    MAX_KEY_EXPANSION,
    iter_block,
    records_end,
    seek_block,
)
from streamckpt.format.crc import crc32c, mask
from streamckpt.format.record import Record
from streamckpt.format.varint import decode_fixed32, decode_varint, encode_fixed32, encode_varint

TF_BLOCK_SIZE = 256 * 1024
DATA_RESTART_INTERVAL = 16
FOOTER_SIZE = 48
TRAILER_SIZE = 5
MAGIC = 0xDB4775248B80FB57
_MAGIC_BYTES = MAGIC.to_bytes(8, "little")
NO_COMPRESSION = 0
SNAPPY_COMPRESSION = 1
# A Snappy block may not claim to inflate past this factor of its stored size (Snappy's real
# worst case is far lower), so a hostile length header cannot make us allocate gigabytes.
_MAX_SNAPPY_RATIO = 64
# data_block_chunks ends a chunk after this many bytes of keys
_CHUNK_KEY_BYTES = 1 << 20
_set = object.__setattr__


class BlockHandle(Record):
    """Where a block lies in the .index file: its offset and stored size without trailer."""

    __slots__ = ("offset", "size")
    offset: int
    size: int

    def __init__(self, offset: int, size: int) -> None:
        _set(self, "offset", offset)
        _set(self, "size", size)

    def encode(self) -> bytes:
        return encode_varint(self.offset) + encode_varint(self.size)

    @property
    def end_with_trailer(self) -> int:
        return self.offset + self.size + TRAILER_SIZE


def decode_handle(buf: bytes | memoryview, pos: int = 0) -> tuple[BlockHandle, int]:
    offset, pos = decode_varint(buf, pos)
    size, pos = decode_varint(buf, pos)
    return BlockHandle(offset, size), pos


class Footer(Record):
    __slots__ = ("index", "metaindex")
    metaindex: BlockHandle
    index: BlockHandle

    def __init__(self, metaindex: BlockHandle, index: BlockHandle) -> None:
        _set(self, "metaindex", metaindex)
        _set(self, "index", index)


def encode_footer(footer: Footer) -> bytes:
    handles = footer.metaindex.encode() + footer.index.encode()
    return handles + bytes(40 - len(handles)) + _MAGIC_BYTES


def decode_footer(tail: bytes | memoryview, *, file_size: int) -> Footer:
    """Parse the last 48 bytes of an index file and check its handles lie inside the file."""
    if len(tail) != FOOTER_SIZE:
        raise TruncatedError(f"index of {file_size} bytes is shorter than its 48-byte footer")
    if bytes(tail[40:]) != _MAGIC_BYTES:
        raise CorruptCheckpointError(
            "bad magic number: not a TensorFlow checkpoint index", offset=file_size - 8
        )
    footer_offset = file_size - FOOTER_SIZE
    metaindex, pos = decode_handle(tail, 0)
    index, pos = decode_handle(tail, pos)
    if pos > 40:
        raise CorruptCheckpointError("footer handles run into the magic", offset=footer_offset)
    for name, handle in (("metaindex", metaindex), ("index", index)):
        if handle.end_with_trailer > footer_offset:
            raise CorruptCheckpointError(
                f"{name} block handle points past the footer", offset=footer_offset
            )
    return Footer(metaindex, index)


def table_size_from_tail(tail: bytes | memoryview) -> int | None:
    """The size of a table file from its last bytes alone, or None when they cannot tell.

    For a backend that reads a suffix without saying the file's size. TensorFlow's writer and
    ours put the footer right after the index block, so the size is where that block ends
    plus 48. The guess is kept only if the index block's checksum holds at the position it
    implies; anything else returns None, and the caller asks the store.
    """
    try:
        footer = decode_footer(tail[-FOOTER_SIZE:], file_size=1 << 62)
    except CorruptCheckpointError:
        return None
    guess = footer.index.end_with_trailer + FOOTER_SIZE
    tail_start = guess - len(tail)
    if tail_start < 0 or footer.index.offset < tail_start:
        return None
    base = footer.index.offset - tail_start
    try:
        decode_block(memoryview(tail)[base : base + footer.index.size + TRAILER_SIZE], offset=0)
    except CorruptCheckpointError:
        return None
    return guess


def encode_block_trailer(stored: bytes, compression: int) -> bytes:
    type_byte = bytes((compression,))
    return type_byte + encode_fixed32(mask(crc32c(type_byte, crc32c(stored))))


def decode_block(stored_with_trailer: bytes | memoryview, *, offset: int) -> bytes | memoryview:
    """Verify a block's trailer crc and undo its compression. ``offset`` is for messages."""
    size = len(stored_with_trailer) - TRAILER_SIZE
    if size < 0:
        raise TruncatedError("block shorter than its trailer", offset=offset)
    view = memoryview(stored_with_trailer)
    compression = view[size]
    expected = decode_fixed32(view, size + 1)
    actual = mask(crc32c(view[size : size + 1], crc32c(view[:size])))
    if actual != expected:
        raise ChecksumError(
            f"block checksum mismatch (stored {expected:#010x}, computed {actual:#010x})",
            offset=offset,
        )
    body = view[:size]
    if compression == NO_COMPRESSION:
        return body
    if compression == SNAPPY_COMPRESSION:
        return _inflate_snappy(body, offset=offset)
    raise CorruptCheckpointError(f"unknown block compression type {compression}", offset=offset)


def _inflate_snappy(body: memoryview, *, offset: int) -> bytes:
    import cramjam  # only a snappy block needs it: TF compresses none by default (issue 15.1)

    try:
        claimed = int(cramjam.snappy.decompress_raw_len(body))
    except Exception as exc:
        raise CorruptCheckpointError(f"bad snappy block: {exc}", offset=offset) from None
    if claimed > _MAX_SNAPPY_RATIO * len(body) + 1024:
        raise CorruptCheckpointError(
            f"snappy block of {len(body)} bytes claims {claimed} bytes inflated", offset=offset
        )
    try:
        return bytes(cramjam.snappy.decompress_raw(body))
    except Exception as exc:
        raise CorruptCheckpointError(f"bad snappy block: {exc}", offset=offset) from None


class IndexBlock(Record):
    """The decoded index block: separator keys and the handles of the data blocks."""

    __slots__ = ("handles", "separators")
    separators: tuple[bytes, ...]
    handles: tuple[BlockHandle, ...]

    def __init__(self, separators: tuple[bytes, ...], handles: tuple[BlockHandle, ...]) -> None:
        _set(self, "separators", separators)
        _set(self, "handles", handles)

    def find(self, key: bytes) -> BlockHandle | None:
        """The data block that would hold ``key``: the first whose separator is >= key."""
        # bisect_left written out: ``bisect`` is a shared library loaded with dlopen, 0.3 ms
        # of a fresh process's read (issue 15.1) for a search of a few dozen keys
        separators = self.separators
        lo, hi = 0, len(separators)
        while lo < hi:
            mid = (lo + hi) // 2
            if separators[mid] < key:
                lo = mid + 1
            else:
                hi = mid
        return self.handles[lo] if lo < len(self.handles) else None

    @property
    def data_span(self) -> tuple[int, int]:
        """``(start, end)`` covering every data block with trailers (to fetch them at once)."""
        if not self.handles:
            return (0, 0)
        return (
            min(h.offset for h in self.handles),
            max(h.end_with_trailer for h in self.handles),
        )


def decode_index_block(block: bytes | memoryview, *, index_offset: int, limit: int) -> IndexBlock:
    """Parse the (already verified and inflated) index block.

    ``limit`` is the offset of the footer: every data block must end before it, and each
    must start where or after the one before it ends, so that the data blocks together are
    at most the file's size.
    """
    separators: list[bytes] = []
    handles: list[BlockHandle] = []
    previous: bytes | None = None
    blocks_end = 0
    for key, value in iter_block(block):
        if previous is not None and key <= previous:
            raise CorruptCheckpointError("index block keys are not sorted", offset=index_offset)
        handle, _ = decode_handle(value)  # TF tolerates bytes after the handle; so do we
        if handle.end_with_trailer > limit:
            raise CorruptCheckpointError(
                "data block handle points past the end of the index", offset=index_offset
            )
        if handle.offset < blocks_end:
            # Blocks are written one after another. Handles that overlap (or all name one
            # block) would make reading the index cost handles x block size.
            raise CorruptCheckpointError(
                f"data block at {handle.offset} overlaps the one before it (ends at {blocks_end})",
                offset=index_offset,
            )
        separators.append(key)
        handles.append(handle)
        previous = key
        blocks_end = handle.end_with_trailer
    return IndexBlock(tuple(separators), tuple(handles))


def iter_data_block(
    block: bytes | memoryview, *, offset: int
) -> Iterator[tuple[bytes, memoryview]]:
    """Records of a data block, with the block's offset added to any error."""
    try:
        yield from iter_block(block)
    except CorruptCheckpointError as exc:
        raise exc.with_context(offset=offset) from None


def data_block_chunks(
    block: bytes, *, offset: int, rows: int = 4096
) -> Iterator[tuple[list[bytes], list[int]]]:
    """The records of a data block in chunks of ``rows``: ``(keys, bounds)`` each.

    The value of ``keys[i]`` is ``block[bounds[2 * i] : bounds[2 * i + 1]]``: positions, not
    slices, so that a caller decoding values in place builds no object per value. Records,
    errors and their offsets are those of :func:`iter_data_block`, and in the same order: a
    malformed record is raised after the chunk of the records before it. A chunk also ends
    after about a MiB of keys, so that what a chunk holds stays small whatever the block.
    """
    try:
        end = records_end(block)
    except CorruptCheckpointError as exc:
        raise exc.with_context(offset=offset) from None
    state = (0, b"", MAX_KEY_EXPANSION * len(block))
    while state[0] < end:
        keys: list[bytes] = []
        bounds: list[int] = []
        try:
            state = _split_records(block, end, state, keys, bounds, rows)
        except CorruptCheckpointError as exc:
            if keys:
                yield keys, bounds
            raise exc.with_context(offset=offset) from None
        yield keys, bounds


def _split_records(
    block: bytes,
    end: int,
    state: tuple[int, bytes, int],
    keys: list[bytes],
    bounds: list[int],
    rows: int,
) -> tuple[int, bytes, int]:
    """One chunk of ``block._scan``'s records, in one loop with one-byte varints inline.

    ``state`` is where the chunk starts (position, previous key, key budget left); the
    state after it is returned.
    """
    pos, key, budget = state
    size = len(block)
    stop_budget = budget - _CHUNK_KEY_BYTES
    while pos < end and len(keys) < rows and budget > stop_budget:
        # each check, message and offset as in block._read_record
        shared = block[pos]
        if shared < 0x80:
            pos += 1
        else:
            shared, pos = decode_varint(block, pos, max_bytes=5)
        if pos < size and block[pos] < 0x80:
            non_shared = block[pos]
            pos += 1
        else:
            non_shared, pos = decode_varint(block, pos, max_bytes=5)
        if pos < size and block[pos] < 0x80:
            value_length = block[pos]
            pos += 1
        else:
            value_length, pos = decode_varint(block, pos, max_bytes=5)
        if shared > len(key):
            raise CorruptCheckpointError(
                f"record shares {shared} bytes with a previous key of {len(key)}", offset=pos
            )
        value_start = pos + non_shared
        value_end = value_start + value_length
        if value_end > end:
            raise CorruptCheckpointError("record runs past the end of its block", offset=pos)
        if shared + non_shared > budget:
            raise CorruptCheckpointError(
                f"the keys of a {size}-byte block spell more than"
                f" {MAX_KEY_EXPANSION * size} bytes (each extends the one before)",
                offset=pos,
            )
        key = key[:shared] + block[pos:value_start]
        budget -= len(key)
        keys.append(key)
        bounds.append(value_start)
        bounds.append(value_end)
        pos = value_end
    return pos, key, budget


def lookup_in_block(block: bytes | memoryview, key: bytes, *, offset: int) -> memoryview | None:
    """The value stored under exactly ``key`` in one data block, if any."""
    try:
        found = seek_block(block, key)
    except CorruptCheckpointError as exc:
        raise exc.with_context(offset=offset) from None
    if found is None or found[0] != key:
        return None
    return found[1]
