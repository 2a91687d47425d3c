"""Ranged reads only: a reader fetches the index pieces and byte ranges it needs, no more.

Requests are counted by a wrapper around a real fsspec filesystem (LocalFileSystem over the
test's temporary directory): every call that would be a request to an object store counts, and
so does every byte it returns. The planner of partial reads (``plan_region``) is checked
against numpy with hypothesis; the planners of ``pipeline/plan.py`` are in ``test_plan.py``.
"""

from __future__ import annotations

import faulthandler
import math
import os
import shutil
import threading
import time
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
from streamckpt.format.bundle import BundleEntry, BundleHeader
from streamckpt.format.crc import crc32c, mask
from streamckpt.format.dtypes import DataType, is_fixed_size, numpy_dtype
from streamckpt.format.index_file import encode_index
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
    assert region is not None
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
    assert region is not None
    assert (region.byte_start, region.byte_length) == (0, 3 * ((2**62 - 1) // 3) + 1)
    region = plan_region(shape, 1, np.s_[::-2])
    assert region is not None
    assert region.byte_start + region.byte_length == 2**62
    region = plan_region((2**31, 2**31), 4, np.s_[5:-5:7, ::-1])
    assert region is not None
    assert region.box_shape[1] == 2**31


@pytest.mark.parametrize(
    "index",
    [[0, 2], np.array([1, 0]), np.array([True, False, True]), True, (slice(None), [0]), None],
    ids=["list", "int-array", "bool-array", "bool", "list-in-tuple", "newaxis"],
)
def test_plan_region_has_no_plan_for_advanced_indexing(index: Any) -> None:
    """The reader then reads the whole tensor and lets numpy index it."""
    assert plan_region((3, 4), 4, index) is None


async def test_advanced_indexing_reads_the_whole_tensor(tmp_path: Path) -> None:
    prefix = str(tmp_path / "ckpt")
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    await streamckpt.save(prefix, {"a": array})
    for index in ([2, 0], np.array([True, False, True]), (slice(None), [3, 1])):
        got = await streamckpt.read_tensor(prefix, "a", index=index)
        np.testing.assert_array_equal(got, array[index])


# --- entries: built once per index ----------------------------------------------------------------


async def test_entries_are_built_once_and_follow_the_index(tmp_path: Path) -> None:
    """``Checkpoint.restore`` looks up every leaf in ``reader.entries``: rebuilding the dict
    per access made restoring n leaves cost n**2 (4,000 leaves: 135 s)."""
    prefix = str(tmp_path / "ckpt")
    count = 4000
    await streamckpt.save(prefix, {f"leaf/{i:05d}": np.float32(i) for i in range(count)})
    async with streamckpt.open(prefix, load_index=False, use_cache=False) as lazy:
        with pytest.raises(RuntimeError, match="not loaded"):
            _ = lazy.entries
        await lazy.load_index()  # the state changes under the reader: entries follow
        entries = lazy.entries
        assert len(entries) == count and lazy.entries is entries
        started = time.perf_counter()
        shards = [lazy.entries[f"leaf/{i:05d}"].shard for i in range(count)]
        assert time.perf_counter() - started < 0.5  # was ~count**2 / 2 TensorInfo builds
        assert shards == [0] * count
    async with streamckpt.open(prefix, load_index=False) as cached:
        async with streamckpt.open(prefix) as loaded:  # loads the shared cached state
            assert len(loaded.entries) == count
        assert len(cached.entries) == count  # seen by the reader opened before it
