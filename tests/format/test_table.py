"""SSTable pieces: varints, masked crc, blocks, separators, whole tables (incl. Snappy)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamckpt.errors import ChecksumError, CorruptCheckpointError, StreamCkptError
from streamckpt.format.block import MAX_KEY_EXPANSION, iter_block, seek_block
from streamckpt.format.crc import crc32c, mask, unmask
from streamckpt.format.table import (
    FOOTER_SIZE,
    BlockHandle,
    IndexBlock,
    decode_block,
    decode_footer,
    decode_index_block,
    table_size_from_tail,
)
from streamckpt.format.table_write import (
    BlockBuilder,
    TableWriter,
    short_successor,
    shortest_separator,
)
from streamckpt.format.varint import decode_varint, decode_varints, encode_fixed32, encode_varint


def read_table(data: bytes) -> list[tuple[bytes, bytes]]:
    footer = decode_footer(data[-FOOTER_SIZE:], file_size=len(data))
    h = footer.index
    index = decode_index_block(
        decode_block(data[h.offset : h.end_with_trailer], offset=h.offset),
        index_offset=h.offset,
        limit=len(data) - FOOTER_SIZE,
    )
    out = []
    for handle in index.handles:
        block = decode_block(data[handle.offset : handle.end_with_trailer], offset=handle.offset)
        out.extend((k, bytes(v)) for k, v in iter_block(block))
    return out


def test_crc_check_values() -> None:
    assert crc32c(b"123456789") == 0xE3069283
    assert mask(0) == 0xA282EAD8
    assert mask(crc32c(b"123456789")) == 0xC78AB0E5
    assert crc32c(b"56789", crc32c(b"1234")) == 0xE3069283


@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_mask_inverts(value: int) -> None:
    assert unmask(mask(value)) == value


@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_varint_round_trip(value: int) -> None:
    encoded = encode_varint(value)
    assert decode_varint(encoded, 0) == (value, len(encoded))
    assert len(encoded) == max(1, (value.bit_length() + 6) // 7)


def test_varint_rejects_overlong_and_truncated() -> None:
    with pytest.raises(CorruptCheckpointError):
        decode_varint(b"\x80" * 11, 0)
    with pytest.raises(CorruptCheckpointError):
        decode_varint(b"\x80\x80", 0)
    with pytest.raises(CorruptCheckpointError):
        decode_varint(encode_varint(2**32), 0, max_bytes=5)


def test_separators_match_tf_examples() -> None:
    assert shortest_separator(b"b_small", b"hxxx") == b"c"
    assert shortest_separator(b"d1eedf05", b"d1ef") == b"d1eedf05"
    assert shortest_separator(b"abc", b"abcd") == b"abc"
    assert short_successor(b"s") == b"t"
    assert short_successor(b"uint8") == b"v"
    assert short_successor(b"z_small") == b"{"
    assert short_successor(b"\xff\xfe-not-utf8") == b"\xff\xff"
    assert short_successor(b"\xff\xff") == b"\xff\xff"


@given(st.binary(max_size=12), st.binary(max_size=12))
def test_separator_lies_between(a: bytes, b: bytes) -> None:
    start, limit = min(a, b), max(a, b)
    if start == limit:
        return
    sep = shortest_separator(start, limit)
    assert start <= sep < limit
    assert short_successor(start) >= start


def test_empty_block_is_eight_bytes() -> None:
    assert BlockBuilder(16).finish() == bytes.fromhex("0000000001000000")


keys = st.lists(st.binary(min_size=1, max_size=40), min_size=1, max_size=200, unique=True)


@settings(max_examples=60, deadline=None)
@given(keys, st.integers(min_value=1, max_value=20), st.sampled_from([64, 300, 4096]))
def test_block_seek_finds_every_key(key_list: list[bytes], interval: int, _: int) -> None:
    builder = BlockBuilder(interval)
    ordered = sorted(key_list)
    for i, key in enumerate(ordered):
        builder.add(key, str(i).encode())
    block = builder.finish()
    assert [k for k, _ in iter_block(block)] == ordered
    for i, key in enumerate(ordered):
        found = seek_block(block, key)
        assert found is not None and found[0] == key and bytes(found[1]) == str(i).encode()
    assert seek_block(block, ordered[-1] + b"\x00") is None


@given(st.lists(st.binary(max_size=4), unique=True, max_size=40), st.binary(max_size=5))
def test_index_block_finds_the_first_separator_at_or_after_a_key(
    separators: list[bytes], key: bytes
) -> None:
    ordered = tuple(sorted(separators))
    handles = tuple(BlockHandle(10 * i, 5) for i in range(len(ordered)))
    found = IndexBlock(ordered, handles).find(key)
    at_or_after = [i for i, s in enumerate(ordered) if s >= key]
    assert found == (handles[at_or_after[0]] if at_or_after else None)


@settings(max_examples=40, deadline=None)
@given(keys, st.sampled_from([64, 512, 262144]), st.booleans(), st.integers(0, 300))
def test_table_round_trip(key_list: list[bytes], block_size: int, snappy: bool, vlen: int) -> None:
    writer = TableWriter(block_size=block_size, snappy=snappy)
    records = [(k, (k * (vlen // max(1, len(k)) + 1))[:vlen]) for k in sorted(key_list)]
    for k, v in records:
        writer.add(k, v)
    assert read_table(writer.finish()) == records


def test_snappy_blocks_are_written_and_read() -> None:
    writer = TableWriter(snappy=True)
    records = [(f"layer/{i:05d}/kernel".encode(), b"\x00" * 40) for i in range(2000)]
    for k, v in records:
        writer.add(k, v)
    data = writer.finish()
    assert read_table(data) == records
    plain = TableWriter()
    for k, v in records:
        plain.add(k, v)
    assert len(data) < len(plain.finish()) // 2  # compressed for real


def test_writer_refuses_unsorted_or_duplicate_keys() -> None:
    writer = TableWriter()
    writer.add(b"b", b"")
    with pytest.raises(ValueError):
        writer.add(b"a", b"")
    with pytest.raises(ValueError):
        writer.add(b"b", b"")


@settings(max_examples=60, deadline=None)
@given(
    keys,
    st.sampled_from([64, 512, 4096]),
    st.lists(st.integers(0, 9000), max_size=80),
    st.lists(st.integers(1, 30), max_size=10),
)
def test_records_added_in_any_batches_make_the_same_table(
    key_list: list[bytes], block_size: int, sizes: list[int], batches: list[int]
) -> None:
    """``add_many`` in batches of any size is ``add`` one by one (big records included)."""
    ordered = sorted(key_list)
    values = [
        bytes([i % 251]) * (sizes[i % len(sizes)] if sizes else 3) for i in range(len(ordered))
    ]
    one = TableWriter(block_size=block_size, restart_interval=3)
    for k, v in zip(ordered, values, strict=True):
        one.add(k, v)
    many = TableWriter(block_size=block_size, restart_interval=3)
    start = 0
    for size in [*batches, len(ordered)]:
        many.add_many(ordered[start : start + size], values[start : start + size])
        start += size
    assert many.finish() == one.finish()


def test_batches_refuse_unsorted_or_duplicate_keys() -> None:
    for batch in ([b"a", b"c", b"b"], [b"a", b"a"]):
        with pytest.raises(ValueError, match="strictly increasing"):
            TableWriter().add_many(batch, [b""] * len(batch))
    writer = TableWriter()
    writer.add_many([b"b"], [b""])
    with pytest.raises(ValueError, match="strictly increasing"):
        writer.add_many([b"a"], [b""])


def test_oversized_record_closes_the_block_first() -> None:
    writer = TableWriter()
    writer.add(b"a", b"x")
    writer.add(b"b" * (530001), b"y")
    writer.add(b"c", b"z")
    data = writer.finish()
    footer = decode_footer(data[-FOOTER_SIZE:], file_size=len(data))
    h = footer.index
    index = decode_index_block(
        decode_block(data[h.offset : h.end_with_trailer], offset=h.offset),
        index_offset=h.offset,
        limit=len(data),
    )
    assert len(index.handles) == 3  # the huge key sits alone in the middle block


def test_block_crc_and_compression_type_are_checked() -> None:
    writer = TableWriter()
    writer.add(b"k", b"v")
    data = bytearray(writer.finish())
    data[3] ^= 0x01
    with pytest.raises(ChecksumError):
        read_table(bytes(data))
    stored = bytearray(b"abc") + bytes([7])
    stored += mask(crc32c(bytes(stored))).to_bytes(4, "little")
    with pytest.raises(CorruptCheckpointError, match="compression"):
        decode_block(bytes(stored), offset=0)


def test_bad_magic_and_short_footer() -> None:
    writer = TableWriter()
    writer.add(b"k", b"v")
    data = writer.finish()
    with pytest.raises(CorruptCheckpointError, match="magic"):
        decode_footer(data[-FOOTER_SIZE:-1] + b"\x00", file_size=len(data))
    with pytest.raises(CorruptCheckpointError):
        decode_footer(data[-10:], file_size=10)


def test_hostile_snappy_length_is_refused_before_inflating() -> None:
    body = encode_varint(1 << 40) + b"\x00"  # claims a terabyte
    stored = body + b"\x01"
    stored += mask(crc32c(stored)).to_bytes(4, "little")
    with pytest.raises(StreamCkptError):
        decode_block(stored, offset=0)


# --- hostile prefix compression, many varints, the size from a tail -------------------------


def _chain_block(records: int) -> bytes:
    """Every key is the previous one plus a byte; one restart point."""
    raw = bytearray()
    for shared in range(records):
        raw += encode_varint(shared) + b"\x01\x00" + b"k"
    return bytes(raw) + encode_fixed32(0) + encode_fixed32(1)


def test_keys_a_block_spells_are_capped_by_its_size() -> None:
    block = _chain_block(3000)  # ~14 KB spelling 4.5 MB of keys
    assert len(block) * MAX_KEY_EXPANSION < 3000 * 3001 // 2
    with pytest.raises(CorruptCheckpointError, match="spell more than"):
        list(iter_block(block))
    with pytest.raises(CorruptCheckpointError, match="spell more than"):
        seek_block(block, b"k" * 2999)
    short = _chain_block(100)  # within the cap: read as it is
    assert [k for k, _ in iter_block(short)] == [b"k" * (i + 1) for i in range(100)]
    assert seek_block(short, b"k" * 50) is not None


@settings(max_examples=60, deadline=None)
@given(st.integers(20, 400), st.integers(1, 32))
def test_long_shared_keys_at_any_restart_interval_up_to_32_are_read(
    key_length: int, interval: int
) -> None:
    """What the cap must never refuse: long keys that share all but their last bytes,
    with the smallest values, at TF's restart interval (16) and up to twice it."""
    keys = [b"x" * key_length + i.to_bytes(2, "big") for i in range(300)]
    builder = BlockBuilder(interval)
    for key in keys:
        builder.add(key, b"")
    assert [k for k, _ in iter_block(builder.finish())] == keys


