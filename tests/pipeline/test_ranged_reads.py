"""Ranged reads only: a reader fetches the index pieces and byte ranges it needs, no more.

Requests are counted by a wrapper around a real fsspec filesystem (LocalFileSystem over the
test's temporary directory): every call that would be a request to an object store counts, and
so does every byte it returns. The pure planners behind the reads (and the save's shard plan)
are checked with hypothesis.
"""

from __future__ import annotations

import faulthandler
import itertools
import math
import os
import shutil
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from fsspec.implementations.local import LocalFileSystem
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import streamckpt
from streamckpt.format.bundle import BundleEntry, BundleHeader, encode_index
from streamckpt.format.crc import crc32c, mask
from streamckpt.format.dtypes import DataType, is_fixed_size, numpy_dtype
from streamckpt.pipeline.plan import (
    MAX_AUTO_SHARDS,
    Placement,
    auto_num_shards,
    plan_reads,
    plan_save,
)
from streamckpt.pipeline.region import plan_region
from streamckpt.pipeline.tensors import Typed

pytestmark = pytest.mark.anyio

KiB = 1 << 10
MiB = 1 << 20
PROPERTIES = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


class CountingFileSystem:
    """A real fsspec filesystem that counts what a store asks of it.

    Every method call is a request (one per range for ``cat_ranges``), except the pure path
    helpers listed in ``LOCAL_HELPERS``; bytes returned by reads are added up per file.
    """

    LOCAL_HELPERS = frozenset(
        {"_strip_protocol", "unstrip_protocol", "invalidate_cache", "_parent", "sep"}
    )

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self._lock = threading.Lock()
        self.requests: list[tuple[str, str]] = []
        self.bytes_by_file: Counter[str] = Counter()

    def _record(self, method: str, path: str, nbytes: int = 0) -> None:
        with self._lock:
            self.requests.append((method, os.path.basename(str(path))))
            self.bytes_by_file[os.path.basename(str(path))] += nbytes

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_by_file.values())

    def requests_for(self, suffix: str) -> int:
        return sum(1 for _, name in self.requests if name.endswith(suffix) or suffix in name)

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.bytes_by_file.clear()

    def cat_file(
        self, path: str, start: int | None = None, end: int | None = None, **kw: Any
    ) -> Any:
        data = self._inner.cat_file(path, start=start, end=end, **kw)
        self._record("cat_file", path, len(data))
        return data

    def cat_ranges(self, paths: list[str], starts: Any, ends: Any, **kw: Any) -> Any:
        results = self._inner.cat_ranges(paths, starts, ends, **kw)
        for path, data in zip(paths, results, strict=True):
            self._record("cat_ranges", path, len(data) if isinstance(data, bytes) else 0)
        return results

    def open(self, path: str, mode: str = "rb", **kw: Any) -> Any:
        self._record(f"open:{mode}", path)
        return self._inner.open(path, mode, **kw)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name in self.LOCAL_HELPERS or not callable(attr):
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            self._record(name, args[0] if args else "")
            return attr(*args, **kwargs)

        return counted


def size_of(path: str) -> int:
    return os.path.getsize(path)


def counting() -> CountingFileSystem:
    return CountingFileSystem(LocalFileSystem())


# --- a 1 GiB checkpoint: one tensor costs its own bytes ------------------------------------------

BIG_TENSORS = 256
BIG_TENSOR_BYTES = 4 * MiB
TARGET = "layer/137"


