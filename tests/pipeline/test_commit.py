"""Concurrent, committed, cleaned up: how a save reaches storage.

Every test runs against real storage: local disk through LocalStore (the default for plain
paths) and fsspec's ``memory://`` filesystem. Recording and fault injection wrap the real
thing: a delegating wrapper around the fsspec filesystem, and for LocalStore a stand-in for
the ``os`` module of the local store and its shard writer that performs every real syscall
and records it. No test asserts on timing: concurrency is shown with a barrier that only
opens when all four shard writers are open at once.
"""

from __future__ import annotations

import errno
import os
import threading
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import fsspec
import numpy as np
import pytest
from support.injection import patch_local_os

import streamckpt
import streamckpt.storage.local_writer
from streamckpt.errors import CheckpointExistsError, CheckpointNotFoundError, StorageError

pytestmark = pytest.mark.anyio

KiB = 1 << 10
MiB = 1 << 20
SHARDS = 4
BARRIER_TIMEOUT_S = 20

# (path, bytes of this write, bytes written before it, 1-based number of this write)
WriteHook = Callable[[str, int, int, int], None]


def shard_index(path: str) -> int | None:
    """Shard number of a ``.data-SSSSS-of-NNNNN`` path, None for any other file."""
    name = os.path.basename(path)
    if ".data-" not in name:
        return None
    return int(name.rsplit(".data-", 1)[1].split("-of-")[0])


class Recorder:
    """What reached storage, in order; shared by the fsspec wrapper and the syscall spy."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[tuple[str, str]] = []
        self.write_sizes: dict[str, list[int]] = {}
        self.direct: set[str] = set()  # files opened with O_DIRECT
        self.on_open: Callable[[str], None] | None = None
        self.on_write: WriteHook | None = None

    def reset(self) -> None:
        with self.lock:
            self.events.clear()
            self.write_sizes.clear()
            self.direct.clear()

    def record(self, kind: str, path: str) -> None:
        with self.lock:
            self.events.append((kind, path))

    def before_write(self, path: str, nbytes: int) -> None:
        with self.lock:
            sizes = self.write_sizes.setdefault(path, [])
            already = sum(sizes)
            sizes.append(nbytes)
            number = len(sizes)
        if self.on_write is not None:
            self.on_write(path, nbytes, already, number)

    def opened(self, path: str) -> None:
        self.record("open", path)
        if self.on_open is not None:
            self.on_open(path)

    def position(self, kind: str, path: str) -> int:
        return self.events.index((kind, path))

    @property
    def largest_write(self) -> int:
        return max(max(sizes) for sizes in self.write_sizes.values())


# --- fsspec: a wrapper around a real filesystem ----------------------------------------------


class RecordingFile:
    def __init__(self, recorder: Recorder, path: str, inner: Any) -> None:
        self._recorder = recorder
        self._path = path
        self._inner = inner

    def write(self, data: Any) -> int:
        self._recorder.before_write(self._path, memoryview(data).nbytes)
        written: int = self._inner.write(data)
        return written

    def close(self) -> None:
        self._inner.close()
        self._recorder.record("close", self._path)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class RecordingFileSystem:
    """Delegates everything to a real fsspec filesystem; records writes, closes and puts."""

    def __init__(self, inner: Any, recorder: Recorder) -> None:
        self._inner = inner
        self.recorder = recorder

    def open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        inner = self._inner.open(path, mode, **kwargs)
        if "r" in mode:
            return inner
        stripped = self._inner._strip_protocol(path)
        self.recorder.opened(stripped)
        return RecordingFile(self.recorder, stripped, inner)

    def pipe_file(self, path: str, value: bytes, *args: Any, **kwargs: Any) -> Any:
        self.recorder.record("put", self._inner._strip_protocol(path))
        return self._inner.pipe_file(path, value, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


# --- local disk: the os module of LocalStore, recorded ---------------------------------------


class SyscallSpy:
    """Stands in for ``os`` of the local store's modules: real syscalls, recorded."""

    def __init__(self, recorder: Recorder) -> None:
        self._recorder = recorder
        self._paths: dict[int, str] = {}

    def open(self, path: Any, flags: int, mode: int = 0o777) -> int:
        fd = os.open(path, flags, mode)
        text = os.fspath(path)
        self._paths[fd] = text
        if flags & (os.O_WRONLY | os.O_RDWR):
            if flags & getattr(os, "O_DIRECT", 0):
                self._recorder.direct.add(text)
            self._recorder.opened(text)
        return fd

    def write(self, fd: int, data: Any) -> int:
        path = self._paths.get(fd, "")
        self._recorder.before_write(path, memoryview(data).nbytes)
        return os.write(fd, data)

    def writev(self, fd: int, buffers: Any) -> int:
        path = self._paths.get(fd, "")
        self._recorder.before_write(path, sum(memoryview(b).nbytes for b in buffers))
        return os.writev(fd, buffers)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)
        self._recorder.record("fsync", self._paths.get(fd, ""))

    def close(self, fd: int) -> None:
        # forget the fd before the kernel may hand its number to another thread's open()
        path = self._paths.pop(fd, "")
        os.close(fd)
        self._recorder.record("close", path)

    def link(self, src: str, dst: str) -> None:
        os.link(src, dst)
        self._recorder.record("put", dst)

    def replace(self, src: str, dst: str) -> None:
        os.replace(src, dst)
        self._recorder.record("put", dst)

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


