"""decode_records' column decoder against the record-at-a-time decoder it replaced.

``reference_decode_records`` is that decoder, kept here verbatim: every index, well formed or
hostile, must decode to the same header and entries, or fail with the same error (type,
message, tensor, shard and offset). The per-record reference is ``decode_entry``, which
still reads every entry that the columns leave aside.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from support import TF_FIXTURES

from streamckpt.errors import CorruptCheckpointError, StreamCkptError, UnsupportedError
from streamckpt.format import index_file
from streamckpt.format.bundle import (
    HEADER_KEY,
    BundleEntry,
    BundleHeader,
    decode_entry,
    decode_header,
    key_to_name,
)
from streamckpt.format.crc import mask
from streamckpt.format.dtypes import DataType, is_fixed_size, itemsize
from streamckpt.format.entries import entry_columns, entry_fields
from streamckpt.format.index_file import DecodedIndex, _usual_entries, decode_records
from streamckpt.format.slices import Extent, TensorSlice
from streamckpt.format.table import (
    FOOTER_SIZE,
    TRAILER_SIZE,
    data_block_chunks,
    decode_block,
    decode_footer,
    decode_index_block,
    encode_block_trailer,
    iter_data_block,
)
from streamckpt.format.table_write import BlockBuilder, TableWriter
from streamckpt.format.varint import encode_varint
from streamckpt.proto import tensor_bundle_pb2

Blocks = list[tuple[bytes, int]]


@pytest.fixture(autouse=True, scope="module")
def columns_for_every_block() -> Iterator[None]:
    """Small blocks too go through the columns here (else only 32 records or more do)."""
    saved = index_file._MIN_COLUMN_ROWS
    index_file._MIN_COLUMN_ROWS = 1
    yield
    index_file._MIN_COLUMN_ROWS = saved


def reference_decode_records(blocks: Iterable[tuple[bytes | memoryview, int]]) -> DecodedIndex:
    """decode_records as it was before the column decoder (the parent of commit d511315)."""
    header: BundleHeader | None = None
    entries: dict[bytes, BundleEntry] = {}
    previous: bytes | None = None
    for key, value, offset in _reference_records(blocks):
        if previous is not None and key <= previous:
            raise CorruptCheckpointError(
                f"index keys are not sorted: {key[:64]!r} after {previous[:64]!r}", offset=offset
            )
        previous = key
        if key == HEADER_KEY:
            header = decode_header(value)
            continue
        if header is None:
            raise CorruptCheckpointError("index has no bundle header", offset=offset)
        try:
            entries[key] = decode_entry(value, num_shards=header.num_shards)
        except (CorruptCheckpointError, UnsupportedError) as exc:
            raise exc.with_context(tensor=key_to_name(key), offset=offset) from None
    if header is None:
        raise CorruptCheckpointError("index has no bundle header")
    return DecodedIndex(header, entries)


def _reference_records(
    blocks: Iterable[tuple[bytes | memoryview, int]],
) -> Iterator[tuple[bytes, memoryview, int]]:
    for stored, offset in blocks:
        block = decode_block(stored, offset=offset)
        for key, value in iter_data_block(block, offset=offset):
            yield key, value, offset


def outcome(decoder: Callable[[Blocks], DecodedIndex], blocks: Blocks) -> tuple[Any, ...]:
    try:
        decoded = decoder(blocks)
    except StreamCkptError as exc:
        return ("error", type(exc), str(exc), exc.tensor, exc.shard, exc.offset)
    return ("decoded", decoded.header, list(decoded.entries.items()))


def assert_same(blocks: Blocks) -> tuple[Any, ...]:
    expected = outcome(reference_decode_records, blocks)
    assert outcome(decode_records, blocks) == expected
    return expected


def data_blocks(index: bytes) -> Blocks:
    footer = decode_footer(index[-FOOTER_SIZE:], file_size=len(index))
    handle = footer.index
    block = decode_block(index[handle.offset : handle.end_with_trailer], offset=handle.offset)
    handles = decode_index_block(block, index_offset=handle.offset, limit=len(index)).handles
    return [(index[h.offset : h.end_with_trailer], h.offset) for h in handles]


def index_of(values: list[bytes], *, num_shards: int, block_size: int = 1024) -> bytes:
    writer = TableWriter(block_size=block_size)
    writer.add(HEADER_KEY, BundleHeader(num_shards=num_shards).encode())
    writer.add_many([f"t/{i:05d}".encode() for i in range(len(values))], values)
    return writer.finish()


# --- entries as TF and we spell them, and as nobody does ------------------------------------

INT63 = (1 << 63) - 1
big = st.one_of(
    st.sampled_from([0, 1, 127, 128, 16383, 16384, (1 << 32) - 1, 1 << 35, 1 << 56, INT63]),
    st.integers(0, INT63),
)
small_dims = st.lists(st.integers(0, 300), max_size=4)
any_dims = st.lists(st.one_of(st.integers(0, 3), big), max_size=10)
dtypes = st.sampled_from(list(DataType))


@st.composite
def entry_values(draw: st.DrawFn, num_shards: int) -> bytes:
    """An entry's bytes: mostly valid ones, some of them odd, some broken."""
    dtype = draw(dtypes)
    shape = tuple(draw(st.one_of(small_dims, small_dims, any_dims)))
    count = math.prod(shape)
    fixed = dtype not in (DataType.DT_INVALID, DataType.DT_RESOURCE) and is_fixed_size(dtype)
    fitting = count * itemsize(dtype) if fixed else count + 4
    size = draw(st.one_of(st.just(min(fitting, INT63)), st.just(min(count * 5, INT63)), big))
    entry = BundleEntry(
        dtype=dtype,
        shape=shape,
        shard_id=draw(st.one_of(st.integers(0, num_shards), st.integers(0, (1 << 31) - 1))),
        offset=draw(st.one_of(st.integers(0, 1 << 30), big)),
        size=size,
        crc32c=draw(st.one_of(st.just(0), st.integers(0, (1 << 32) - 1))),
    )
    kind = draw(st.integers(0, 9))
    if kind == 0:  # a partitioned tensor's full entry
        pieces = draw(st.lists(st.just(tuple(Extent(0, None) for _ in shape)), max_size=2))
        entry = BundleEntry(dtype, shape, slices=tuple(TensorSlice(p) for p in pieces))
    if kind == 1:  # unknown rank
        proto = tensor_bundle_pb2.BundleEntryProto()
        proto.ParseFromString(entry.encode_proto())
        proto.shape.unknown_rank = True
        return proto.SerializeToString()
    raw = entry.encode() if kind != 2 else entry.encode_proto()
    if kind == 3:  # cut, or something appended
        cut = draw(st.integers(0, len(raw)))
        return raw[:cut] + draw(st.binary(max_size=4))
    if kind == 4:  # a byte changed
        at = draw(st.integers(0, max(0, len(raw) - 1)))
        return raw[:at] + bytes([draw(st.integers(0, 255))]) + raw[at + 1 :]
    if kind == 5:  # a field again (protobuf: the last one wins; shapes merge)
        return raw + draw(st.sampled_from([b"\x08\x01", b"\x18\x00", b"\x28\x04", b"\x12\x00"]))
    if kind == 6:  # a varint spelled longer than it needs
        return raw.replace(b"\x28", b"\x28\x80", 1) if b"\x28" in raw else raw
    return raw


