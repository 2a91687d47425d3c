"""Small hostile inputs stay cheap: an index of n bytes costs O(n) time and memory to open and
check, and a data payload is refused before anything in proportion to what its entry claims
is built.

Each case is the input that blew up before, at a size where the quadratic code took more than
ten times the bound asserted here (measured before the fix, in the comments), while the fix
stays far below it: the bounds are generous for a noisy two-core machine. Time is measured
with ``perf_counter`` and memory as the traced allocation peak (tracemalloc sees numpy's
buffers too), both in this process.
"""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support.builders import (
    KiB,
    MiB,
    entry_value,
    header_value,
    index_of,
    no_hang,
    partitioned_value,
    table_of_raw_blocks,
    write_checkpoint,
)

import streamckpt
from streamckpt.errors import ChecksumError, CorruptCheckpointError
from streamckpt.format.crc import crc32c, mask
from streamckpt.format.index_file import decode_index
from streamckpt.format.slices import Extent, TensorSlice, encode_slice_key
from streamckpt.format.table import BlockHandle, Footer, encode_block_trailer, encode_footer
from streamckpt.format.table_write import BlockBuilder
from streamckpt.format.varint import encode_fixed32, encode_varint

pytestmark = pytest.mark.anyio


@dataclass
class Cost:
    seconds: float = 0.0
    peak_bytes: int = 0


@pytest.fixture
def watchdog() -> Iterator[None]:
    with no_hang(120):
        yield


@pytest.fixture
def traced() -> Iterator[None]:
    tracemalloc.start()
    try:
        with no_hang(120):
            yield
    finally:
        tracemalloc.stop()


async def cost_of(
    work: Callable[[], Awaitable[Any]], expected: type[Exception], *, seconds: float
) -> Cost:
    """Time and traced peak of a call that must raise ``expected``. A run over ``seconds``
    is repeated once (a busy shared machine can stall one) and the faster counts."""
    cost = Cost(seconds=float("inf"))
    for _ in range(2):
        tracing = tracemalloc.is_tracing()
        if tracing:
            tracemalloc.reset_peak()
        start = tracemalloc.get_traced_memory()[0]
        started = time.perf_counter()
        with pytest.raises(expected):
            await work()
        cost.seconds = min(cost.seconds, time.perf_counter() - started)
        if tracing:
            cost.peak_bytes = max(cost.peak_bytes, tracemalloc.get_traced_memory()[1] - start)
        if cost.seconds < seconds:
            break
    return cost


# --- keys that each extend the previous key ------------------------------------------------


def chain_index(records: int) -> bytes:
    """One data block whose every key is the previous key plus one byte, prefix-compressed
    against it (no restart point): ~17 bytes a record spell keys of ``records**2 / 2`` bytes.

    Encoded here record by record: the block builder would compare each key byte by byte.
    """
    value = entry_value(dtype=1, shape=[0], size=0, crc=mask(0))
    header = header_value()
    raw = bytearray(encode_varint(0) + encode_varint(0) + encode_varint(len(header)) + header)
    for shared in range(records):  # key i is b"k" * (i + 1): all of key i - 1, then one byte
        raw += encode_varint(shared) + b"\x01" + encode_varint(len(value)) + b"k" + value
    raw += encode_fixed32(0) + encode_fixed32(1)  # one restart point, at the header
    return table_of_raw_blocks([bytes(raw)], [b"l"])


