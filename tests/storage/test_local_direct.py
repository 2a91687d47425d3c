"""Local shards go to disk through the page cache (one writev per batch of views, writeback
started as they go), or for background saves with O_DIRECT through an aligned staging buffer.

The batching and short writes of the cached way, the staging, the padded tail cut back with
ftruncate, and the fall-backs to cached writes where a filesystem refuses O_DIRECT (at open,
or at the first aligned write) must all leave exactly the bytes that were streamed, and count
exactly those.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.injection import patch_local_os
from support.pagecache import direct_supported

import streamckpt.storage.local_writer as local
import streamckpt.sync
from streamckpt.storage.local import LocalStore
from streamckpt.storage.local_writer import DIRECT_ALIGN, LocalShardWriter
from streamckpt.storage.retry import StoreStats

O_DIRECT = getattr(os, "O_DIRECT", 0)
pytestmark = pytest.mark.skipif(not O_DIRECT, reason="O_DIRECT is Linux's")


class OsSpy:
    """The real ``os`` for the local store, recording open flags; may refuse O_DIRECT."""

    def __init__(self, *, refuse_open: bool = False, refuse_write: bool = False) -> None:
        self.refuse_open = refuse_open
        self.refuse_write = refuse_write
        self.flags: dict[str, int] = {}
        self.direct_fds: set[int] = set()
        self.refused_writes = 0

    def open(self, path: Any, flags: int, mode: int = 0o777) -> int:
        if self.refuse_open and flags & O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        fd = os.open(path, flags, mode)
        self.flags[os.fspath(path)] = flags
        if flags & O_DIRECT:
            self.direct_fds.add(fd)
        return fd

    def write(self, fd: int, data: Any) -> int:
        import fcntl

        if self.refuse_write and fcntl.fcntl(fd, fcntl.F_GETFL) & O_DIRECT:
            self.refused_writes += 1
            raise OSError(errno.EINVAL, "Invalid argument")
        return os.write(fd, data)

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


def stream_through_writer(
    path: Path, pieces: list[bytes], staging: int, *, direct: bool = True, batches: int = 0
) -> StoreStats:
    """``write`` each piece, or ``write_many`` them in ``batches`` runs of views."""
    stats = StoreStats()
    writer = LocalShardWriter(str(path), stats, staging=staging, direct=direct)
    views = [memoryview(piece) for piece in pieces]
    if batches:
        step = -(-len(views) // batches) or 1
        for start in range(0, len(views), step):
            writer.write_many(views[start : start + step])
    else:
        for view in views:
            writer.write(view)
    assert writer.bytes_written == sum(map(len, pieces))
    writer.commit()
    return stats


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    sizes=st.lists(st.integers(0, 3 * DIRECT_ALIGN + 7), max_size=8),
    staging=st.sampled_from([1, DIRECT_ALIGN, 2 * DIRECT_ALIGN + 1, 64 * 1024]),
    direct=st.booleans(),
    batches=st.integers(0, 3),
)
def test_writer_leaves_exactly_the_streamed_bytes(
    tmp_path: Path, sizes: list[int], staging: int, direct: bool, batches: int
) -> None:
    pieces = [os.urandom(n) for n in sizes]
    path = tmp_path / "shard"
    stats = stream_through_writer(path, pieces, staging, direct=direct, batches=batches)
    assert path.read_bytes() == b"".join(pieces)
    assert stats.bytes_written == sum(sizes)  # the padding is not counted


class ShortWritev(OsSpy):
    """writev that writes at most ``most`` bytes a call, as a signal or a full disk may."""

    def __init__(self, most: int) -> None:
        super().__init__()
        self.most = most
        self.calls = 0

    def writev(self, fd: int, buffers: Any) -> int:
        self.calls += 1
        data = b"".join(bytes(b) for b in buffers)[: self.most]
        return os.write(fd, data)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(sizes=st.lists(st.integers(0, 5000), max_size=12), most=st.integers(1, 9000))
def test_cached_writes_go_on_after_short_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sizes: list[int], most: int
) -> None:
    spy = ShortWritev(most)
    patch_local_os(monkeypatch, spy)
    pieces = [os.urandom(n) for n in sizes]
    path = tmp_path / "shard"
    stream_through_writer(path, pieces, DIRECT_ALIGN, direct=False, batches=2)
    assert path.read_bytes() == b"".join(pieces)
    assert spy.calls >= -(-sum(sizes) // most)


def test_cached_writes_start_the_writeback_of_each_written_stretch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every byte but the last stretch is handed to writeback once, in order, while writing:
    the final fsync has only that stretch left, and dirty memory stays bounded."""
    started: list[tuple[int, int]] = []
    monkeypatch.setattr(local, "WRITEBACK_STEP", 10_000)
    monkeypatch.setattr(local, "start_writeback", lambda fd, at, n: started.append((at, n)))
    pieces = [os.urandom(n) for n in (3000, 9000, 1, 25_000, 4000, 6999)]
    path = tmp_path / "shard"
    stream_through_writer(path, pieces, DIRECT_ALIGN, direct=False)
    assert started == [(0, 12_000), (12_000, 25_001), (37_001, 10_999)]
    assert path.read_bytes() == b"".join(pieces)


def test_the_writeback_hint_is_the_kernels_own() -> None:
    """The hint reaches sync_file_range on Linux (a bad descriptor is refused there, quietly:
    it is a hint), and is a no-op elsewhere."""
    local.start_writeback(-1, 0, 4096)
    if sys.platform.startswith("linux"):
        assert local._sync_file_range() is not None


