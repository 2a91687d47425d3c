"""Checkpoints built by hand, byte by byte, for tests of broken and hostile inputs.

``TableWriter`` refuses what a hostile file holds (unsorted keys, duplicate keys), so these
builders assemble tables from the block builder and the table's own trailer and footer
pieces; entry values may carry any dtype number, even ones ``DataType`` lacks. Also the
measuring tools those tests share: traced allocation peaks and a watchdog for C loops.
"""

from __future__ import annotations

import contextlib
import faulthandler
import tracemalloc
from collections.abc import Iterator, Sequence
from pathlib import Path

from streamckpt.format.bundle import BundleHeader
from streamckpt.format.table import (
    FOOTER_SIZE,
    BlockHandle,
    Footer,
    decode_block,
    decode_footer,
    decode_index_block,
    encode_block_trailer,
    encode_footer,
)
from streamckpt.format.table_write import BlockBuilder, TableWriter
from streamckpt.proto import tensor_bundle_pb2

KiB = 1 << 10
MiB = 1 << 20


def entry_value(
    *,
    dtype: int,
    shape: Sequence[int],
    shard_id: int = 0,
    offset: int = 0,
    size: int = 0,
    crc: int = 0,
) -> bytes:
    """A serialized BundleEntryProto with any dtype number, even ones DataType lacks."""
    proto = tensor_bundle_pb2.BundleEntryProto(
        dtype=dtype, shard_id=shard_id, offset=offset, size=size, crc32c=crc
    )
    proto.shape.SetInParent()
    for dim in shape:
        proto.shape.dim.add(size=dim)
    return proto.SerializeToString()


def partitioned_value(
    *, dtype: int, shape: Sequence[int], pieces: Sequence[Sequence[tuple[int, int]]]
) -> bytes:
    """The full entry of a partitioned tensor: ``pieces`` as (start, length) per axis."""
    proto = tensor_bundle_pb2.BundleEntryProto(dtype=dtype)
    proto.shape.SetInParent()
    for dim in shape:
        proto.shape.dim.add(size=dim)
    for extents in pieces:
        piece = proto.slices.add()
        for start, length in extents:
            piece.extent.add(start=start, length=length)
    return proto.SerializeToString()


def header_value(num_shards: int = 1) -> bytes:
    return BundleHeader(num_shards=num_shards).encode()


def index_of(records: dict[bytes, bytes], *, num_shards: int = 1) -> bytes:
    """A valid table holding the header and ``records`` (raw entry values)."""
    writer = TableWriter()
    writer.add(b"", header_value(num_shards))
    for key in sorted(records):
        writer.add(key, records[key])
    return writer.finish()


def table_of_blocks(
    blocks: Sequence[Sequence[tuple[bytes, bytes]]], separators: Sequence[bytes]
) -> bytes:
    """A table whose data blocks hold exactly ``blocks``, in that order, unchecked."""
    raw_blocks = []
    for records in blocks:
        builder = BlockBuilder(16)
        for key, value in records:
            builder.add(key, value)
        raw_blocks.append(builder.finish())
    return table_of_raw_blocks(raw_blocks, separators)


def table_of_raw_blocks(blocks: Sequence[bytes], separators: Sequence[bytes]) -> bytes:
    """A table of data blocks given as their bytes (records and restart array), unchecked."""
    out = bytearray()

    def put(raw: bytes) -> BlockHandle:
        handle = BlockHandle(len(out), len(raw))
        out.extend(raw + encode_block_trailer(raw, 0))
        return handle

    handles = [put(raw) for raw in blocks]
    metaindex = put(BlockBuilder(16).finish())
    index_builder = BlockBuilder(1)
    for separator, handle in zip(separators, handles, strict=True):
        index_builder.add(separator, handle.encode())
    index = put(index_builder.finish())
    out.extend(encode_footer(Footer(metaindex, index)))
    return bytes(out)


def write_checkpoint(directory: Path, index: bytes, shards: Sequence[bytes] = (b"",)) -> str:
    """``directory/ckpt.index`` and its shards; returns the prefix."""
    prefix = str(directory / "ckpt")
    Path(prefix + ".index").write_bytes(index)
    for shard_id, data in enumerate(shards):
        Path(f"{prefix}.data-{shard_id:05d}-of-{len(shards):05d}").write_bytes(data)
    return prefix


def data_block_handles(index: bytes) -> list[BlockHandle]:
    footer = decode_footer(index[-FOOTER_SIZE:], file_size=len(index))
    stored = index[footer.index.offset : footer.index.end_with_trailer]
    block = decode_block(stored, offset=footer.index.offset)
    return list(
        decode_index_block(block, index_offset=footer.index.offset, limit=len(index)).handles
    )


def flip(path: str, position: int) -> None:
    with open(path, "r+b") as f:
        f.seek(position)
        byte = f.read(1)
        f.seek(position)
        f.write(bytes((byte[0] ^ 0x40,)))


def truncate(path: str, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


# --- measuring -------------------------------------------------------------------------


def allocation_start() -> int:
    """Start measuring: what is traced now (it may hold garbage of earlier examples)."""
    tracemalloc.reset_peak()
    return tracemalloc.get_traced_memory()[0]


def allocated_since(start: int) -> int:
    """How far traced memory rose above ``start`` at its peak."""
    return tracemalloc.get_traced_memory()[1] - start


@contextlib.contextmanager
def no_hang(seconds: float) -> Iterator[None]:
    """End the whole run, with a traceback, if the block overruns.

    pytest-timeout cannot stop a C loop that holds the GIL (``min`` over a huge range, zeroing
    a huge buffer): neither its signal nor its thread gets to run. faulthandler's watchdog is a
    C thread that needs no GIL, so a regression fails loudly instead of hanging the suite.
    """
    faulthandler.dump_traceback_later(seconds, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