@st.composite
def indexes(draw: st.DrawFn) -> Blocks:
    num_shards = draw(st.integers(0, 4))
    values = draw(st.lists(entry_values(num_shards), max_size=40))
    block_size = draw(st.sampled_from([64, 256, 4096]))
    return data_blocks(index_of(values, num_shards=num_shards, block_size=block_size))


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blocks=indexes())
def test_random_indexes_decode_as_before(blocks: Blocks) -> None:
    assert_same(blocks)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), num_shards=st.integers(1, 4))
def test_valid_entries_decode_as_before(data: st.DataObject, num_shards: int) -> None:
    """Entries that all decode: the columns read them (none left to decode_entry)."""
    entries = []
    for _ in range(data.draw(st.integers(1, 30))):
        dtype = data.draw(st.sampled_from([d for d in DataType if is_fixed_size(d)][1:]))
        if dtype == DataType.DT_RESOURCE:
            continue
        shape = tuple(data.draw(st.one_of(small_dims, st.lists(st.integers(0, 1 << 20)))))
        if math.prod(d for d in shape if d) * itemsize(dtype) >= 1 << 62:
            continue
        entries.append(
            BundleEntry(
                dtype,
                shape,
                shard_id=data.draw(st.integers(0, num_shards - 1)),
                offset=data.draw(st.one_of(st.integers(0, 1 << 40), st.integers(0, 1 << 55))),
                size=math.prod(shape) * itemsize(dtype),
                crc32c=data.draw(st.integers(0, (1 << 32) - 1)),
            )
        )
    values = [entry.encode() for entry in entries]
    blocks = data_blocks(index_of(values, num_shards=num_shards))
    decoded = assert_same(blocks)
    assert decoded[0] == "decoded"
    assert [entry for _, entry in decoded[2]] == entries
    read = [e for block, offset in blocks for e in columns_read(block, offset, num_shards)]
    assert read == [e if columns_take(e) else None for e in entries]


def columns_take(entry: BundleEntry) -> bool:
    """At most 8 dims, varints of at most 8 bytes."""
    return len(entry.shape) <= 8 and max(entry.offset, entry.size, *entry.shape) < 1 << 56