@pytest.mark.usefixtures("traced")
async def test_keys_that_each_extend_the_previous_one(tmp_path: Path) -> None:
    """Before: 409 KB of index took 1.27 GB RSS to open, 834 KB 4.9 GB and 13.9 s. The keys of
    the 40,000 records here spell 800 MB, which the old decoder built and kept (measured on
    it: 8,000 records, 128 KB, took 1.6 s and a 32 MB peak, both growing as the square, so
    about 40 s here). Now the keys a block spells are capped at 32x its size."""
    index = chain_index(40_000)
    assert 640 * KiB < len(index) < 720 * KiB
    prefix = write_checkpoint(tmp_path, index)

    async def decode() -> None:
        decode_index(index)

    for work in (
        decode,
        lambda: streamckpt.load(prefix),
        lambda: streamckpt.read_tensor(prefix, b"k" * 39_999),
    ):
        cost = await cost_of(work, CorruptCheckpointError, seconds=4.0)
        assert cost.seconds < 4.0, cost
        assert cost.peak_bytes < 48 * MiB, cost


@pytest.mark.usefixtures("traced")
async def test_long_names_as_tf_writes_them_still_open(tmp_path: Path) -> None:
    """The cap that refuses the chain keeps real indexes: 4,000 names of 2,000 bytes that
    share all but their last bytes (TF restarts prefix compression every 16 records)."""
    stem = b"model/" + b"x" * 1990
    payload = np.float32(1.5).tobytes()
    value = entry_value(dtype=1, shape=[], size=4, crc=mask(crc32c(payload)))
    names = [stem + f"{i:04d}".encode() for i in range(4000)]
    prefix = write_checkpoint(tmp_path, index_of(dict.fromkeys(names, value)), [payload])
    async with streamckpt.open(prefix) as ckpt:
        assert len(ckpt.entries) == 4000
    assert await streamckpt.read_tensor(prefix, names[-1]) == np.float32(1.5)


# --- an index block naming one block many times ---------------------------------------------


def repeated_block_index(block_bytes: int, handles: int) -> bytes:
    """A data block holding no record (only a restart array of ``block_bytes``), named by
    every one of ``handles`` index entries: each costs a checksum of the whole block."""
    restarts = (block_bytes - 4) // 4
    empty = bytes(4 * restarts) + encode_fixed32(restarts)
    out = bytearray(empty + encode_block_trailer(empty, 0))
    handle = BlockHandle(0, len(empty))
    metaindex = BlockHandle(len(out), 8)
    meta = BlockBuilder(16).finish()
    out += meta + encode_block_trailer(meta, 0)
    value = handle.encode()
    record_head = encode_varint(0) + encode_varint(3) + encode_varint(len(value))
    record_size = len(record_head) + 3 + len(value)
    index = b"".join(
        [
            *(record_head + i.to_bytes(3, "big") + value for i in range(handles)),
            *(encode_fixed32(i * record_size) for i in range(handles)),  # a restart each
            encode_fixed32(handles),
        ]
    )
    index_handle = BlockHandle(len(out), len(index))
    out += index + encode_block_trailer(index, 0)
    return bytes(out + encode_footer(Footer(metaindex, index_handle)))


@pytest.mark.usefixtures("traced")
async def test_an_index_block_naming_one_block_again_and_again(tmp_path: Path) -> None:
    """Before: every handle cost a checksum of the block it names, so handles x block size,
    the square of the index size. Here 200,000 handles name one 2 MB block: 400 GB to
    checksum (measured on the old code: 20,000 of them took 2.5 s, so about 25 s here).
    Data blocks must now follow one another, so they add up to the file at most.
    """
    index = repeated_block_index(2 * MiB, 200_000)
    assert len(index) < 5 * MiB
    prefix = write_checkpoint(tmp_path, index)

    async def decode() -> None:
        decode_index(index)

    for work in (decode, lambda: streamckpt.load(prefix)):
        cost = await cost_of(work, CorruptCheckpointError, seconds=2.0)
        assert cost.seconds < 2.0, cost
        assert cost.peak_bytes < 16 * MiB, cost


# --- partitioned tensors cut along two axes ------------------------------------------------