# --- one fixture, two backends ---------------------------------------------------------------


class Backend:
    """Where a test's checkpoints live, and how the recorded save reaches them."""

    def __init__(self, kind: str, root: str, recorder: Recorder) -> None:
        self.kind = kind
        self.root = root
        self.recorder = recorder
        self.fs = fsspec.filesystem("memory") if kind == "memory" else None

    def prefix(self, name: str) -> str:
        return f"memory://{self.root}/{name}" if self.kind == "memory" else f"{self.root}/{name}"

    def path(self, name: str) -> str:
        """The path storage calls use (what the recorder sees)."""
        return f"{self.root}/{name}"

    async def save_recorded(self, name: str, tensors: dict[str, Any], **kwargs: Any) -> Any:
        """A save whose storage calls go through the recorder, which starts out empty."""
        self.recorder.reset()
        if self.kind == "memory":
            wrapper = RecordingFileSystem(self.fs, self.recorder)
            return await streamckpt.save(self.prefix(name), tensors, filesystem=wrapper, **kwargs)
        return await streamckpt.save(self.prefix(name), tensors, **kwargs)

    async def save_plain(self, name: str, tensors: dict[str, Any], **kwargs: Any) -> Any:
        return await streamckpt.save(self.prefix(name), tensors, **kwargs)

    def files(self) -> list[str]:
        """Every file under the root, as basenames (temporary files included)."""
        if self.kind == "memory":
            assert self.fs is not None
            if not self.fs.exists(self.root):
                return []
            return sorted(os.path.basename(p) for p in self.fs.find(self.root))
        return sorted(os.listdir(self.root))


@pytest.fixture(params=["local", "memory"])
def backend(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Backend]:
    recorder = Recorder()
    if request.param == "local":
        patch_local_os(monkeypatch, SyscallSpy(recorder))
        yield Backend("local", str(tmp_path), recorder)
        return
    root = f"/streamckpt-test-commit-{uuid.uuid4().hex}"
    yield Backend("memory", root, recorder)
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


def tensors(
    seed: int, *, count: int = 8, elements: int = 64 * KiB
) -> dict[str, np.ndarray[Any, Any]]:
    """Distinct contents per seed: a checkpoint from one seed never equals another's."""
    rng = np.random.default_rng(seed)
    return {
        f"layer{i}/w": rng.integers(0, 2**31, size=elements + 17 * i, dtype=np.int32)
        for i in range(count)
    }


async def assert_loads(prefix: str, expected: dict[str, np.ndarray[Any, Any]]) -> None:
    loaded = await streamckpt.load(prefix)
    assert sorted(loaded) == sorted(expected)
    for name, value in expected.items():
        assert loaded[name].dtype == value.dtype
        assert loaded[name].tobytes() == value.tobytes(), name


def size_of(path: str) -> int:
    return os.path.getsize(path)


def files_of(prefix_name: str, files: list[str]) -> list[str]:
    return [f for f in files if f.startswith(prefix_name + ".")]


# --- concurrency, chunking, commit order --------------------------------------------------------