@pytest.fixture(scope="module")
def gib_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """256 tensors of 4 MiB over 4 shards, written once by streamckpt.save and removed after."""
    directory = tmp_path_factory.mktemp("gib")
    prefix = str(directory / "ckpt")
    zeros = np.zeros(BIG_TENSOR_BYTES // 4, dtype=np.float32)  # one buffer, saved 255 times
    arrays: dict[str, Any] = {f"layer/{i:03d}": zeros for i in range(BIG_TENSORS)}
    arrays[TARGET] = np.full(BIG_TENSOR_BYTES // 4, 1.5, dtype=np.float32)

    async def save() -> None:
        info = await streamckpt.save(prefix, arrays, num_shards=4)
        assert info.bytes_written == BIG_TENSORS * BIG_TENSOR_BYTES

    anyio.run(save)
    yield prefix
    shutil.rmtree(directory)


async def test_one_tensor_from_a_gib_checkpoint(gib_checkpoint: str) -> None:
    fs = counting()
    value = await streamckpt.read_tensor(gib_checkpoint, TARGET, filesystem=fs)
    assert value.shape == (BIG_TENSOR_BYTES // 4,)
    assert np.all(value == np.float32(1.5))
    assert fs.total_bytes < 4.2 * MiB, fs.bytes_by_file
    assert fs.total_bytes >= BIG_TENSOR_BYTES
    assert len(fs.requests) <= 4, fs.requests
    # the bytes came from the one shard that holds it, and from the index
    shard_reads = [name for name, count in fs.bytes_by_file.items() if ".data-" in name and count]
    assert len(shard_reads) == 1


async def test_open_reads_only_the_index(gib_checkpoint: str) -> None:
    fs = counting()
    async with streamckpt.open(gib_checkpoint, filesystem=fs) as ckpt:
        assert len(ckpt.entries) == BIG_TENSORS
        assert ckpt.entries[TARGET].nbytes == BIG_TENSOR_BYTES
    assert all(name.endswith(".index") for name in fs.bytes_by_file)
    assert fs.total_bytes == size_of(gib_checkpoint + ".index")
    assert len(fs.requests) <= 2


# --- 100,000 tensors: a lookup costs a few small requests --------------------------------------

MANY = 100_000


@pytest.fixture(scope="module")
def many_tensors(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """100,000 float32 scalars (value = their number), one shard, built with the format layer."""
    directory = tmp_path_factory.mktemp("many")
    prefix = str(directory / "ckpt")
    values = np.arange(MANY, dtype=np.float32)
    data = values.tobytes()
    entries = [
        (
            f"var/{i:06d}".encode(),
            BundleEntry(
                dtype=DataType.DT_FLOAT,
                shape=(),
                offset=4 * i,
                size=4,
                crc32c=mask(crc32c(data[4 * i : 4 * i + 4])),
            ),
        )
        for i in range(MANY)
    ]
    Path(prefix + ".index").write_bytes(encode_index(BundleHeader(num_shards=1), entries))
    Path(prefix + ".data-00000-of-00001").write_bytes(data)
    yield prefix
    shutil.rmtree(directory)


async def test_one_tensor_of_100k_costs_at_most_4_requests(many_tensors: str) -> None:
    index_size = size_of(many_tensors + ".index")
    assert index_size > 1.5 * MiB
    for number in (0, 31_337, 77_777, MANY - 1):
        fs = counting()
        value = await streamckpt.read_tensor(many_tensors, f"var/{number:06d}", filesystem=fs)
        assert value == np.float32(number)
        assert value.shape == ()
        assert len(fs.requests) <= 4, fs.requests
        # the tail, the header's block, the entry's block: a small part of the index
        assert fs.bytes_by_file["ckpt.index"] <= 64 * KiB + 2 * (256 * KiB + 5) + 64
        assert fs.bytes_by_file["ckpt.data-00000-of-00001"] == 4


async def test_lazy_reader_reuses_blocks(many_tensors: str) -> None:
    fs = counting()
    async with streamckpt.open(many_tensors, load_index=False, filesystem=fs) as ckpt:
        assert await ckpt.read("var/050000") == np.float32(50_000)
        assert fs.requests_for(".index") <= 3  # tail, header's block, entry's block
        fs.reset()
        # neighbours share that data block of the index: no more index reads, data only
        for number in range(50_001, 50_010):
            assert await ckpt.read(f"var/{number:06d}") == np.float32(number)
        assert fs.requests_for(".index") == 0, fs.requests
        assert fs.requests_for(".data-") == 9


# --- partial reads ------------------------------------------------------------------------------


@pytest.fixture
def matrix_checkpoint(tmp_path: Path) -> tuple[str, np.ndarray[Any, Any]]:
    rng = np.random.default_rng(7)
    matrix = rng.standard_normal((10_000, 256)).astype(np.float32)
    prefix = str(tmp_path / "ckpt")

    async def save() -> None:
        await streamckpt.save(
            prefix, {"before": np.ones(1000), "emb": matrix, "zafter": np.ones(1000)}
        )

    anyio.run(save)
    return prefix, matrix


@pytest.mark.parametrize(
    ("index", "max_bytes"),
    [
        (np.s_[100:200], 100 * 256 * 4),
        (np.s_[5], 256 * 4),
        (np.s_[-3:], 3 * 256 * 4),
        (np.s_[100:200, 10:20], 100 * 256 * 4),
        (np.s_[100:200:10], 91 * 256 * 4),
        (np.s_[7, 3], 4),
        (np.s_[..., 0], None),  # a column: spans the rows, still less than the whole
    ],
    ids=["rows", "row", "tail", "box", "step", "element", "column"],
)
async def test_partial_read_fetches_only_its_rows(
    matrix_checkpoint: tuple[str, np.ndarray[Any, Any]], index: Any, max_bytes: int | None
) -> None:
    prefix, matrix = matrix_checkpoint
    fs = counting()
    async with streamckpt.open(prefix, filesystem=fs) as ckpt:
        fs.reset()
        part = await ckpt.read("emb", index=index)
    expected = matrix[index]
    assert part.shape == expected.shape
    np.testing.assert_array_equal(part, expected)
    fetched = fs.bytes_by_file["ckpt.data-00000-of-00001"]
    assert fetched == fs.total_bytes  # nothing but the tensor's own bytes
    assert fetched <= (max_bytes if max_bytes is not None else matrix.nbytes - 255 * 4)
    assert fetched >= expected.nbytes
    assert len(fs.requests) == 1, fs.requests


FIXED_DTYPES = [
    dt
    for dt in DataType
    if is_fixed_size(dt) and dt not in (DataType.DT_INVALID, DataType.DT_RESOURCE)
]


@pytest.mark.parametrize("tf_dtype", FIXED_DTYPES, ids=[dt.name for dt in FIXED_DTYPES])
async def test_partial_read_of_every_dtype(tmp_path: Path, tf_dtype: DataType) -> None:
    """A region read gives numpy's answer for every fixed-size dtype, ml_dtypes' included."""
    raw = np.arange(60, dtype=np.uint8) % (2 if tf_dtype == DataType.DT_BOOL else 7)
    full = np.frombuffer(
        np.repeat(raw, numpy_dtype(tf_dtype).itemsize).tobytes(), dtype=numpy_dtype(tf_dtype)
    ).reshape(5, 12)
    prefix = str(tmp_path / "ckpt")
    await streamckpt.save(prefix, {"t": Typed(full, tf_dtype)})
    for index in (np.s_[1:3], np.s_[::-2, 5], np.s_[4, 11]):
        part = await streamckpt.read_tensor(prefix, "t", index=index)
        assert part.dtype == full.dtype
        assert part.shape == full[index].shape
        assert part.tobytes() == np.ascontiguousarray(full[index]).tobytes()


async def test_neighbouring_tensors_load_in_merged_requests(tmp_path: Path) -> None:
    count = 2000
    arrays = {f"bias/{i:04d}": np.full(100, i, dtype=np.float32) for i in range(count)}
    prefix = str(tmp_path / "ckpt")
    await streamckpt.save(prefix, arrays)
    fs = counting()
    loaded = await streamckpt.load(prefix, filesystem=fs)
    assert len(loaded) == count
    for name, value in arrays.items():
        assert loaded[name].tobytes() == value.tobytes()
    data_requests = fs.requests_for(".data-00000-of-00001")
    assert data_requests <= 2, fs.requests
    assert len(fs.requests) <= 6, fs.requests
    # every other tensor: the gaps are small, so still merged, and nothing is read twice
    fs = counting()
    wanted = [f"bias/{i:04d}" for i in range(0, count, 2)]
    subset = await streamckpt.load(prefix, names=wanted, filesystem=fs)
    assert sorted(subset) == wanted
    assert fs.requests_for(".data-") <= 2, fs.requests
    assert fs.bytes_by_file["ckpt.data-00000-of-00001"] <= count * 400


# --- plan_save ----------------------------------------------------------------------------------

names = st.binary(min_size=1, max_size=6)


@PROPERTIES
@given(
    sizes=st.dictionaries(names, st.integers(0, 10_000), max_size=40),
    num_shards=st.integers(1, 8),
)
def test_plan_save_places_every_tensor_once_in_name_order(
    sizes: dict[bytes, int], num_shards: int
) -> None:
    plan = plan_save(sizes=sizes, num_shards=num_shards)
    assert plan.num_shards == num_shards == len(plan.shards)
    placed = [p.key for shard in plan.shards for p in shard]
    assert sorted(placed) == sorted(sizes)
    assert len(placed) == len(set(placed))
    for shard_id, shard in enumerate(plan.shards):
        keys = [p.key for p in shard]
        assert keys == sorted(keys)
        offset = 0
        for p in shard:
            assert p.shard_id == shard_id
            assert p.offset == offset
            assert p.size == sizes[p.key]
            offset += p.size
        assert plan.shard_bytes(shard_id) == offset
    loads = [plan.shard_bytes(i) for i in range(num_shards)]
    if sizes:
        average = sum(sizes.values()) / num_shards
        assert max(loads) <= average + max(sizes.values())
    # deterministic, whatever order the mapping lists its tensors in
    reordered = dict(reversed(list(sizes.items())))
    assert plan_save(sizes=reordered, num_shards=num_shards) == plan


def _optimal_makespan(sizes: list[int], num_shards: int) -> int:
    best = math.inf
    for assignment in itertools.product(range(num_shards), repeat=len(sizes)):
        loads = [0] * num_shards
        for size, shard in zip(sizes, assignment, strict=True):
            loads[shard] += size
        best = min(best, max(loads))
    return int(best)


@PROPERTIES
@given(
    sizes=st.dictionaries(names, st.integers(1, 1000), min_size=1, max_size=7),
    num_shards=st.integers(2, 3),
)
def test_plan_save_balance_within_4_3_of_optimal(sizes: dict[bytes, int], num_shards: int) -> None:
    plan = plan_save(sizes=sizes, num_shards=num_shards)
    largest = max(plan.shard_bytes(i) for i in range(num_shards))
    optimal = _optimal_makespan(list(sizes.values()), num_shards)
    assert 3 * largest <= 4 * optimal


def test_plan_save_spreads_equal_tensors_evenly() -> None:
    plan = plan_save(sizes={f"t{i:02d}".encode(): 100 for i in range(16)}, num_shards=4)
    assert [plan.shard_bytes(i) for i in range(4)] == [400] * 4
    with pytest.raises(ValueError):
        plan_save(sizes={b"a": 1}, num_shards=0)


@PROPERTIES
@given(
    sizes=st.lists(st.integers(0, 1 << 40), max_size=40),
    shard_bytes=st.one_of(st.none(), st.integers(1, 1 << 36)),
)
def test_auto_num_shards_aims_at_the_store_shard_size(
    sizes: list[int], shard_bytes: int | None
) -> None:
    n = auto_num_shards(sizes, shard_bytes=shard_bytes)
    total, largest = sum(sizes), max(sizes, default=0)
    assert 1 <= n <= MAX_AUTO_SHARDS
    if shard_bytes is None or total == 0:
        assert n == 1
        return
    # about shard_bytes each: the nearest count, unless capped by the limit or the largest
    capped = n == MAX_AUTO_SHARDS or (n + 1) * largest > total
    assert 2 * total < (2 * n + 1) * shard_bytes or capped
    assert n == 1 or 2 * total >= (2 * n - 1) * shard_bytes
    # ... and none that the largest tensor alone would leave short of filling
    assert n == 1 or n * largest <= total
    # the greedy plan then keeps every shard within one tensor of the average
    plan = plan_save(sizes={i.to_bytes(2, "big"): s for i, s in enumerate(sizes)}, num_shards=n)
    assert max(plan.shard_bytes(i) for i in range(n)) <= total / n + largest


def test_auto_num_shards_examples() -> None:
    MiB = 1 << 20
    workload_a = [32 * MiB] * 4 + [16 * MiB] * 8  # 256 MiB, largest 32 MiB
    assert auto_num_shards(workload_a, shard_bytes=64 * MiB) == 4
    assert auto_num_shards([*workload_a, 1024], shard_bytes=64 * MiB) == 4  # not 5 for 1 KiB
    assert auto_num_shards([33 * MiB] * 3, shard_bytes=64 * MiB) == 2  # 99 MiB: 2 x 49.5
    assert auto_num_shards(workload_a, shard_bytes=None) == 1
    assert auto_num_shards([2048 * MiB] + [MiB] * 100, shard_bytes=64 * MiB) == 1  # one giant
    assert auto_num_shards([MiB] * 4096, shard_bytes=64 * MiB) == MAX_AUTO_SHARDS
    assert auto_num_shards([10 * MiB], shard_bytes=64 * MiB) == 1


# --- plan_reads ---------------------------------------------------------------------------------


@st.composite
def shard_layouts(draw: st.DrawFn) -> list[Placement]:
    """Wanted ranges as a real index gives them: disjoint per shard, some skipped, any order."""
    wanted = []
    number = 0
    for shard_id in range(draw(st.integers(1, 3))):
        offset = 0
        for gap, size, keep in draw(
            st.lists(
                st.tuples(st.integers(0, 300), st.integers(0, 200), st.booleans()), max_size=25
            )
        ):
            offset += gap
            if keep:
                wanted.append(Placement(f"t{number}".encode(), shard_id, offset, size))
            number += 1
            offset += size
    return draw(st.permutations(wanted))


def _check_groups(
    wanted: list[Placement], max_gap: int, max_group_bytes: int, *, disjoint_input: bool
) -> None:
    groups = plan_reads(wanted, max_gap=max_gap, max_group_bytes=max_group_bytes)
    members = [p for g in groups for p in g.members]
    assert Counter(members) == Counter(wanted)  # each wanted range in exactly one group
    assert [(g.shard_id, g.start) for g in groups] == sorted((g.shard_id, g.start) for g in groups)
    for g in groups:
        assert all(p.shard_id == g.shard_id for p in g.members)
        assert g.start == min(p.offset for p in g.members)
        assert g.end == max(p.offset + p.size for p in g.members)
        assert g.length == g.end - g.start
        assert g.length <= max_group_bytes or len(g.members) == 1
        end = g.members[0].offset + g.members[0].size
        for p in g.members[1:]:
            assert p.offset - end <= max_gap  # merged only across small gaps
            end = max(end, p.offset + p.size)
    for prev, nxt in itertools.pairwise(groups):
        if prev.shard_id != nxt.shard_id:
            continue
        if disjoint_input:
            assert prev.end <= nxt.start
        # a new group starts only when the gap is too wide or the merged group too big
        first = nxt.members[0]
        assert (
            first.offset - prev.end > max_gap
            or max(prev.end, first.offset + first.size) - prev.start > max_group_bytes
        )


@PROPERTIES
@given(
    wanted=shard_layouts(),
    max_gap=st.integers(0, 400),
    max_group_bytes=st.integers(1, 2000),
)
def test_plan_reads_covers_each_range_once(
    wanted: list[Placement], max_gap: int, max_group_bytes: int
) -> None:
    _check_groups(wanted, max_gap, max_group_bytes, disjoint_input=True)


@PROPERTIES
@given(
    wanted=st.lists(
        st.builds(
            Placement,
            key=st.binary(max_size=3),
            shard_id=st.integers(0, 2),
            offset=st.integers(0, 1000),
            size=st.integers(0, 300),
        ),
        max_size=30,
    ),
    max_gap=st.integers(0, 400),
    max_group_bytes=st.integers(1, 2000),
)
def test_plan_reads_tolerates_overlapping_ranges(
    wanted: list[Placement], max_gap: int, max_group_bytes: int
) -> None:
    _check_groups(wanted, max_gap, max_group_bytes, disjoint_input=False)


def test_plan_reads_merges_adjacent_and_splits_far() -> None:
    near = [Placement(f"n{i}".encode(), 0, 100 * i, 100) for i in range(50)]
    far = Placement(b"far", 0, 10**9, 10)
    other = Placement(b"other", 1, 0, 10)
    groups = plan_reads([*near, far, other], max_gap=0, max_group_bytes=10**6)
    assert [(g.shard_id, g.start, g.end, len(g.members)) for g in groups] == [
        (0, 0, 5000, 50),
        (0, 10**9, 10**9 + 10, 1),
        (1, 0, 10, 1),
    ]
    capped = plan_reads(near, max_gap=0, max_group_bytes=1000)
    assert [g.length for g in capped] == [1000] * 5


# --- plan_region vs numpy -------------------------------------------------------------------------


def _axis_item(draw: Callable[[Any], Any], size: int) -> Any:
    if size > 0 and draw(st.booleans()):
        return draw(st.integers(-size, size - 1))
    bound = st.none() | st.integers(-size - 3, size + 3)
    step = st.none() | st.integers(-4, 4).filter(bool)
    return slice(draw(bound), draw(bound), draw(step))


@st.composite
def shapes_and_indexes(draw: st.DrawFn) -> tuple[tuple[int, ...], Any]:
    shape = tuple(draw(st.lists(st.integers(0, 7), max_size=4)))
    leading = draw(st.integers(0, len(shape)))
    items = [_axis_item(draw, size) for size in shape[:leading]]
    if draw(st.booleans()):  # an Ellipsis, then items for some trailing axes
        trailing = draw(st.integers(0, len(shape) - leading))
        tail = shape[len(shape) - trailing :]
        items = [*items, Ellipsis, *(_axis_item(draw, size) for size in tail)]
    if len(items) == 1 and draw(st.booleans()):
        return shape, items[0]  # a bare item, not a tuple
    return shape, tuple(items)


@PROPERTIES
@given(case=shapes_and_indexes(), itemsize=st.sampled_from([1, 2, 8]))
def test_plan_region_matches_numpy(case: tuple[tuple[int, ...], Any], itemsize: int) -> None:
    shape, index = case
    dtype = {1: np.uint8, 2: np.int16, 8: np.int64}[itemsize]
    full = np.arange(math.prod(shape), dtype=dtype).reshape(shape)
    positions = np.arange(math.prod(shape)).reshape(shape)[index]
    expected = full[index]
    region = plan_region(shape, itemsize, index)
    assert region.result_shape == expected.shape
    if expected.size == 0:
        assert region.byte_length == 0
        return
    # the one contiguous span from the first to the last selected element, nothing more
    assert region.byte_start == int(positions.min()) * itemsize
    assert region.byte_start + region.byte_length == (int(positions.max()) + 1) * itemsize
    span = full.tobytes()[region.byte_start : region.byte_start + region.byte_length]
    box = np.lib.stride_tricks.as_strided(
        np.frombuffer(span, dtype=dtype),
        shape=region.box_shape,
        strides=region.box_strides,
        writeable=False,
    )
    result = box[region.inner_index]
    assert result.shape == expected.shape
    np.testing.assert_array_equal(result, expected)


@pytest.mark.parametrize(
    ("shape", "index"),
    [((4,), 4), ((4,), -5), ((2, 3), (0, 3)), ((2, 3), (0, 0, 0)), ((3,), (Ellipsis, Ellipsis))],
)
def test_plan_region_refuses_what_numpy_refuses(shape: tuple[int, ...], index: Any) -> None:
    with pytest.raises(IndexError):
        np.zeros(shape)[index]
    with pytest.raises(IndexError):
        plan_region(shape, 4, index)


def test_plan_region_cost_does_not_grow_with_the_extent() -> None:
    """A strided or reversed selection of a huge axis is planned from its ends, not walked.

    Walking it would be a C loop holding the GIL, which no pytest timeout can interrupt:
    faulthandler's watchdog (a C thread) ends the run instead.
    """
    faulthandler.dump_traceback_later(20, exit=True)
    try:
        _plan_huge_regions()
    finally:
        faulthandler.cancel_dump_traceback_later()


def _plan_huge_regions() -> None:
    shape = (2**62,)
    region = plan_region(shape, 1, np.s_[::3])
    assert (region.byte_start, region.byte_length) == (0, 3 * ((2**62 - 1) // 3) + 1)
    region = plan_region(shape, 1, np.s_[::-2])
    assert region.byte_start + region.byte_length == 2**62
    region = plan_region((2**31, 2**31), 4, np.s_[5:-5:7, ::-1])
    assert region.box_shape[1] == 2**31
