"""One block of an SSTable: prefix-compressed records followed by a restart array.

Layout: ``record* restart_offset[n] (fixed32 each) n (fixed32)``; a record is
``varint shared, varint non_shared, varint value_len, key_suffix, value``. Parsing checks every
length against the block before slicing, so a hostile block costs at most its own size.
Blocks are built by :class:`streamckpt.format.table_write.BlockBuilder`.
"""

from __future__ import annotations

from collections.abc import Iterator

from streamckpt.errors import CorruptCheckpointError
from streamckpt.format.varint import decode_fixed32, decode_varint

# How many bytes of keys a block may spell per byte of its own. A writer restarting prefix
# compression every 16 records (TF, LevelDB) stays under 16: a key is at most as long as the
# bytes since its restart point, and 16 keys share those bytes. Index blocks (restart every
# record) stay under 1.
MAX_KEY_EXPANSION = 32


def records_end(block: bytes | memoryview) -> int:
    """Offset where the records stop and the restart array starts; validates the array."""
    if len(block) < 4:
        raise CorruptCheckpointError(f"block of {len(block)} bytes is too short")
    num_restarts = decode_fixed32(block, len(block) - 4)
    max_restarts = (len(block) - 4) // 4
    if num_restarts > max_restarts:
        raise CorruptCheckpointError(
            f"block claims {num_restarts} restart points but has room for {max_restarts}"
        )
    return len(block) - 4 - 4 * num_restarts


def _read_record(
    block: bytes | memoryview, pos: int, end: int, prev_key: bytes, key_budget: int
) -> tuple[bytes, memoryview, int]:
    shared, pos = decode_varint(block, pos, max_bytes=5)
    non_shared, pos = decode_varint(block, pos, max_bytes=5)
    value_len, pos = decode_varint(block, pos, max_bytes=5)
    if shared > len(prev_key):
        raise CorruptCheckpointError(
            f"record shares {shared} bytes with a previous key of {len(prev_key)}", offset=pos
        )
    value_start = pos + non_shared
    value_end = value_start + value_len
    if value_end > end:
        raise CorruptCheckpointError("record runs past the end of its block", offset=pos)
    if shared + non_shared > key_budget:
        raise CorruptCheckpointError(
            f"the keys of a {len(block)}-byte block spell more than"
            f" {MAX_KEY_EXPANSION * len(block)} bytes (each extends the one before)",
            offset=pos,
        )
    key = prev_key[:shared] + bytes(block[pos:value_start])
    return key, memoryview(block)[value_start:value_end], value_end


def _scan(block: bytes | memoryview, pos: int, end: int) -> Iterator[tuple[bytes, memoryview, int]]:
    """Records from ``pos`` (a restart point) on, each with the offset after it.

    Prefix compression lets each record add one byte to the previous key, so ``n`` bytes of
    records could spell keys of ``n**2 / 2`` bytes in all. The keys rebuilt from one block may
    not exceed :data:`MAX_KEY_EXPANSION` times the block's size, which keeps a block's cost
    linear in its size; the check comes before a key is built.
    """
    budget = MAX_KEY_EXPANSION * len(block)
    key = b""
    while pos < end:
        key, value, pos = _read_record(block, pos, end, key, budget)
        budget -= len(key)
        yield key, value, pos


def iter_block(block: bytes | memoryview) -> Iterator[tuple[bytes, memoryview]]:
    """Yield every ``(key, value)`` record in block order."""
    for key, value, _ in _scan(block, 0, records_end(block)):
        yield key, value


def seek_block(block: bytes | memoryview, target: bytes) -> tuple[bytes, memoryview] | None:
    """The first record whose key is >= ``target``, or None when every key is smaller.

    Binary search over the restart points (whose records store whole keys), then a short scan.
    """
    end = records_end(block)
    num_restarts = (len(block) - 4 - end) // 4
    lo, hi = 0, num_restarts - 1
    start = 0
    while lo <= hi:
        mid = (lo + hi) // 2
        restart = decode_fixed32(block, end + 4 * mid)
        if restart >= end:
            raise CorruptCheckpointError("restart point past the records", offset=end + 4 * mid)
        key, _, _ = _read_record(block, restart, end, b"", len(block))
        if key < target:
            start = restart
            lo = mid + 1
        else:
            hi = mid - 1
    for key, value, _ in _scan(block, start, end):
        if key >= target:
            return key, value
    return None