async def test_shards_are_written_concurrently(backend: Backend) -> None:
    """Every shard writer blocks until all four are open: a sequential save could not pass."""
    barrier = threading.Barrier(SHARDS, timeout=BARRIER_TIMEOUT_S)
    opened: list[int] = []

    def on_open(path: str) -> None:
        shard = shard_index(path)
        if shard is not None:
            opened.append(shard)
            barrier.wait()

    backend.recorder.on_open = on_open
    arrays = tensors(1)
    await backend.save_recorded("ckpt", arrays, num_shards=SHARDS)
    assert sorted(opened) == list(range(SHARDS))
    assert not barrier.broken
    await assert_loads(backend.prefix("ckpt"), arrays)


async def test_writes_are_bounded_chunks(backend: Backend) -> None:
    chunk = 64 * KiB
    arrays = tensors(2, count=6, elements=200 * KiB)  # 800 KiB+ each: many chunks per tensor
    await backend.save_recorded("ckpt", arrays, num_shards=SHARDS, chunk_bytes=chunk)
    shard_writes = {
        p: s for p, s in backend.recorder.write_sizes.items() if shard_index(p) is not None
    }
    assert len(shard_writes) == SHARDS
    total = sum(a.nbytes for a in arrays.values())
    direct = backend.recorder.direct & set(shard_writes)
    assert max(max(s) for s in shard_writes.values()) <= chunk
    assert sum(len(s) for s in shard_writes.values()) >= total // chunk
    sizes = [backend.fs.size(p) if backend.fs else size_of(p) for p in shard_writes]
    assert sum(sizes) == total
    if direct := backend.recorder.direct & set(shard_writes):
        # O_DIRECT: whole aligned blocks staged in a chunk-sized buffer; the padded tail is cut
        # off again, so the files hold exactly the payload bytes.
        assert direct == set(shard_writes)
        align = streamckpt.storage.local_writer.DIRECT_ALIGN
        assert all(n % align == 0 for s in shard_writes.values() for n in s)
        assert sum(sum(s) for s in shard_writes.values()) < total + SHARDS * align
    else:
        assert sum(sum(s) for s in shard_writes.values()) == total
    await assert_loads(backend.prefix("ckpt"), arrays)


async def test_index_is_written_after_every_shard_is_complete(backend: Backend) -> None:
    await backend.save_recorded("ckpt", tensors(3), num_shards=SHARDS)
    events = backend.recorder.events
    index_puts = [
        i for i, (kind, path) in enumerate(events) if kind == "put" and path.endswith(".index")
    ]
    assert len(index_puts) == 1
    index_at = index_puts[0]
    # the index's temporary file (local) is opened only after the shards are done, too
    index_opens = [
        i for i, (kind, path) in enumerate(events) if kind == "open" and ".index" in path
    ]
    first_index_event = min([index_at, *index_opens])
    for shard in range(SHARDS):
        path = backend.path(f"ckpt.data-{shard:05d}-of-{SHARDS:05d}")
        closed = backend.recorder.position("close", path)
        assert closed < first_index_event, (shard, events)
        if backend.kind == "local":
            assert backend.recorder.position("fsync", path) < closed  # durable before commit


async def test_big_tensor_is_streamed_not_copied(tmp_path: Path) -> None:
    """A 256 MiB tensor saved to local disk: traced allocations stay a few chunks' worth."""
    big = np.zeros(256 * MiB, dtype=np.uint8)
    big[:: 4 * MiB] = 7  # touches a few pages only; zeros elsewhere
    prefix = str(tmp_path / "big")
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        await streamckpt.save(prefix, {"big": big, "small": np.arange(10)}, chunk_bytes=8 * MiB)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 40 * MiB, f"save of a 256 MiB tensor allocated {peak / MiB:.0f} MiB"
    assert size_of(prefix + ".data-00000-of-00001") == big.nbytes + 80
    tail = await streamckpt.read_tensor(prefix, "big", index=np.s_[-4 * MiB - 2 :])
    np.testing.assert_array_equal(tail, big[-4 * MiB - 2 :])
    for name in os.listdir(tmp_path):
        os.unlink(tmp_path / name)


# --- failure and cancellation clean up, and spare earlier checkpoints -----------------------------


def fail_third_write_of_shard_2(path: str, nbytes: int, already: int, number: int) -> None:
    if shard_index(path) == 2 and number == 3:
        raise OSError(errno.EIO, "injected write failure")


