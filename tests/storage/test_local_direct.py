"""Local shards go to disk with O_DIRECT through an aligned staging buffer.

The staging, the padded tail cut back with ftruncate, and the fall-backs to cached writes
where a filesystem refuses O_DIRECT (at open, or at the first aligned write) must all leave
exactly the bytes that were streamed, and count exactly those.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.pagecache import direct_supported

import streamckpt.storage.local as local
import streamckpt.sync
from streamckpt.storage.local import DIRECT_ALIGN, LocalShardWriter
from streamckpt.storage.retry import StoreStats

O_DIRECT = getattr(os, "O_DIRECT", 0)
pytestmark = pytest.mark.skipif(not O_DIRECT, reason="O_DIRECT is Linux's")


class OsSpy:
    """The real ``os`` for storage.local, recording open flags; may refuse O_DIRECT."""

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


def stream_through_writer(path: Path, pieces: list[bytes], staging: int) -> StoreStats:
    stats = StoreStats()
    writer = LocalShardWriter(str(path), stats, staging=staging)
    for piece in pieces:
        writer.write(memoryview(piece))
    writer.commit()
    return stats


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    sizes=st.lists(st.integers(0, 3 * DIRECT_ALIGN + 7), max_size=8),
    staging=st.sampled_from([1, DIRECT_ALIGN, 2 * DIRECT_ALIGN + 1, 64 * 1024]),
)
def test_direct_writer_leaves_exactly_the_streamed_bytes(
    tmp_path: Path, sizes: list[int], staging: int
) -> None:
    pieces = [os.urandom(n) for n in sizes]
    path = tmp_path / "shard"
    stats = stream_through_writer(path, pieces, staging)
    assert path.read_bytes() == b"".join(pieces)
    assert stats.bytes_written == sum(sizes)  # the padding is not counted


def test_shards_are_opened_direct_where_the_filesystem_allows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not direct_supported(tmp_path):
        pytest.skip("this filesystem refuses O_DIRECT")
    spy = OsSpy()
    monkeypatch.setattr(local, "os", spy)
    tensors = {"a": np.arange(10_000, dtype=np.float32), "b": np.arange(7, dtype=np.int8)}
    prefix = tmp_path / "ckpt"
    streamckpt.sync.save(prefix, tensors, num_shards=2, chunk_bytes=16 * 1024)
    shards = {p: f for p, f in spy.flags.items() if ".data-" in p}
    assert len(shards) == 2 and all(f & O_DIRECT for f in shards.values())
    index = [p for p in spy.flags if p.endswith(".index") or ".index.tmp" in p]
    assert index and not any(spy.flags[p] & O_DIRECT for p in index)  # small: cached
    assert sum(os.path.getsize(p) for p in shards) == 40_000 + 7
    loaded = streamckpt.sync.load(prefix)
    for name, value in tensors.items():
        np.testing.assert_array_equal(loaded[name], value)


@pytest.mark.parametrize("refusal", ["open", "write"])
def test_refused_direct_io_falls_back_to_cached_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refusal: str
) -> None:
    if refusal == "write" and not direct_supported(tmp_path):
        pytest.skip("this filesystem refuses O_DIRECT at open already")
    spy = OsSpy(refuse_open=refusal == "open", refuse_write=refusal == "write")
    monkeypatch.setattr(local, "os", spy)
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

    monkeypatch.setattr(local, "os", FailingOs())
    path = tmp_path / "shard"
    writer = LocalShardWriter(str(path), StoreStats(), staging=DIRECT_ALIGN)
    with pytest.raises(OSError, match="No space left"):
        writer.write(memoryview(os.urandom(3 * DIRECT_ALIGN)))
    writer.abort()
    assert not path.exists()


def test_local_saves_write_a_few_files_at_once_within_the_budget() -> None:
    """Each local writer stages two write chunks: 64 shards at once would pin 1 GiB, and a
    small budget (``convert --budget-mib``) must bound the staging too."""
    LocalStore = local.LocalStore
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