@pytest.mark.parametrize("way", ["save", "direct_io", "background"])
def test_background_saves_write_direct_and_waited_ones_through_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, way: str
) -> None:
    """A save the caller waits for writes through the page cache (faster: writeback starts
    at once and runs beside the copies); a background save uses O_DIRECT (no kernel copy
    to take CPU from the training step), as does ``storage_options={"direct_io": True}``."""
    if way != "save" and not direct_supported(tmp_path):
        pytest.skip("this filesystem refuses O_DIRECT")
    spy = OsSpy()
    patch_local_os(monkeypatch, spy)
    tensors = {"a": np.arange(10_000, dtype=np.float32), "b": np.arange(7, dtype=np.int8)}
    prefix = tmp_path / "ckpt"
    if way == "background":
        with streamckpt.sync.Checkpoint(model=tensors) as checkpoint:
            checkpoint.write_async(prefix, num_shards=2).result()
    else:
        options = {"direct_io": True} if way == "direct_io" else None
        streamckpt.sync.save(
            prefix, tensors, num_shards=2, chunk_bytes=16 * 1024, storage_options=options
        )
    shards = {p: f for p, f in spy.flags.items() if ".data-" in p}
    assert len(shards) == 2
    assert all(bool(f & O_DIRECT) == (way != "save") for f in shards.values())
    index = [p for p in spy.flags if p.endswith(".index") or ".index.tmp" in p]
    assert index and not any(spy.flags[p] & O_DIRECT for p in index)  # small: cached
    loaded = streamckpt.sync.load(prefix)
    for name, value in tensors.items():
        key = f"model/{name}/.ATTRIBUTES/VARIABLE_VALUE" if way == "background" else name
        np.testing.assert_array_equal(loaded[key], value)


def test_direct_io_must_be_a_bool(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="direct_io"):
        streamckpt.sync.save(tmp_path / "c", {"a": np.ones(3)}, storage_options={"direct_io": 1})


@pytest.mark.parametrize("refusal", ["open", "write"])
def test_refused_direct_io_falls_back_to_cached_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refusal: str
) -> None:
    if refusal == "write" and not direct_supported(tmp_path):
        pytest.skip("this filesystem refuses O_DIRECT at open already")
    spy = OsSpy(refuse_open=refusal == "open", refuse_write=refusal == "write")
    patch_local_os(monkeypatch, spy)
    pieces = [os.urandom(n) for n in (5000, 3 * DIRECT_ALIGN, 11)]
    path = tmp_path / "shard"
    stats = stream_through_writer(path, pieces, staging=2 * DIRECT_ALIGN)
    assert path.read_bytes() == b"".join(pieces)
    assert stats.bytes_written == sum(map(len, pieces))
    if refusal == "write":
        assert spy.refused_writes == 1  # once refused, the file stays cached
    else:
        assert not spy.flags[str(path)] & O_DIRECT


def test_failed_direct_write_removes_the_partial_shard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class FailingOs(OsSpy):
        def write(self, fd: int, data: Any) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    patch_local_os(monkeypatch, FailingOs())
    path = tmp_path / "shard"
    writer = LocalShardWriter(str(path), StoreStats(), staging=DIRECT_ALIGN)
    with pytest.raises(OSError, match="No space left"):
        writer.write(memoryview(os.urandom(3 * DIRECT_ALIGN)))
    writer.abort()
    assert not path.exists()


def test_local_saves_write_a_few_files_at_once_within_the_budget() -> None:
    """Each local writer stages two write chunks: 64 shards at once would pin 1 GiB, and a
    small budget (``convert --budget-mib``) must bound the staging too."""
    assert LocalStore().plan_writers([1 << 28] * 64) == LocalStore.max_writers == 8
    assert LocalStore().plan_writers([1 << 28] * 3) == 3
    assert LocalStore(max_inflight_bytes=48 << 20).plan_writers([1 << 28] * 64) == 3
    assert LocalStore(max_inflight_bytes=1 << 20).plan_writers([1 << 28] * 64) == 1


@pytest.mark.parametrize("nbytes", [0, 1, (1 << 20) - 1, 1 << 20, (4 << 20) + 3, 9 << 20])
def test_fresh_buffers_are_zeroed_writable_and_exact(nbytes: int) -> None:
    """Small ones are bytearrays, large ones mappings (huge pages where offered): all alike."""
    from streamckpt.fileio import fresh_buffer

    buffer = fresh_buffer(nbytes)
    view = np.frombuffer(buffer, np.uint8)
    assert len(view) == nbytes and not view.any()
    view[:] = 7
    assert bytes(memoryview(buffer)[-1:]) == (b"\x07" if nbytes else b"")


def test_background_saves_ask_for_direct_io_on_local_paths_only() -> None:
    """A bucket's options are left as they are (gcsfs would refuse an unknown key), and a
    caller's own ``direct_io`` wins."""
    from streamckpt.storage import background_options, resolve

    assert background_options("/tmp/c", None, None) == {"direct_io": True}
    assert background_options("file:///tmp/c", {"x": 1}, None) == {"direct_io": True, "x": 1}
    assert background_options("/tmp/c", {"direct_io": False}, None) == {"direct_io": False}
    assert background_options("gs://b/c", {"token": "anon"}, None) == {"token": "anon"}
    assert background_options("/tmp/c", None, object()) is None
    store, _ = resolve("/tmp/c", storage_options={"direct_io": True, "token": "anon"})
    assert isinstance(store, LocalStore) and store.direct_io  # other keys: another store's
    assert not resolve("/tmp/c")[0].direct_io  # type: ignore[attr-defined]
