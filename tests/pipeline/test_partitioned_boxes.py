"""Box reads: a box of a partitioned tensor costs the bytes of the pieces it meets, no more.

Checkpoints are written here with the format layer (a full entry with ``slices``, every piece
under its slice key, data files of plain bytes), so a test chooses the tiling and which shard
holds each piece. Byte and request counts come from the reader's own store statistics; that
nothing else was read is shown by deleting the shards of the pieces a box does not meet
before reading it. The planners (``plan_runs``, ``plan_piece_reads``) are checked against
numpy with hypothesis; the TF-written partitioned fixture against its manifest.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import TF_FIXTURES, StoreUnderTest, load_manifest

import streamckpt
import streamckpt.sync
from streamckpt.errors import ChecksumError, CorruptCheckpointError
from streamckpt.format.bundle import BundleEntry, BundleHeader, data_filename, index_filename
from streamckpt.format.crc import crc32c, mask
from streamckpt.format.dtypes import from_numpy
from streamckpt.format.index_file import encode_index
from streamckpt.format.slices import Extent, TensorSlice, encode_slice_key
from streamckpt.pipeline.region import plan_piece_reads, plan_runs
from streamckpt.sharding import Box, box_shape, full_box
from streamckpt.storage import resolve

pytestmark = pytest.mark.anyio

PROPERTIES = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


# --- writing partitioned checkpoints with the format layer ------------------------------------


def index_of(box: Box) -> tuple[slice, ...]:
    return tuple(slice(lo, hi) for lo, hi in box)


def slice_of(box: Box) -> TensorSlice:
    return TensorSlice(tuple(Extent(lo, hi - lo) for lo, hi in box))


@dataclass
class Tensor:
    """A tensor to store: plain (``pieces`` None) or as the pieces given, in that order.

    ``shard_of`` picks each piece's shard (default: piece i in shard i % shards); ``entry``
    may rewrite a piece's entry (hostile indexes), ``corrupt`` flips a byte of piece i.
    """

    value: np.ndarray[Any, Any]
    pieces: Sequence[Box] | None = None
    slices: Sequence[Box] | None = None  # what the full entry lists, if not ``pieces``
    shape: tuple[int, ...] | None = None  # what the full entry claims, if not the value's
    entry: dict[int, dict[str, Any]] = field(default_factory=dict)
    corrupt: set[int] = field(default_factory=set)


def build(tensors: dict[bytes, Tensor], *, num_shards: int = 1) -> tuple[bytes, list[bytearray]]:
    """The index and the data shards of a checkpoint holding ``tensors``."""
    shards = [bytearray() for _ in range(num_shards)]
    entries: list[tuple[bytes, BundleEntry]] = []
    counter = itertools.count()

    def store(key: bytes, array: np.ndarray[Any, Any], corrupt: bool, **changes: Any) -> None:
        payload = np.ascontiguousarray(array).tobytes()
        shard_id = next(counter) % num_shards
        fields: dict[str, Any] = {
            "dtype": from_numpy(array.dtype),
            "shape": array.shape,
            "shard_id": shard_id,
            "offset": len(shards[shard_id]),
            "size": len(payload),
            "crc32c": mask(crc32c(payload)),
        }
        fields.update(changes)
        if corrupt:
            payload = bytes([payload[0] ^ 0xFF]) + payload[1:]
        shards[shard_id] += payload
        entries.append((key, BundleEntry(**fields)))

    for name, tensor in tensors.items():
        if tensor.pieces is None:
            store(name, tensor.value, 0 in tensor.corrupt, **tensor.entry.get(0, {}))
            continue
        listed = tensor.pieces if tensor.slices is None else tensor.slices
        entries.append(
            (
                name,
                BundleEntry(
                    dtype=from_numpy(tensor.value.dtype),
                    shape=tensor.value.shape if tensor.shape is None else tensor.shape,
                    slices=tuple(slice_of(b) for b in listed),
                ),
            )
        )
        same = len(listed) == len(tensor.pieces)  # then piece i is stored under slice i
        for number, piece in enumerate(tensor.pieces):
            store(
                encode_slice_key(name, slice_of(listed[number] if same else piece)),
                tensor.value[index_of(piece)],
                number in tensor.corrupt,
                **tensor.entry.get(number, {}),
            )
    entries.sort(key=lambda item: item[0])
    return encode_index(BundleHeader(num_shards=num_shards), entries), shards


async def write(
    prefix: str, tensors: dict[bytes, Tensor], *, num_shards: int = 1, **options: Any
) -> None:
    index, shards = build(tensors, num_shards=num_shards)
    store, path = resolve(prefix, **options)
    await store.make_dirs(store.dirname(path))
    for shard_id, data in enumerate(shards):
        await store.write_atomic(
            data_filename(path, shard_id, num_shards), bytes(data), exclusive=False
        )
    await store.write_atomic(index_filename(path), index, exclusive=False)


async def delete_shards(
    prefix: str, shard_ids: Sequence[int], num_shards: int, **options: Any
) -> None:
    store, path = resolve(prefix, **options)
    await store.delete([data_filename(path, i, num_shards) for i in shard_ids])


def grid(shape: Sequence[int], cuts: Sequence[Sequence[int]]) -> list[Box]:
    """The pieces of ``shape`` cut at ``cuts`` on each axis, in C order of the cells."""
    bounds = [
        list(itertools.pairwise([0, *sorted(set(c)), size]))
        for c, size in zip(cuts, shape, strict=True)
    ]
    return [tuple(cell) for cell in itertools.product(*bounds)]


def delta(after: dict[str, float], before: dict[str, float]) -> tuple[int, int]:
    return int(after["requests"] - before["requests"]), int(
        after["bytes_read"] - before["bytes_read"]
    )


# --- (a) properties: any tiling, any box, numpy's answer -----------------------------------------

DTYPES = [
    np.dtype(np.float32),
    np.dtype(np.int16),
    np.dtype(np.uint8),
    np.dtype(np.complex128),
    np.dtype(ml_dtypes.bfloat16),
]


def values(shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray[Any, Any]:
    """Distinct bit patterns per element (random bytes), so a misplaced element shows."""
    rng = np.random.default_rng(math.prod(shape) + dtype.itemsize)
    raw = rng.integers(0, 256, size=math.prod(shape) * dtype.itemsize, dtype=np.uint8)
    if dtype.kind in "fcV":  # no NaN payloads to compare: keep the exponents small
        raw[dtype.itemsize - 1 :: dtype.itemsize] &= 0x3F
    return np.frombuffer(raw.tobytes(), dtype=dtype).reshape(shape).copy()


@st.composite
def tilings_and_indexes(draw: st.DrawFn) -> tuple[tuple[int, ...], list[Box], Any, Box]:
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=3)))
    cuts = [
        draw(st.lists(st.integers(1, size - 1), max_size=2)) if size > 1 else [] for size in shape
    ]
    pieces = draw(st.permutations(grid(shape, cuts)))
    box = []
    index: list[Any] = []
    for size in shape:
        lo = draw(st.integers(0, size))
        hi = draw(st.integers(lo, size))
        box.append((lo, hi))
        kind = draw(st.sampled_from(["slice", "step", "int"]))
        if kind == "int":
            index.append(draw(st.integers(-size, size - 1)))
        elif kind == "step":
            index.append(
                slice(
                    draw(st.none() | st.integers(-size, size)),
                    None,
                    draw(st.sampled_from([2, -1, -2])),
                )
            )
        else:
            index.append(slice(lo, hi))
    return shape, list(pieces), tuple(index), tuple(box)


@PROPERTIES
@given(
    case=tilings_and_indexes(),
    dtype=st.sampled_from(DTYPES),
    max_gap=st.sampled_from([0, 8, 1 << 20]),
    max_runs=st.sampled_from([1, 3, 4096]),
)
def test_box_reads_of_any_tiling_equal_numpy(
    case: tuple[tuple[int, ...], list[Box], Any, Box],
    dtype: np.dtype[Any],
    max_gap: int,
    max_runs: int,
) -> None:
    shape, pieces, index, box = case
    full = values(shape, dtype)
    with tempfile.TemporaryDirectory() as directory:
        prefix = f"{directory}/ckpt"

        async def check() -> None:
            await write(
                prefix,
                {b"part": Tensor(full, pieces), b"plain": Tensor(full)},
                num_shards=2,
            )
            async with streamckpt.open(prefix, use_cache=False) as reader:
                reader.max_gap, reader.max_runs = max_gap, max_runs
                got = await reader.read("part", index=index)
                expected = full[index]
                assert got.dtype == full.dtype and got.shape == expected.shape
                assert got.tobytes() == np.ascontiguousarray(expected).tobytes()
                by_box, plain = await reader.read_boxes([("part", box), ("plain", box)])
                assert by_box.shape == box_shape(box) and by_box.dtype == full.dtype
                assert by_box.tobytes() == np.ascontiguousarray(full[index_of(box)]).tobytes()
                assert plain.tobytes() == by_box.tobytes()

        asyncio.run(check())


@pytest.mark.parametrize("max_gap", [0, 1 << 20])
async def test_a_box_of_a_3d_tensor_cut_on_every_axis(tmp_path: Any, max_gap: int) -> None:
    """Runs at several outer positions per piece (max_gap 0), or one span per piece."""
    full = values((6, 7, 8), np.dtype(np.float64))
    pieces = grid(full.shape, [[3], [2, 5], [4]])
    prefix = str(tmp_path / "ckpt")
    await write(prefix, {b"t": Tensor(full, pieces)}, num_shards=3)
    box = ((1, 5), (1, 6), (2, 7))
    async with streamckpt.open(prefix) as reader:
        reader.max_gap = max_gap
        before = reader.stats
        (got,) = await reader.read_boxes([("t", box)])
        made, read = delta(reader.stats, before)
    np.testing.assert_array_equal(got, full[index_of(box)])
    if max_gap == 0:  # one request per row of 2 or 3 elements: exactly the box's bytes
        assert read == got.nbytes
        assert made == 4 * 5 * 2  # rows x (columns cut at 4: two pieces per row)
    else:
        assert made <= 3  # a request per shard
        assert got.nbytes < read < full.nbytes


@st.composite
def shapes_and_boxes(draw: st.DrawFn) -> tuple[tuple[int, ...], Box]:
    shape = tuple(draw(st.lists(st.integers(1, 7), min_size=0, max_size=4)))
    box = []
    for size in shape:
        lo = draw(st.integers(0, size - 1))
        box.append((lo, draw(st.integers(lo + 1, size))))
    return shape, tuple(box)


@settings(max_examples=300, deadline=None, database=None)
@given(
    case=shapes_and_boxes(),
    itemsize=st.sampled_from([1, 2, 8]),
    max_gap=st.sampled_from([0, 3, 16, 1 << 30]),
    max_runs=st.sampled_from([1, 2, 5, 1 << 30]),
)
def test_runs_hold_the_box_and_skip_every_gap_larger_than_max_gap(
    case: tuple[tuple[int, ...], Box], itemsize: int, max_gap: int, max_runs: int
) -> None:
    shape, box = case
    runs = plan_runs(shape, itemsize, box, max_gap=max_gap, max_runs=max_runs)
    assert runs.count <= max(max_runs, 1)
    flat = np.arange(math.prod(shape), dtype=np.int64)
    data = flat.reshape(shape)
    positions = set()
    fetched = 0
    for position, start in runs.positions():
        assert start % itemsize == 0 and runs.length % itemsize == 0
        first, count = start // itemsize, runs.length // itemsize
        fetched += runs.length
        run = flat[first : first + count]
        assert len(run) == count  # inside the tensor
        view = np.lib.stride_tricks.as_strided(
            run,
            shape=runs.inner_shape,
            strides=tuple(s // itemsize * 8 for s in runs.inner_strides),
            writeable=False,
        )
        outer = tuple(box[axis][0] + at for axis, at in enumerate(position))
        where: tuple[Any, ...] = (*outer, *index_of(box[len(outer) :]))
        expected = data[where]
        np.testing.assert_array_equal(view, expected)
        positions.update(view.reshape(-1).tolist())
    assert positions == set(data[index_of(box)].reshape(-1).tolist())  # every element, once
    box_bytes = math.prod(box_shape(box)) * itemsize
    if max_runs >= math.prod(box_shape(box)):  # nothing forced: every skipped gap > max_gap
        assert fetched <= box_bytes + max(0, max_gap) * (math.prod(box_shape(box)) - 1)
        if max_gap == 0:
            assert fetched == box_bytes


def test_piece_reads_meet_only_the_pieces_the_box_meets() -> None:
    pieces = grid((10, 8), [[4, 7], [5]])  # 6 pieces
    reads = plan_piece_reads(((3, 5), (0, 8)), pieces, 4, max_gap=0, max_runs=100)
    met = [pieces[r.piece] for r in reads]
    assert met == [((0, 4), (0, 5)), ((0, 4), (5, 8)), ((4, 7), (0, 5)), ((4, 7), (5, 8))]
    assert [r.whole for r in reads] == [False] * 4
    whole = plan_piece_reads(((0, 10), (0, 8)), pieces, 4, max_gap=0, max_runs=100)
    assert [r.piece for r in whole] == list(range(6)) and all(r.whole for r in whole)
    assert plan_piece_reads(((3, 3), (0, 8)), pieces, 4, max_gap=0, max_runs=100) == []


# --- (b) what a box costs, on a local disk and on S3 ----------------------------------------------

ROWS, COLS, PIECE_ROWS = 64, 32, 16  # float32: 128 bytes a row, 2 KiB a piece
MATRIX = np.arange(ROWS * COLS, dtype=np.float32).reshape(ROWS, COLS)
ROW_PIECES = [((r, r + PIECE_ROWS), (0, COLS)) for r in range(0, ROWS, PIECE_ROWS)]


# the store fixture of conftest, limited to a local disk and one S3 server
where_stores = pytest.mark.parametrize("store", ["local", "moto"], indirect=True)


async def _open_matrix(store: StoreUnderTest, **tensor: Any) -> tuple[str, dict[str, Any]]:
    prefix = store.prefix("ckpt")
    await write(
        prefix,
        {b"m": Tensor(MATRIX, ROW_PIECES, **tensor)},
        num_shards=4,  # piece i in shard i
        storage_options=store.storage_options,
    )
    return prefix, {"storage_options": store.storage_options}


@where_stores
@pytest.mark.parametrize(
    ("box", "requests", "max_bytes"),
    [
        (((18, 23), (0, COLS)), 1, 5 * 128),  # rows inside piece 1: exactly its bytes
        (((18, 23), (4, 8)), 1, 4 * 128 + 4 * 4),  # a column block: one request of its span
        (((20, 21), (3, 4)), 1, 4),  # one element
    ],
    ids=["rows", "block", "element"],
)
async def test_a_box_inside_one_piece_reads_its_own_bytes(
    store: StoreUnderTest, box: Box, requests: int, max_bytes: int
) -> None:
    prefix, options = await _open_matrix(store)
    async with streamckpt.open(prefix, **options) as reader:
        await delete_shards(prefix, [0, 2, 3], 4, **options)  # only piece 1 is left
        before = reader.stats
        (got,) = await reader.read_boxes([("m", box)])
        made, read = delta(reader.stats, before)
    np.testing.assert_array_equal(got, MATRIX[index_of(box)])
    if store.kind == "local":
        # a local read is a system call: no gap is worth reading through (store.read_gap)
        assert read == got.nbytes
    else:
        assert made == requests
        assert got.nbytes <= read <= max_bytes


@where_stores
async def test_a_column_block_skips_gaps_larger_than_max_gap(store: StoreUnderTest) -> None:
    prefix, options = await _open_matrix(store)
    box = ((18, 23), (4, 8))
    async with streamckpt.open(prefix, **options) as reader:
        reader.max_gap = 0
        before = reader.stats
        (got,) = await reader.read_boxes([("m", box)])
        made, read = delta(reader.stats, before)
    np.testing.assert_array_equal(got, MATRIX[index_of(box)])
    assert (made, read) == (5, got.nbytes)  # one request a row, the box's bytes exactly


@where_stores
async def test_a_box_across_two_pieces_reads_only_from_them(store: StoreUnderTest) -> None:
    prefix, options = await _open_matrix(store)
    async with streamckpt.open(prefix, **options) as reader:
        await delete_shards(prefix, [2, 3], 4, **options)
        before = reader.stats
        got = await reader.read("m", index=np.s_[10:20])
        made, read = delta(reader.stats, before)
    np.testing.assert_array_equal(got, MATRIX[10:20])
    assert made == 2  # one per piece (each in its own shard)
    assert read == 10 * 128 == got.nbytes  # never the whole tensor (8 KiB)


async def test_pieces_of_one_shard_are_read_in_one_merged_request(tmp_path: Any) -> None:
    prefix = str(tmp_path / "ckpt")
    await write(prefix, {b"m": Tensor(MATRIX, ROW_PIECES)}, num_shards=1)
    async with streamckpt.open(prefix) as reader:
        reader.max_gap = 256 << 10  # an object store's (local disk reads no gap through)
        before = reader.stats
        got = await reader.read("m", index=np.s_[10:40, 2:5])
        made, read = delta(reader.stats, before)
    np.testing.assert_array_equal(got, MATRIX[10:40, 2:5])
    assert made == 1  # three pieces' runs, their gaps small: merged
    assert read < MATRIX.nbytes


async def test_a_piece_read_whole_is_checked_by_its_crc32c(tmp_path: Any) -> None:
    """A box that covers a piece reads it whole and verifies it; a part of it cannot be."""
    prefix = str(tmp_path / "ckpt")
    await write(prefix, {b"m": Tensor(MATRIX, ROW_PIECES, corrupt={1})}, num_shards=4)
    async with streamckpt.open(prefix) as reader:
        for box in (((16, 32), (0, COLS)), ((10, 40), (0, COLS)), full_box(MATRIX.shape)):
            with pytest.raises(ChecksumError) as caught:
                await reader.read_boxes([("m", box)])
            assert caught.value.tensor == "m"
        with pytest.raises(ChecksumError):
            await reader.read("m", index=np.s_[...])
        # part of the corrupt piece: no checksum to check; the bytes come back as stored
        part = await reader.read("m", index=np.s_[16:31])
        assert part[0, 0] != MATRIX[16, 0]
        np.testing.assert_array_equal(part[1:], MATRIX[17:31])


# --- (c) read_boxes: mixed requests, in order -----------------------------------------------------


async def test_read_boxes_mixes_plain_and_partitioned_tensors_in_request_order(
    tmp_path: Any,
) -> None:
    prefix = str(tmp_path / "ckpt")
    cols = np.arange(24, dtype=np.int32).reshape(4, 6) * -3
    await write(
        prefix,
        {
            b"m": Tensor(MATRIX, ROW_PIECES),
            b"cols": Tensor(cols, [((0, 4), (0, 3)), ((0, 4), (3, 6))]),
            b"plain": Tensor(MATRIX * 2),
            b"scalar": Tensor(np.array(7.5, dtype=np.float64)),
        },
        num_shards=3,
    )
    requests: list[tuple[str | bytes, Box]] = [
        ("m", ((5, 40), (3, 9))),
        ("plain", ((5, 40), (3, 9))),
        (b"cols", ((1, 3), (2, 5))),
        ("m", full_box(MATRIX.shape)),
        ("plain", full_box(MATRIX.shape)),
        ("m", ((5, 40), (3, 9))),  # the same box again: fetched once, two arrays
        ("cols", ((2, 2), (0, 6))),  # empty
        ("scalar", ()),
        ("cols", full_box(cols.shape)),
        ("plain", full_box(MATRIX.shape)),  # a whole tensor again: its own array
    ]
    expected = [
        MATRIX[5:40, 3:9],
        (MATRIX * 2)[5:40, 3:9],
        cols[1:3, 2:5],
        MATRIX,
        MATRIX * 2,
        MATRIX[5:40, 3:9],
        cols[2:2],
        np.array(7.5),
        cols,
        MATRIX * 2,
    ]
    async with streamckpt.open(prefix) as reader:
        got = await reader.read_boxes(requests)
    assert len(got) == len(expected)
    for value, want in zip(got, expected, strict=True):
        assert value.dtype == want.dtype and value.shape == want.shape
        np.testing.assert_array_equal(value, want)
    for one, other in itertools.combinations(got, 2):
        assert not np.shares_memory(one, other)
    with streamckpt.sync.open(prefix) as blocking:
        again = blocking.read_boxes(requests)
    for value, want in zip(again, expected, strict=True):
        np.testing.assert_array_equal(value, want)


async def test_read_boxes_of_strings_cuts_the_whole_tensor() -> None:
    prefix = str(TF_FIXTURES / "strings" / "ckpt")
    async with streamckpt.open(prefix) as reader:
        whole = await reader.read("matrix")
        (part,) = await reader.read_boxes([("matrix", ((1, 2), (0, whole.shape[1])))])
    assert part.tolist() == whole[1:2].tolist()


async def test_a_box_outside_the_tensor_is_refused(tmp_path: Any) -> None:
    prefix = str(tmp_path / "ckpt")
    await write(prefix, {b"m": Tensor(MATRIX, ROW_PIECES)})
    async with streamckpt.open(prefix) as reader:
        for box in (((0, 65), (0, COLS)), ((0, 1),), ((3, 2), (0, 1)), ((-1, 2), (0, 1))):
            with pytest.raises(ValueError, match="'m'"):
                await reader.read_boxes([("m", box)])


# --- (d) hostile indexes --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "slices",
    [
        [((0, 40), (0, COLS)), ((32, 64), (0, COLS))],  # overlap (and too many elements)
        [((0, 16), (0, COLS)), ((32, 64), (0, COLS))],  # a gap
        [((0, 32), (0, 16)), ((32, 64), (0, 16)), ((0, 40), (16, 32)), ((32, 56), (16, 32))],
    ],
    ids=["overlap", "gap", "same-volume-gap-and-overlap"],
)
async def test_pieces_that_do_not_tile_are_refused(tmp_path: Any, slices: list[Box]) -> None:
    prefix = str(tmp_path / "ckpt")
    await write(prefix, {b"w": Tensor(MATRIX, ROW_PIECES, slices=slices)})
    async with streamckpt.open(prefix) as reader:
        with pytest.raises(CorruptCheckpointError, match=r"tile|overlapping") as caught:
            await reader.read("w", index=np.s_[0:2, 0:2])
        assert caught.value.tensor == "w"
        with pytest.raises(CorruptCheckpointError):
            await reader.read_boxes([("w", ((0, 1), (0, 1)))])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"shape": (17, COLS), "size": 17 * COLS * 4}, "shape"),
        ({"shape": (16, COLS // 2), "size": 16 * COLS // 2 * 4}, "shape"),
        ({"dtype": from_numpy(np.dtype(np.int32))}, "dtype"),
    ],
    ids=["rows", "cols", "dtype"],
)
async def test_a_piece_entry_that_disagrees_is_refused_naming_the_tensor(
    tmp_path: Any, change: dict[str, Any], message: str
) -> None:
    prefix = str(tmp_path / "ckpt")
    await write(prefix, {b"w": Tensor(MATRIX, ROW_PIECES, entry={1: change})})
    async with streamckpt.open(prefix) as reader:
        with pytest.raises(CorruptCheckpointError, match=message) as caught:
            await reader.read("w", index=np.s_[20:22, 1:3])
        assert caught.value.tensor == "w"
        # a box that does not meet the bad piece needs nothing of it
        np.testing.assert_array_equal(await reader.read("w", index=np.s_[40:42]), MATRIX[40:42])


async def test_a_missing_piece_is_refused(tmp_path: Any) -> None:
    prefix = str(tmp_path / "ckpt")
    await write(prefix, {b"w": Tensor(MATRIX, ROW_PIECES[:3], slices=ROW_PIECES)})
    async with streamckpt.open(prefix) as reader:
        with pytest.raises(CorruptCheckpointError, match="missing") as caught:
            await reader.read_boxes([("w", ((50, 52), (0, 2)))])
        assert caught.value.tensor == "w"


async def test_a_huge_claimed_piece_is_checked_before_anything_is_allocated(
    tmp_path: Any,
) -> None:
    """Pieces claiming 4 TiB in a shard of 32 bytes fail as a short shard, not a MemoryError."""
    prefix = str(tmp_path / "ckpt")
    wide = 1 << 40
    claim = {"shape": (1, wide), "size": 4 * wide}
    tensor = Tensor(
        np.arange(8, dtype=np.float32).reshape(2, 4),
        [((0, 1), (0, 4)), ((1, 2), (0, 4))],
        slices=[((0, 1), (0, wide)), ((1, 2), (0, wide))],
        shape=(2, wide),
        entry={0: claim, 1: claim},
    )
    await write(prefix, {b"w": tensor})
    async with streamckpt.open(prefix) as reader:
        for box in (full_box((2, wide)), ((0, 1), (0, wide))):
            with pytest.raises(CorruptCheckpointError, match="shard") as caught:
                await reader.read_boxes([("w", box)])
            assert caught.value.tensor == "w"
        # a box of what the shard does hold is a box like any other
        np.testing.assert_array_equal(await reader.read("w", index=np.s_[1, :4]), [4, 5, 6, 7])


# --- (e) the TF-written partitioned fixture -------------------------------------------------------


def _manifest_values() -> dict[str, np.ndarray[Any, Any]]:
    fixture = next(f for f in load_manifest()["fixtures"] if f["name"] == "partitioned_v1")
    out = {}
    for entry in fixture["bundles"][0]["entries"]:
        if entry["key"] in ("emb", "w2"):
            dtype = {"DT_FLOAT": np.float32, "DT_INT32": np.int32}[entry["dtype"]]
            out[entry["key"]] = np.array(entry["value"], dtype=dtype)
    return out


@pytest.mark.parametrize(
    ("name", "box"),
    [
        ("emb", ((1, 5), (1, 3))),  # across all three row pieces
        ("emb", ((2, 4), (0, 4))),  # exactly the middle piece: read whole, crc-checked
        ("w2", ((1, 3), (2, 4))),  # across both column pieces
        ("w2", ((0, 4), (3, 6))),  # exactly the second piece
        ("w2", ((3, 4), (5, 6))),
    ],
)
async def test_tf_partitioned_fixture_by_box(name: str, box: Box) -> None:
    expected = _manifest_values()[name]
    prefix = str(TF_FIXTURES / "partitioned_v1" / "model-7")
    async with streamckpt.open(prefix) as reader:
        reader.max_gap = 256 << 10  # an object store's (local disk reads no gap through)
        before = reader.stats
        (got,) = await reader.read_boxes([(name, box)])
        made, read = delta(reader.stats, before)
        by_index = await reader.read(name, index=index_of(box))
    np.testing.assert_array_equal(got, expected[index_of(box)])
    np.testing.assert_array_equal(by_index, expected[index_of(box)])
    assert got.dtype == expected.dtype
    assert got.nbytes <= read < expected.nbytes  # never the whole tensor
    assert made == 1  # one small shard: the pieces' runs merged