@settings(max_examples=300)
@given(
    st.lists(st.integers(0, 2**64 - 1) | st.integers(0, 300), max_size=40), st.binary(max_size=3)
)
def test_varints_decoded_at_once_match_one_at_a_time(values: list[int], after: bytes) -> None:
    data = b"".join(encode_varint(v) for v in values) + after
    decoded, end = decode_varints(data, 0, len(values))
    assert decoded.tolist() == values
    pos = 0
    for _ in values:
        _, pos = decode_varint(data, pos)
    assert end == pos


@pytest.mark.parametrize(
    "data",
    [b"", b"\x80", b"\x80" * 11, b"\xff" * 9 + b"\x02"],
    ids=["empty", "cut", "long", "wide"],
)
def test_varints_decoded_at_once_refuse_what_one_at_a_time_refuses(data: bytes) -> None:
    with pytest.raises(CorruptCheckpointError) as scalar:
        decode_varint(data, 0)
    with pytest.raises(CorruptCheckpointError) as vector:
        decode_varints(b"\x05" + data, 1, 2)
    assert str(vector.value).split(" (")[0] == str(scalar.value).split(" (")[0]


def test_table_size_from_a_tail() -> None:
    writer = TableWriter(block_size=64)
    for i in range(50):
        writer.add(f"key{i:03d}".encode(), b"v" * 10)
    table = writer.finish()
    assert table_size_from_tail(table) == len(table)
    index = decode_footer(table[-FOOTER_SIZE:], file_size=len(table)).index
    assert table_size_from_tail(table[index.offset :]) == len(table)
    assert table_size_from_tail(table[index.offset + 1 :]) is None  # index block cut: ask
    assert table_size_from_tail(table[-40:]) is None  # shorter than a footer
    damaged = bytearray(table)
    damaged[-60] ^= 1  # inside the index block: its checksum no longer holds there
    assert table_size_from_tail(bytes(damaged)) is None


def test_data_block_handles_must_follow_one_another() -> None:
    def index_block(*handles: BlockHandle) -> bytes:
        builder = BlockBuilder(1)
        for i, handle in enumerate(handles):
            builder.add(bytes([i + 1]), handle.encode())
        return builder.finish()

    ok = index_block(BlockHandle(0, 10), BlockHandle(15, 3), BlockHandle(30, 0))
    assert len(decode_index_block(ok, index_offset=0, limit=100).handles) == 3
    for handles in [
        (BlockHandle(0, 10), BlockHandle(0, 10)),  # the same block twice
        (BlockHandle(0, 10), BlockHandle(14, 3)),  # starts inside the one before (trailer)
        (BlockHandle(20, 5), BlockHandle(0, 5)),  # out of order
    ]:
        with pytest.raises(CorruptCheckpointError, match="overlaps the one before"):
            decode_index_block(index_block(*handles), index_offset=0, limit=100)