def columns_read(stored: bytes, offset: int, num_shards: int) -> list[BundleEntry | None]:
    """What the columns take of a block's entries (the header record left out)."""
    block = bytes(decode_block(stored, offset=offset))
    read = []
    for keys, bounds in data_block_chunks(block, offset=offset):
        found = _usual_entries(block, bounds, num_shards)
        read += [entry for key, entry in zip(keys, found, strict=True) if key]
    return read


# --- one entry at a time: the columns read what entry_fields reads ---------------------------

pieces = st.one_of(
    st.sampled_from([b"\x08", b"\x12", b"\x18", b"\x20", b"\x28", b"\x35", b"\x00", b"\x80"]),
    st.builds(encode_varint, st.one_of(st.integers(0, 300), big)),
    st.binary(max_size=3),
)


@settings(max_examples=500, deadline=None)
@given(values=st.lists(st.lists(pieces, max_size=12).map(b"".join), min_size=1, max_size=8))
@example(values=[bytes.fromhex("12021205"), b"", b"\x08\x01\x12\x00\x35\x01\x02"])
def test_columns_read_what_entry_fields_reads(values: list[bytes]) -> None:
    block = b"".join(values)
    stops = list(np.cumsum([len(v) for v in values]))
    starts = [0, *stops[:-1]]
    columns = entry_columns(block, starts, stops)
    for i, value in enumerate(values):
        if not columns.usual[i]:
            continue
        rank = int(columns.rank[i])
        read = (
            int(columns.dtype[i]),
            tuple(int(d) for d in columns.dims[i, :rank]),
            int(columns.shard_id[i]),
            int(columns.offset[i]),
            int(columns.size[i]),
            int(columns.crc32c[i]),
        )
        assert read == entry_fields(value)


def test_columns_read_the_usual_spelling() -> None:
    entries = [
        BundleEntry(DataType.DT_FLOAT, (3, 0, 1 << 40), shard_id=3, offset=1 << 50, size=0),
        BundleEntry(DataType.DT_BFLOAT16, (), offset=0, size=2, crc32c=mask(0)),
        BundleEntry(DataType.DT_UINT2, (7,), shard_id=0, offset=12, size=7, crc32c=1),
    ]
    values = [entry.encode() for entry in entries]
    stops = list(np.cumsum([len(v) for v in values]))
    columns = entry_columns(b"".join(values), [0, *stops[:-1]], stops)
    assert columns.usual.all()
    bounds = [b for pair in zip([0, *stops[:-1]], stops, strict=True) for b in pair]
    assert _usual_entries(b"".join(values), bounds, 4) == entries


# --- hostile indexes -----------------------------------------------------------------------

GOOD = BundleEntry(DataType.DT_FLOAT, (256,), shard_id=1, offset=4096, size=1024, crc32c=7)


@pytest.mark.parametrize(
    "second",
    [
        GOOD.encode()[:-1],  # the crc cut short
        GOOD.encode()[:-5],  # no crc, and the head still the same
        GOOD.encode()[:-6],  # the size's varint cut
        GOOD.encode() + b"\x00",  # a byte too many
        GOOD.encode() + b"\x35\x01\x00\x00\x00",  # the crc twice
        GOOD.encode().replace(b"\x28\x80\x08", b"\x28\x80\x09"),  # size and shape disagree
        GOOD.encode().replace(b"\x18\x01", b"\x18\x05"),  # a shard past the bundle's
        GOOD.encode().replace(b"\x20\x80\x20", b"\x20\xff\xff\xff\xff\xff\xff\xff\xff\x7f"),
        GOOD.encode().replace(b"\x18\x01", b"\x18\x81\x80\x80\x80\x00"),  # overlong
        GOOD.encode().replace(b"\x18\x01", b"\x18\xff\xff\xff\xff\x0f"),  # a negative int32
        GOOD.encode().replace(b"\x18\x01", b"") + b"\x18\x01",  # fields out of order
    ],
)
def test_a_later_record_with_a_known_head_is_judged_in_full(second: bytes) -> None:
    """Records whose head bytes were already read once: the rest of each is still checked."""
    assert GOOD.encode()[:6] == second[:6]  # the same head
    blocks = data_blocks(index_of([GOOD.encode(), second, GOOD.encode()], num_shards=2))
    assert_same(blocks)


def test_a_broken_entry_comes_before_a_broken_record_after_it() -> None:
    """The records before a malformed one are decoded first, as one at a time."""
    index = bytearray(index_of([GOOD.encode(), b"\x08\x00", GOOD.encode()], num_shards=2))
    blocks = data_blocks(bytes(index))
    stored, offset = blocks[0]
    body = bytearray(stored[:-TRAILER_SIZE])
    body[-9] = 0xFF  # the last record's value length now runs into the restart array
    broken = bytes(body) + encode_block_trailer(bytes(body), 0)
    decoded = assert_same([(broken, offset)])
    assert decoded[0] == "error" and "dtype DT_INVALID" in decoded[2]


