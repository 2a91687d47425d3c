"""A whole load of a checkpoint with a large index reads its data files while the index decodes.

``streamckpt.pipeline.read_ahead`` reads every data file whole, several chunks at a time, and
``local_load`` checks each tensor's crc32c once its bytes are in. What must hold: the values
are exact whatever the chunking and whichever chunks were cached; a damaged checkpoint fails
as the async load does (class, message, URI, tensor, shard); a failing read fails the load
with the file, shard and offset, and leaves no thread and no descriptor behind; a data file
padded far past its tensors is not read whole.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.builders import flip
from support.injection import open_fds
from support.pagecache import evict

import streamckpt
import streamckpt.sync
from streamckpt import fileio
from streamckpt.pipeline import local_load, read_ahead

ALIGN = fileio.ALIGN


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 3 pages: many of them, out of order across the threads."""
    monkeypatch.setattr(read_ahead, "CHUNK", 3 * ALIGN)


@pytest.fixture
def always_ahead(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every whole load reads ahead; the list gets the prefix of each one that did."""
    monkeypatch.setattr(local_load, "READ_AHEAD_INDEX_BYTES", 0)
    taken: list[str] = []
    real = local_load.load_ahead

    def spy(prefix_path: str, index: Any) -> Any:
        taken.append(prefix_path)
        return real(prefix_path, index)

    monkeypatch.setattr(local_load, "load_ahead", spy)
    return taken


def many(rng: np.random.Generator, count: int = 300) -> dict[str, Any]:
    """Small tensors of mixed dtypes and sizes, some spanning several chunks, and strings."""
    tensors: dict[str, Any] = {}
    for i in range(count):
        n = int(rng.integers(0, 9000)) if i % 50 else int(rng.integers(20_000, 40_000))
        dtype = ("f4", "i8", "u1", "f2")[i % 4]
        tensors[f"layer{i // 10:02d}/p{i % 10}"] = rng.integers(0, 100, n).astype(dtype)
    tensors["names"] = np.array([b"x" * int(n) for n in rng.integers(0, 300, 9)], dtype=object)
    return tensors


def exact(loaded: dict[str, Any], tensors: dict[str, Any]) -> None:
    assert sorted(loaded) == sorted(tensors)
    for name, value in tensors.items():
        assert loaded[name].dtype == value.dtype and loaded[name].shape == value.shape, name
        assert loaded[name].tolist() == value.tolist(), name


def async_load(prefix: str) -> dict[str, np.ndarray[Any, Any]]:
    streamckpt.clear_index_cache()
    return anyio.run(lambda: streamckpt.load(prefix))


def reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("streamckpt-ahead")]


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("shards", [1, 3])
def test_a_large_index_loads_exactly_read_ahead(
    tmp_path: Path, always_ahead: list[str], shards: int
) -> None:
    prefix = str(tmp_path / "ckpt")
    tensors = many(np.random.default_rng(shards))
    streamckpt.sync.save(prefix, tensors, num_shards=shards)
    exact(streamckpt.sync.load(prefix), tensors)
    assert always_ahead == [prefix]
    assert reader_threads() == []


def test_the_default_threshold_reads_ahead_for_thousands_of_tensors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without forcing: 2,000 tensors read ahead, 20 do not, names given never do."""
    taken: list[str] = []
    real = local_load.load_ahead
    monkeypatch.setattr(local_load, "load_ahead", lambda p, i: taken.append(p) or real(p, i))
    rng = np.random.default_rng(0)
    big = {f"t{i:04d}": rng.standard_normal(int(rng.integers(1, 40))) for i in range(2000)}
    small = dict(list(big.items())[:20])
    for name, tensors in (("big", big), ("small", small)):
        streamckpt.sync.save(str(tmp_path / name), tensors)
        exact(streamckpt.sync.load(str(tmp_path / name)), tensors)
    exact(streamckpt.sync.load(str(tmp_path / "big"), names=list(small)), small)
    assert taken == [str(tmp_path / "big")]


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="evicts with posix_fadvise")
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    sizes=st.lists(st.integers(0, 5 * ALIGN), min_size=1, max_size=40),
    pages=st.integers(1, 4),
    cached=st.sets(st.integers(0, 40)),
)
def test_any_chunking_and_any_cached_chunks_read_the_same_bytes(
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
    sizes: list[int],
    pages: int,
    cached: set[int],
) -> None:
    """Chunks of 1 to 4 pages, an arbitrary set of them in the page cache, the rest cold."""
    monkeypatch.setattr(local_load, "READ_AHEAD_INDEX_BYTES", 0)
    monkeypatch.setattr(read_ahead, "CHUNK", pages * ALIGN)
    root = tmp_path_factory.mktemp("ahead")
    prefix = str(root / "ckpt")
    rng = np.random.default_rng(len(sizes))
    tensors = {f"t{i:02d}": rng.integers(0, 255, n, dtype=np.uint8) for i, n in enumerate(sizes)}
    streamckpt.sync.save(prefix, tensors)
    evict(root)
    shard = f"{prefix}.data-00000-of-00001"
    with open(shard, "rb") as f:
        for chunk in cached:
            f.seek(chunk * pages * ALIGN)
            f.read(1)  # that chunk's first page cached: read through the cache
    exact(streamckpt.sync.load(prefix), tensors)