@pytest.mark.parametrize("same_prefix", [False, True], ids=["other-prefix", "overwrite"])
async def test_failed_save_cleans_up(backend: Backend, same_prefix: bool) -> None:
    old = tensors(10, count=5)
    await backend.save_plain("old", old, num_shards=SHARDS)
    old_files = backend.files()
    new_name = "old" if same_prefix else "new"
    backend.recorder.on_write = fail_third_write_of_shard_2
    with pytest.raises(StorageError) as info:
        await backend.save_recorded(
            new_name, tensors(11), num_shards=SHARDS, chunk_bytes=16 * KiB, overwrite=same_prefix
        )
    assert isinstance(info.value, OSError)
    assert info.value.uri is not None
    shard_2 = f"{new_name}.data-00002-of-{SHARDS:05d}"
    assert shard_2 in info.value.uri  # (staged under a temporary name when overwriting locally)
    assert "injected write failure" in str(info.value)
    # the failing shard really was mid-stream, and the others had started too
    written = [s for p, s in backend.recorder.write_sizes.items() if shard_2 in p]
    assert [len(s) for s in written] == [3]
    if same_prefix and backend.kind != "local":
        # Without rename, overwrite=True invalidates the old checkpoint first (the new shards
        # reuse its data file names): after a failed overwrite the prefix holds nothing, never
        # a mix of old index and new data. Local disk stages the new shards instead.
        assert backend.files() == []
        with pytest.raises(CheckpointNotFoundError):
            await streamckpt.load(backend.prefix("old"))
    else:
        assert backend.files() == old_files
        await assert_loads(backend.prefix("old"), old)


@pytest.mark.parametrize("same_prefix", [False, True], ids=["other-prefix", "overwrite"])
async def test_cancelled_save_cleans_up(backend: Backend, same_prefix: bool) -> None:
    old = tensors(20, count=5)
    await backend.save_plain("old", old, num_shards=SHARDS)
    old_files = backend.files()
    new_name = "old" if same_prefix else "new"
    arrays = tensors(21)
    cancelled_at: list[int] = []

    token = anyio.lowlevel.current_token()  # local disk writes from a thread of its own

    with anyio.CancelScope() as scope:

        def cancel_halfway(path: str, nbytes: int, already: int, number: int) -> None:
            if shard_index(path) == 1 and already >= 256 * KiB and not cancelled_at:
                cancelled_at.append(already)
                anyio.from_thread.run_sync(scope.cancel, token=token)

        backend.recorder.on_write = cancel_halfway
        await backend.save_recorded(
            new_name, arrays, num_shards=SHARDS, chunk_bytes=16 * KiB, overwrite=same_prefix
        )
    assert scope.cancelled_caught
    assert cancelled_at, "the hook never fired"
    # shard 1 holds two tensors of about 256 KiB each: it was cancelled about halfway
    invalidated = same_prefix and backend.kind != "local"  # see test_failed_save_cleans_up
    assert backend.files() == ([] if invalidated else old_files)
    if not invalidated:
        await assert_loads(backend.prefix("old"), old)
    else:
        with pytest.raises(CheckpointNotFoundError):
            await streamckpt.load(backend.prefix("old"))
    # a later save to the same prefix works: nothing stale is left in the way
    await backend.save_plain(new_name, arrays, num_shards=SHARDS, overwrite=same_prefix)
    await assert_loads(backend.prefix(new_name), arrays)


async def test_save_onto_existing_checkpoint_is_refused(backend: Backend) -> None:
    old = tensors(30, count=4)
    await backend.save_plain("ckpt", old, num_shards=2)
    before = backend.files()
    with pytest.raises(CheckpointExistsError) as info:
        await backend.save_recorded("ckpt", tensors(31), num_shards=2)
    assert isinstance(info.value, FileExistsError)
    assert info.value.uri is not None and info.value.uri.endswith("ckpt.index")
    assert backend.recorder.write_sizes == {}  # not one byte was written
    assert not [e for e in backend.recorder.events if e[0] == "open"]
    assert backend.files() == before
    await assert_loads(backend.prefix("ckpt"), old)


async def test_overwrite_replaces_checkpoint(backend: Backend) -> None:
    await backend.save_plain("ckpt", tensors(40), num_shards=SHARDS)
    new = tensors(41, count=3)
    await backend.save_recorded("ckpt", new, num_shards=SHARDS, overwrite=True)
    await assert_loads(backend.prefix("ckpt"), new)
    assert files_of("ckpt", backend.files()) == sorted(
        [*(f"ckpt.data-{i:05d}-of-00004" for i in range(SHARDS)), "ckpt.index"]
    )