def grid_checkpoint(root: Path, name: str, rows: int, cols: int, *, with_pieces: bool) -> str:
    """A (rows, cols) float32 tensor stored as rows * cols one-element pieces."""
    directory = root / name
    directory.mkdir()
    cells = [(r, c) for r in range(rows) for c in range(cols)]
    records = {
        b"grid": partitioned_value(
            dtype=1, shape=[rows, cols], pieces=[[(r, 1), (c, 1)] for r, c in cells]
        )
    }
    shard = bytearray()
    if with_pieces:
        for r, c in cells:
            payload = np.float32(r * cols + c).tobytes()
            key = encode_slice_key(b"grid", TensorSlice((Extent(r, 1), Extent(c, 1))))
            records[key] = entry_value(
                dtype=1, shape=[1, 1], offset=len(shard), size=4, crc=mask(crc32c(payload))
            )
            shard += payload
    return write_checkpoint(directory, index_of(records), [bytes(shard)])


def index_size(prefix: str) -> int:
    return Path(prefix + ".index").stat().st_size


def sparse_string_checkpoint(directory: Path, count: int) -> str:
    """An entry claiming ``count`` strings over a zeroed shard that takes no disk."""
    value = entry_value(dtype=7, shape=[count], size=count + 4, crc=mask(0))
    prefix = write_checkpoint(directory, index_of({b"strings": value}), [b""])
    with open(prefix + ".data-00000-of-00001", "r+b") as shard:
        shard.truncate(count + 4)
    return prefix


@pytest.mark.usefixtures("watchdog")
async def test_pieces_cut_along_two_axes_are_checked_in_linear_time(tmp_path: Path) -> None:
    """Before: the pairwise overlap check took 7.9 s for a 50 KB index and 65 s for 140 KB
    (measured on it here: 4,900 pieces, 68 KB, 39 s). This one is 12,100 pieces in a 150 KB
    full entry: the check passes, then finds the first piece's entry missing. The same grid
    with its pieces then loads whole."""
    bare = grid_checkpoint(tmp_path, "bare", 110, 110, with_pieces=False)
    assert index_size(bare) > 140 * KiB
    cost = await cost_of(lambda: streamckpt.load(bare), CorruptCheckpointError, seconds=6.0)
    assert cost.seconds < 6.0, cost

    whole = grid_checkpoint(tmp_path, "whole", 110, 110, with_pieces=True)
    started = time.perf_counter()
    loaded = await streamckpt.load(whole)
    seconds = time.perf_counter() - started
    np.testing.assert_array_equal(
        loaded["grid"], np.arange(110 * 110, dtype=np.float32).reshape(110, 110)
    )
    assert seconds < 15.0, seconds


# --- many pieces: a long name, one block ---------------------------------------------------


@pytest.mark.usefixtures("traced")
async def test_a_long_name_listed_with_many_pieces(tmp_path: Path) -> None:
    """The pieces' keys are built one at a time, each looked up before the next: a 256 KB
    name with 20,000 one-element pieces would spell 5 GB of keys that the index never
    paid for. The first piece is missing, so the read stops there."""
    name = b"n" * (256 * KiB)
    count = 20_000
    value = partitioned_value(dtype=1, shape=[count], pieces=[[(i, 1)] for i in range(count)])
    prefix = write_checkpoint(tmp_path, index_of({name: value}))
    for work in (lambda: streamckpt.load(prefix), lambda: streamckpt.read_tensor(prefix, name)):
        cost = await cost_of(work, CorruptCheckpointError, seconds=15.0)
        assert cost.seconds < 15.0, cost
        assert cost.peak_bytes < 64 * MiB, cost


def one_block_pieces_checkpoint(directory: Path, count: int) -> str:
    """A partitioned tensor of ``count`` one-element pieces, every entry in one data block
    with a single restart point: finding a key in it means scanning it from the start."""
    records = {
        b"w": partitioned_value(dtype=1, shape=[count], pieces=[[(i, 1)] for i in range(count)])
    }
    shard = bytearray()
    for i in range(count):
        payload = np.float32(i).tobytes()
        key = encode_slice_key(b"w", TensorSlice((Extent(i, 1),)))
        records[key] = entry_value(
            dtype=1, shape=[1], offset=len(shard), size=4, crc=mask(crc32c(payload))
        )
        shard += payload
    builder = BlockBuilder(1 << 30)
    builder.add(b"", header_value())
    for key in sorted(records):
        builder.add(key, records[key])
    return write_checkpoint(
        directory, table_of_raw_blocks([builder.finish()], [b"x"]), [bytes(shard)]
    )