# --- every fixture, and mutations of them that pass the block checksums --------------------


def _corpus() -> list[bytes]:
    found = [p.read_bytes() for p in sorted(TF_FIXTURES.glob("*/*.index"))]
    values = [GOOD.encode(), BundleEntry(DataType.DT_STRING, (3,), size=12).encode()]
    return [*found, index_of(values * 40, num_shards=2, block_size=256)]


CORPUS = _corpus()


def test_every_fixture_decodes_as_before() -> None:
    for index in CORPUS:
        assert assert_same(data_blocks(index))[0] == "decoded"


def mutate(rng: random.Random, blocks: Blocks) -> Blocks:
    """Change a few bytes of a block's records and make its checksum right again."""
    out = list(blocks)
    which = rng.randrange(len(out))
    stored, offset = out[which]
    body = bytearray(stored[:-TRAILER_SIZE])
    for _ in range(rng.choice((1, 1, 2, 3))):
        if not body:
            break
        at = rng.randrange(len(body))
        kind = rng.randrange(4)
        if kind == 0:
            body[at] ^= 1 << rng.randrange(8)
        elif kind == 1:
            body[at] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        elif kind == 2:
            del body[at : at + rng.randrange(1, 4)]
        else:
            body[at:at] = rng.randbytes(rng.randrange(1, 4))
    out[which] = (bytes(body) + encode_block_trailer(bytes(body), stored[-TRAILER_SIZE]), offset)
    return out


@settings(max_examples=300, deadline=None, database=None)
@given(which=st.integers(0, len(CORPUS) - 1), seed=st.integers(0, 2**32 - 1))
def test_mutated_indexes_decode_or_fail_as_before(which: int, seed: int) -> None:
    rng = random.Random(seed)
    blocks = data_blocks(CORPUS[which])
    for _ in range(20):
        assert_same(mutate(rng, blocks))


# --- chunks of records ---------------------------------------------------------------------


def records_or_error(chunks: Callable[[], Iterable[Any]]) -> tuple[list[Any], Any]:
    got: list[Any] = []
    try:
        for chunk in chunks():
            got.append(chunk)
    except StreamCkptError as exc:
        return got, (type(exc), str(exc), exc.offset)
    return got, None


@settings(max_examples=300, deadline=None)
@given(
    records=st.lists(st.tuples(st.binary(max_size=6), st.binary(max_size=6)), max_size=30),
    rows=st.integers(1, 5),
    cut=st.integers(0, 300),
    noise=st.binary(max_size=3),
)
def test_chunks_hold_the_records_of_iter_data_block(
    records: list[tuple[bytes, bytes]], rows: int, cut: int, noise: bytes
) -> None:
    builder = BlockBuilder(4)
    for key, value in sorted(dict(records).items()):
        builder.add(key, value)
    block = builder.finish()
    block = block[:cut] + noise + block[cut:]  # often malformed
    singles, error = records_or_error(lambda: iter_data_block(block, offset=7))
    chunks, chunk_error = records_or_error(lambda: data_block_chunks(block, offset=7, rows=rows))
    assert chunk_error == error
    flat = [
        (key, block[bounds[2 * i] : bounds[2 * i + 1]])
        for keys, bounds in chunks
        for i, key in enumerate(keys)
    ]
    assert flat == [(key, bytes(value)) for key, value in singles]
    assert all(0 < len(keys) <= rows for keys, _ in chunks)


def test_a_chunk_ends_after_a_mib_of_keys() -> None:
    builder = BlockBuilder(16)
    for i in range(64):
        builder.add(b"k" * 65536 + b"%03d" % i, b"")
    block = builder.finish()
    sizes = [len(keys) for keys, _ in data_block_chunks(block, offset=0)]
    assert sum(sizes) == 64 and max(sizes) <= 17


@pytest.mark.parametrize("broken_at", [None, 1, 4095, 4096, 9000, 9990])
def test_a_block_of_many_chunks_decodes_as_before(broken_at: int | None) -> None:
    values = [
        BundleEntry(DataType.DT_INT32, (i % 7,), offset=4 * i, size=4 * (i % 7)).encode()
        for i in range(10_000)
    ]
    if broken_at is not None:
        values[broken_at] = values[broken_at][:-1]
    blocks = data_blocks(index_of(values, num_shards=1, block_size=1 << 30))
    assert len(blocks) == 1
    decoded = assert_same(blocks)
    assert decoded[0] == ("decoded" if broken_at is None else "error")
