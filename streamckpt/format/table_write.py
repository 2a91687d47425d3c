"""Writing a table: blocks of prefix-compressed records, TensorFlow's separators, the file.

The rules are TensorFlow's exactly (256 KiB blocks, restart interval 16 in data blocks and 1
in the index block, an empty metaindex, TF's separators, the "an oversized record closes the
current block first" rule), so that our index files match TF's byte for byte. The layouts
written here are read by :mod:`streamckpt.format.block` (one block) and
:mod:`streamckpt.format.table` (the file). Its own module: a reader never loads it.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Sequence

from streamckpt.format.table import (
    DATA_RESTART_INTERVAL,
    NO_COMPRESSION,
    SNAPPY_COMPRESSION,
    TF_BLOCK_SIZE,
    BlockHandle,
    Footer,
    encode_block_trailer,
    encode_footer,
)
from streamckpt.format.varint import encode_fixed32, encode_varint


def _common_prefix_length(a: bytes, b: bytes) -> int:
    """How many leading bytes ``a`` and ``b`` share.

    The first difference is the highest set byte of the two prefixes XORed as integers:
    C does the work, where a Python step per byte took seconds over a million keys.
    """
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    x = int.from_bytes(a[:n], "big") ^ int.from_bytes(b[:n], "big")
    return n - (x.bit_length() + 7) // 8


_ONE_BYTE = [bytes((i,)) for i in range(0x80)]


class BlockBuilder:
    """Accumulates sorted records into one block, with a restart point every N records."""

    __slots__ = ("_buf", "_counter", "_last_key", "_restart_interval", "_restarts")

    def __init__(self, restart_interval: int) -> None:
        self._restart_interval = restart_interval
        self._buf = bytearray()
        self._restarts = [0]
        self._counter = 0
        self._last_key = b""

    def add(self, key: bytes, value: bytes) -> None:
        self.fill([key], [value], 0, block_size=1 << 62, big=1 << 62)

    def fill(
        self,
        keys: Sequence[bytes],
        values: Sequence[bytes],
        start: int,
        *,
        block_size: int,
        big: int,
    ) -> int:
        """Add records from ``start`` on until the block is full; return where it stopped.

        Full: its size estimate reached ``block_size`` (the record that did it is in), or the
        next record is ``big`` and the block is not empty (TF gives such a record a fresh
        block). One loop over many records, with its state in locals, is what makes a
        million-entry index take a second rather than several.
        """
        buf = self._buf
        restarts = self._restarts
        counter = self._counter
        last = self._last_key
        interval = self._restart_interval
        one = _ONE_BYTE
        from_bytes = int.from_bytes
        i = start
        end = len(keys)
        while i < end:
            key = keys[i]
            value = values[i]
            if buf and len(key) + len(value) >= big:
                break
            if counter < interval:  # _common_prefix_length, inlined
                shared = len(last) if len(last) < len(key) else len(key)
                if last[:shared] != key[:shared]:
                    x = from_bytes(last[:shared], "big") ^ from_bytes(key[:shared], "big")
                    shared -= (x.bit_length() + 7) // 8
            else:
                restarts.append(len(buf))
                counter = 0
                shared = 0
            rest = len(key) - shared
            buf += one[shared] if shared < 0x80 else encode_varint(shared)
            buf += one[rest] if rest < 0x80 else encode_varint(rest)
            buf += one[len(value)] if len(value) < 0x80 else encode_varint(len(value))
            buf += key[shared:]
            buf += value
            last = key
            counter += 1
            i += 1
            if len(buf) + 4 * len(restarts) + 4 >= block_size:
                break
        self._counter = counter
        self._last_key = last
        return i

    def size_estimate(self) -> int:
        """Size of the finished block as TF's writer estimates it (decides where blocks end)."""
        return len(self._buf) + 4 * len(self._restarts) + 4

    @property
    def empty(self) -> bool:
        return not self._buf

    def finish(self) -> bytes:
        out = self._buf
        for restart in self._restarts:
            out += encode_fixed32(restart)
        out += encode_fixed32(len(self._restarts))
        return bytes(out)