# -- damage: failing as the async load does ---------------------------------------------------


def _shard(prefix: str, i: int = 0, n: int = 1) -> str:
    return f"{prefix}.data-{i:05d}-of-{n:05d}"


def _deepest(prefix: str) -> streamckpt.TensorInfo:
    return max(
        (i for i in streamckpt.sync.list_tensors(prefix).values() if i.name != "names"),
        key=lambda i: i.offset,
    )


def _failure(call: Any) -> streamckpt.StreamCkptError:
    with pytest.raises(streamckpt.StreamCkptError) as caught:
        call()
    return caught.value


@pytest.mark.usefixtures("small_chunks", "always_ahead")
@pytest.mark.parametrize("damage", ["flip", "truncate", "no shard", "empty shard"])
def test_damage_fails_as_the_async_load(tmp_path: Path, damage: str) -> None:
    prefix = str(tmp_path / "ckpt")
    streamckpt.sync.save(prefix, many(np.random.default_rng(7)))
    victim = _deepest(prefix)
    assert victim.offset > 10 * read_ahead.CHUNK  # many chunks before it
    if damage == "flip":
        flip(_shard(prefix), victim.offset + victim.size - 1)
    elif damage == "truncate":
        os.truncate(_shard(prefix), victim.offset + victim.size // 2)
    elif damage == "no shard":
        os.remove(_shard(prefix))
    else:
        os.truncate(_shard(prefix), 0)
    fds = open_fds()
    blocking = _failure(lambda: streamckpt.sync.load(prefix))
    looped = _failure(lambda: async_load(prefix))
    assert type(blocking) is type(looped), (blocking, looped)
    assert (blocking.uri, blocking.shard) == (looped.uri, looped.shard)
    if damage == "flip":
        assert blocking.tensor == looped.tensor == victim.name
        assert str(blocking) == str(looped)
    elif damage == "truncate":
        # the async load names the merged read that ran past the end; this names the tensor
        assert (blocking.tensor, blocking.offset) == (victim.name, victim.offset)
    assert open_fds() <= fds
    assert reader_threads() == []


@pytest.mark.usefixtures("small_chunks", "always_ahead")
@pytest.mark.parametrize("error", [errno.EIO, errno.ENOMEM])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_failing_chunk_read_names_file_shard_and_offset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: int, where: str
) -> None:
    """One chunk's read fails (the real file, the real reads around it): the load fails
    with that chunk's offset, and every reader thread and descriptor is gone."""
    prefix = str(tmp_path / "ckpt")
    streamckpt.sync.save(prefix, many(np.random.default_rng(2)), num_shards=2)
    shard = _shard(prefix, 1, 2)
    chunks = -(-os.path.getsize(shard) // read_ahead.CHUNK)
    bad = {"first": 0, "middle": chunks // 2, "last": chunks - 1}[where] * read_ahead.CHUNK
    real = fileio.CachedOrDirect.read

    def read(self: fileio.CachedOrDirect, offset: int, out: memoryview, *, aligned: bool) -> int:
        if self.path == shard and offset == bad:
            raise OSError(error, os.strerror(error), shard)
        return real(self, offset, out, aligned=aligned)

    monkeypatch.setattr(fileio.CachedOrDirect, "read", read)
    fds = open_fds()
    failed = _failure(lambda: streamckpt.sync.load(prefix))
    assert isinstance(failed, OSError) and failed.errno == error
    assert (failed.uri, failed.shard, failed.offset) == (shard, 1, bad)
    assert open_fds() <= fds
    assert reader_threads() == []


@pytest.mark.usefixtures("small_chunks", "always_ahead")
def test_a_failing_check_stops_the_reads_under_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crc mismatch in the first tensor while later chunks are slow to come: the load fails
    at once with it, the chunks not yet begun are never read."""
    prefix = str(tmp_path / "ckpt")
    streamckpt.sync.save(prefix, many(np.random.default_rng(4)))
    first = min(streamckpt.sync.list_tensors(prefix).values(), key=lambda i: i.offset)
    flip(_shard(prefix), first.offset)
    needed = -(-(first.offset + first.size) // read_ahead.CHUNK)  # chunks the check waits for
    reads: list[int] = []
    real = fileio.CachedOrDirect.read
    gate = threading.Event()

    def read(self: fileio.CachedOrDirect, offset: int, out: memoryview, *, aligned: bool) -> int:
        reads.append(offset)
        if offset >= needed * read_ahead.CHUNK:
            gate.wait(5)  # the later chunks wait until the load has failed
        return real(self, offset, out, aligned=aligned)

    monkeypatch.setattr(fileio.CachedOrDirect, "read", read)
    chunks = -(-os.path.getsize(_shard(prefix)) // read_ahead.CHUNK)
    timer = threading.Timer(0.5, gate.set)  # a broken cancel costs seconds, not a hang
    timer.start()
    try:
        failed = _failure(lambda: streamckpt.sync.load(prefix))
    finally:
        gate.set()
        timer.cancel()
    assert isinstance(failed, streamckpt.ChecksumError) and failed.tensor == first.name
    assert len(reads) <= needed + read_ahead.THREADS < chunks  # the queued ones: cancelled
    assert reader_threads() == []


def test_a_file_padded_far_past_its_tensors_is_not_read_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, always_ahead: list[str]
) -> None:
    """A shard with a 1 GiB hole after its tensors (nothing a save writes): the reads ahead
    stop, the planned reads take what the tensors need."""
    monkeypatch.setattr(read_ahead, "CHUNK", 64 * ALIGN)
    prefix = str(tmp_path / "ckpt")
    tensors = many(np.random.default_rng(5), count=60)
    streamckpt.sync.save(prefix, tensors)
    os.truncate(_shard(prefix), os.path.getsize(_shard(prefix)) + (1 << 30))
    planned: list[int] = []
    real = local_load.load_planned
    monkeypatch.setattr(local_load, "load_planned", lambda *a: planned.append(1) or real(*a))
    gate = threading.Event()
    real_read = fileio.CachedOrDirect.read

    def read(self: fileio.CachedOrDirect, offset: int, out: memoryview, *, aligned: bool) -> int:
        if self.path.endswith("-of-00001") and threading.current_thread().name.startswith(
            "streamckpt-ahead"
        ):
            gate.wait(5)  # the reads ahead stay under way until the load is done
        return real_read(self, offset, out, aligned=aligned)

    monkeypatch.setattr(fileio.CachedOrDirect, "read", read)
    timer = threading.Timer(0.5, gate.set)
    timer.start()
    try:
        exact(streamckpt.sync.load(prefix), tensors)
    finally:
        gate.set()
        timer.cancel()
    assert always_ahead == [prefix] and planned == [1]
    assert reader_threads() == []


@pytest.mark.usefixtures("always_ahead")
def test_partitioned_tensors_still_go_to_the_pipeline() -> None:
    """A TensorFlow checkpoint with partitioned variables: the read ahead gives up, the load
    assembles them as without it."""
    from support import TF_FIXTURES, load_manifest

    prefixes = [
        str(TF_FIXTURES / bundle["prefix"])
        for fixture in load_manifest()["fixtures"]
        for bundle in fixture["bundles"]
    ]
    partitioned = [
        p for p in prefixes if any(i.slices for i in streamckpt.sync.list_tensors(p).values())
    ]
    assert partitioned
    for prefix in partitioned:
        loaded = streamckpt.sync.load(prefix)
        looped = async_load(prefix)
        assert list(loaded) == list(looped)
        for name in loaded:
            assert loaded[name].tolist() == looped[name].tolist()
    assert reader_threads() == []


@pytest.mark.usefixtures("always_ahead")
@pytest.mark.parametrize("error", [errno.ENOMEM, errno.EACCES])
def test_a_file_whose_buffer_cannot_be_had(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: int
) -> None:
    """The buffer of the second data file cannot be mapped: for ENOMEM (a file larger than
    memory, a sparse one) the planned reads load it, taking what the tensors need; any other
    error fails the load naming that file. The descriptors of both files are closed."""
    prefix = str(tmp_path / "ckpt")
    tensors = many(np.random.default_rng(3))
    streamckpt.sync.save(prefix, tensors, num_shards=2)
    real = fileio.fresh_buffer
    calls: list[int] = []

    def fresh_buffer(nbytes: int, *, populate: bool = True) -> Any:
        calls.append(nbytes)
        if len(calls) == 2:
            raise OSError(error, os.strerror(error))
        return real(nbytes, populate=populate)

    monkeypatch.setattr(read_ahead, "fresh_buffer", fresh_buffer)
    planned: list[int] = []
    real_planned = local_load.load_planned
    monkeypatch.setattr(
        local_load, "load_planned", lambda *a: planned.append(1) or real_planned(*a)
    )
    fds = open_fds()
    if error == errno.ENOMEM:
        exact(streamckpt.sync.load(prefix), tensors)
        assert planned == [1]
    else:
        failed = _failure(lambda: streamckpt.sync.load(prefix))
        assert isinstance(failed, OSError) and failed.errno == error
        assert (failed.uri, failed.shard) == (_shard(prefix, 1, 2), 1)
    assert open_fds() <= fds
    assert reader_threads() == []