@pytest.mark.usefixtures("watchdog")
async def test_many_lookups_in_one_unrestarted_block(tmp_path: Path) -> None:
    """Before: reading a partitioned tensor lazily looked each piece up by scanning the
    block from its one restart point: pieces x block size (measured on the old code: 1,000
    pieces took 2.7 s, 3,000 pieces 16 s; the 30,000 here, a 1 MB index, would take about
    half an hour). Now more lookups than blocks load the whole index in one pass, and a
    block looked up in twice is parsed once."""
    prefix = one_block_pieces_checkpoint(tmp_path, 30_000)
    started = time.perf_counter()
    got = await streamckpt.read_tensor(prefix, "w")
    seconds = time.perf_counter() - started
    np.testing.assert_array_equal(got, np.arange(30_000, dtype=np.float32))
    assert seconds < 10.0, seconds


def big_block_and_many_small_ones(directory: Path, count: int) -> str:
    """``count`` scalars in one unrestarted block, then ``count`` more in a block each: a
    read of the first ``count`` by name looks up fewer keys than there are blocks."""
    payload = np.float32(2.5).tobytes()
    value = entry_value(dtype=1, shape=[], size=4, crc=mask(crc32c(payload)))
    big = BlockBuilder(1 << 30)
    big.add(b"", header_value())
    for i in range(count):
        big.add(b"a%06d" % i, value)
    small = []
    for i in range(count):
        block = BlockBuilder(16)
        block.add(b"z%06d" % i, value)
        small.append(block.finish())
    separators = [b"b"] + [b"z%06d" % i for i in range(count)]
    index = table_of_raw_blocks([big.finish(), *small], separators)
    return write_checkpoint(directory, index, [payload])


@pytest.mark.usefixtures("watchdog")
async def test_many_lookups_in_one_block_among_many(tmp_path: Path) -> None:
    """Fewer names than blocks are looked up one by one; when they all fall in one
    unrestarted block, each search was a scan of it (measured on the old code: 1,000 names
    took 3.5 s, 3,000 names 25 s; the 5,000 here about 70 s). The block is parsed once on
    its second lookup."""
    count = 5000
    prefix = big_block_and_many_small_ones(tmp_path, count)
    names = [b"a%06d" % i for i in range(count)]
    started = time.perf_counter()
    got = await streamckpt.load(prefix, names=names)
    seconds = time.perf_counter() - started
    assert len(got) == count and got["a000042"] == np.float32(2.5)
    assert seconds < 5.0, seconds


# --- a string tensor claiming 64 Mi elements ------------------------------------------------


@pytest.mark.usefixtures("traced")
async def test_string_claim_on_a_sparse_shard_is_refused_in_bounded_memory(
    tmp_path: Path,
) -> None:
    """Before: 64 Mi empty strings over a zeroed (sparse) 64 MiB shard reached 1.66 GB RSS
    before the length checksum refused them. Now the lengths are checksummed a chunk at a
    time: the 64 MiB read itself is the only large allocation."""
    count = 64 << 20
    prefix = sparse_string_checkpoint(tmp_path, count)
    for work in (
        lambda: streamckpt.load(prefix),
        lambda: streamckpt.read_tensor(prefix, "strings"),
    ):
        cost = await cost_of(work, ChecksumError, seconds=10.0)
        assert cost.peak_bytes < (count + 4) + 48 * MiB, cost
        assert cost.seconds < 10.0, cost