def shortest_separator(start: bytes, limit: bytes) -> bytes:
    """A short key ``k`` with ``start <= k < limit``, chosen exactly as TF's writer does."""
    n = min(len(start), len(limit))
    i = 0
    while i < n and start[i] == limit[i]:
        i += 1
    if i >= n:
        return start  # one is a prefix of the other
    byte = start[i]
    if byte < 0xFF and byte + 1 < limit[i]:
        return start[:i] + bytes((byte + 1,))
    return start


def short_successor(key: bytes) -> bytes:
    """A short key ``>= key``: bump the first byte that is not 0xFF and cut the rest."""
    for i, byte in enumerate(key):
        if byte != 0xFF:
            return key[:i] + bytes((byte + 1,))
    return key


class TableWriter:
    """Builds a whole table in memory from keys added in strictly increasing order.

    An index of even a million tensors is tens of MiB at most, so building it in memory and
    handing it to the storage layer as one atomic write is the simple, right shape.
    """

    def __init__(
        self,
        *,
        block_size: int = TF_BLOCK_SIZE,
        restart_interval: int = DATA_RESTART_INTERVAL,
        snappy: bool = False,
    ) -> None:
        self._block_size = block_size
        self._restart_interval = restart_interval
        self._snappy = snappy
        self._out = bytearray()
        self._data_block = BlockBuilder(restart_interval)
        self._index_block = BlockBuilder(1)
        self._last_key: bytes | None = None
        self._pending_handle: BlockHandle | None = None
        self._finished = False

    def add(self, key: bytes, value: bytes) -> None:
        self.add_many([key], [value])

    def add_many(self, keys: Sequence[bytes], values: Sequence[bytes]) -> None:
        """Add records in strictly increasing key order, block by block."""
        if self._finished:
            raise RuntimeError("table already finished")
        if len(keys) != len(values):
            raise ValueError("as many values as keys")
        if not keys:
            return
        if self._last_key is not None and keys[0] <= self._last_key:
            raise ValueError(
                f"keys must be strictly increasing: {keys[0]!r} after {self._last_key!r}"
            )
        if not all(map(operator.lt, keys, itertools.islice(keys, 1, None))):
            at = next(i for i in range(1, len(keys)) if not keys[i - 1] < keys[i])
            raise ValueError(
                f"keys must be strictly increasing: {keys[at]!r} after {keys[at - 1]!r}"
            )
        big = 2 * self._block_size
        i = 0
        while i < len(keys):
            if self._pending_handle is not None:
                assert self._last_key is not None
                self._index_block.add(
                    shortest_separator(self._last_key, keys[i]), self._pending_handle.encode()
                )
                self._pending_handle = None
            stop = self._data_block.fill(keys, values, i, block_size=self._block_size, big=big)
            if stop == i:  # a big record and a block with records: it gets a block of its own
                self._flush_data_block()
                continue
            self._last_key = keys[stop - 1]
            if self._data_block.size_estimate() >= self._block_size:
                self._flush_data_block()
            i = stop

    def _flush_data_block(self) -> None:
        self._pending_handle = self._write_block(self._data_block.finish(), self._snappy)
        self._data_block = BlockBuilder(self._restart_interval)

    def _write_block(self, raw: bytes, snappy: bool) -> BlockHandle:
        stored, compression = raw, NO_COMPRESSION
        if snappy:
            import cramjam

            packed = bytes(cramjam.snappy.compress_raw(raw))
            if len(packed) < len(raw) - len(raw) // 8:  # keep only if it saves 1/8, as TF would
                stored, compression = packed, SNAPPY_COMPRESSION
        handle = BlockHandle(len(self._out), len(stored))
        self._out += stored
        self._out += encode_block_trailer(stored, compression)
        return handle

    def finish(self) -> bytes:
        """Close the last block, write metaindex, index and footer; return the whole file."""
        if self._finished:
            raise RuntimeError("table already finished")
        self._finished = True
        if not self._data_block.empty:
            self._flush_data_block()
        metaindex = self._write_block(BlockBuilder(self._restart_interval).finish(), False)
        if self._pending_handle is not None:
            assert self._last_key is not None
            self._index_block.add(short_successor(self._last_key), self._pending_handle.encode())
        index = self._write_block(self._index_block.finish(), self._snappy)
        self._out += encode_footer(Footer(metaindex, index))
        return bytes(self._out)
