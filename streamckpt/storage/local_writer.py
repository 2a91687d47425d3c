"""A shard file on local disk, and how its bytes reach the disk.

Rule: every file a checkpoint writes on local disk is opened here (``open_for_writing``:
never through a symlink); a shard's bytes go through the page cache with their writeback
started as they are written, or with O_DIRECT from aligned staging (``LocalShardWriter``).
The store around it (``storage.local``) reads, publishes and claims.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import mmap
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None  # type: ignore[assignment]

from streamckpt.errors import StorageError
from streamckpt.storage.base import ShardWriter, map_errors
from streamckpt.storage.retry import StoreStats

O_BINARY = getattr(os, "O_BINARY", 0)
O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
# Files we create are never opened through a symlink: a shard name planted as a link would
# send a checkpoint's bytes to a file outside its directory.
O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def open_for_writing(path: str, flags: int) -> int:
    """``os.open`` of a file we write; a symlink at ``path`` is refused with a clear error."""
    try:
        return os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP and O_NOFOLLOW and os.path.islink(path):
            raise StorageError(
                "refusing to write through a symbolic link at this name: a checkpoint's files "
                "stay inside its directory (remove the link)",
                uri=path,
            ) from exc
        raise


def close_quietly(fd: int) -> None:
    """Close an fd on a path that is already failing (the fd is released even on EIO)."""
    with contextlib.suppress(OSError):
        os.close(fd)


# How shard bytes reach the disk. A save the caller waits for writes through the page cache:
# the caller's arrays go to the kernel in one writev per batch (no copy of our own), and the
# writeback of each written stretch starts at once (sync_file_range), so the disk works
# while we copy and the final fsync has little left, dirty memory stays bounded, and no
# throttling stalls a large save. On the benchmark VM that saved workload A 1.9x and B
# 1.1x faster than O_DIRECT (README, "Use"). A background save asks for O_DIRECT
# (``direct_io``): the page cache's copy and its writeback cost kernel CPU (0.35 s a GiB
# here, against 0.09 s direct), and that CPU is taken from the training step the save runs
# beside. Direct bytes are staged in an aligned buffer of about one write chunk (so writes
# stay the bounded chunks the pipeline asks for), so any caller memory works.
_O_DIRECT = getattr(os, "O_DIRECT", 0)
DIRECT_ALIGN = 4096
# below this, a copy into the staging is a slice assignment, above it numpy's (without the GIL)
_COPY_WITHOUT_GIL = 1 << 20
# writev takes at most this many buffers a call
_IOV_MAX = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 16, 1024)
# a written stretch of the file this long has its writeback started
WRITEBACK_STEP = 8 << 20


def _writev(fd: int, buffers: list[memoryview]) -> int:
    """``os.writev``; one ``write`` where the platform has none (its callers go on after it)."""
    if hasattr(os, "writev"):
        return os.writev(fd, buffers)
    for buffer in buffers:
        if buffer:
            return os.write(fd, buffer)
    return 0


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a stretch of a file back, without waiting.

    Linux's ``sync_file_range(SYNC_FILE_RANGE_WRITE)``, which Python's os module lacks. A hint:
    where it is missing or fails, the final fsync writes everything back as it would anyway.
    """
    call = _sync_file_range()
    if call is not None:
        call(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


_SYNC_FILE_RANGE_WRITE = 2
_SYNC_FILE_RANGE: list[Any] = []


def _sync_file_range() -> Any:
    """The C library's sync_file_range, looked up once (ctypes loads on a save's first file)."""
    if not _SYNC_FILE_RANGE:
        found = None
        if sys.platform.startswith("linux"):
            import ctypes

            try:
                found = ctypes.CDLL(None, use_errno=True).sync_file_range
            except (OSError, AttributeError):
                pass
            else:
                found.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
                found.restype = ctypes.c_int
        _SYNC_FILE_RANGE.append(found)
    return _SYNC_FILE_RANGE[0]


class LocalShardWriter(ShardWriter):
    """A shard file, written through the page cache or, with ``direct``, through O_DIRECT.

    Direct: two staging buffers alternate; while one is written (a worker thread of this
    writer, started when the first buffer fills, so small shards never start it), the next
    is filled, so the copies and crc32c of the pipeline overlap the disk's writes. A
    filesystem that refuses O_DIRECT (at open or at the first write) gets cached writes.
    """

    def __init__(
        self, path: str, stats: StoreStats, *, staging: int = 8 << 20, direct: bool = True
    ) -> None:
        self._path = path
        self._stats = stats
        self._closed = False
        self._staging: mmap.mmap | None = None
        self._spare: mmap.mmap | None = None
        self._writing: concurrent.futures.Future[None] | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._written_back = 0  # cached writes: where the last started writeback ended
        self.bytes_written = 0
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | O_BINARY | O_NOFOLLOW | O_CLOEXEC
        with map_errors(path):
            if direct and _O_DIRECT:
                try:
                    self._fd = open_for_writing(path, flags | _O_DIRECT)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:  # EINVAL: this filesystem has no O_DIRECT
                        raise
                else:
                    try:
                        self._capacity = -(-staging // DIRECT_ALIGN) * DIRECT_ALIGN
                        self._staging = mmap.mmap(-1, self._capacity)  # page-aligned
                    except BaseException:
                        close_quietly(self._fd)
                        raise
                    self._stage = np.frombuffer(self._staging, np.uint8)
                    self._view = memoryview(self._staging)
                    self._filled = 0
                    return
            self._fd = open_for_writing(path, flags)

    def write(self, chunk: memoryview) -> None:
        self.write_many((chunk,))

    def write_many(self, chunks: Sequence[memoryview]) -> None:
        chunks = [c if c.format == "B" and c.ndim == 1 else c.cast("B") for c in chunks]
        size = sum(c.nbytes for c in chunks)
        if self._staging is None:
            self._write_through(chunks)
        else:
            for chunk in chunks:
                self._stage_bytes(chunk)
        self.bytes_written += size
        self._stats.add(bytes_written=size)

    def _stage_bytes(self, chunk: memoryview) -> None:
        """Copy into the staging buffer, handing each one that fills to the disk."""
        while chunk:
            n = min(len(chunk), self._capacity - self._filled)
            if n < _COPY_WITHOUT_GIL:  # a small payload: the copy costs less than numpy's call
                self._view[self._filled : self._filled + n] = chunk[:n]
            else:
                np.copyto(
                    self._stage[self._filled : self._filled + n], np.frombuffer(chunk[:n], np.uint8)
                )
            self._filled += n
            chunk = chunk[n:]
            if self._filled == self._capacity:
                self._hand_off()

    def _write_through(self, chunks: list[memoryview]) -> None:
        """Cached writes: ``writev`` straight from the chunks, then start their writeback."""
        with map_errors(self._path):
            for first in range(0, len(chunks), _IOV_MAX):
                batch = chunks[first : first + _IOV_MAX]
                at = 0
                while at < len(batch):
                    n = _writev(self._fd, batch[at:] if at else batch)
                    if not n and any(batch[at:]):
                        raise OSError(errno.EIO, "writev wrote nothing", self._path)
                    while at < len(batch) and n >= len(batch[at]):  # short writes go on
                        n -= len(batch[at])
                        at += 1
                    if n:
                        batch[at] = batch[at][n:]
        written = self.bytes_written + sum(len(c) for c in chunks)
        if written - self._written_back >= WRITEBACK_STEP:
            start_writeback(self._fd, self._written_back, written - self._written_back)
            self._written_back = written

    def _hand_off(self) -> None:
        """Start writing the full staging buffer in the background; go on in the other."""
        self._wait()
        full = self._staging
        assert full is not None
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="streamckpt-write"
            )
            self._spare = mmap.mmap(-1, self._capacity)
        self._writing = self._executor.submit(self._write_all, memoryview(full))
        empty = self._spare
        assert empty is not None
        self._staging, self._spare = empty, full
        self._stage = np.frombuffer(empty, np.uint8)
        self._view = memoryview(empty)
        self._filled = 0

    def _wait(self) -> None:
        """Wait for the background write in flight; raise what it raised."""
        if self._writing is not None:
            writing, self._writing = self._writing, None
            writing.result()

    def _write_all(self, chunk: memoryview) -> None:
        with map_errors(self._path):
            while chunk:
                try:
                    n = os.write(self._fd, chunk)
                except OSError as exc:
                    if exc.errno != errno.EINVAL or not self._direct_off():
                        raise
                    continue  # the filesystem refused the alignment: go on through the cache
                chunk = chunk[n:]

    def _direct_off(self) -> bool:
        """Switch the file to cached writes; ``False`` if it was not in direct mode."""
        assert fcntl is not None  # POSIX only, as O_DIRECT is
        flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
        if not flags & _O_DIRECT:
            return False
        fcntl.fcntl(self._fd, fcntl.F_SETFL, flags & ~_O_DIRECT)
        return True

    def commit(self) -> None:
        self._wait()
        with map_errors(self._path):
            if self._staging is not None and self._filled:
                # The tail goes out padded to the alignment, then the file is cut to size.
                size = os.lseek(self._fd, 0, os.SEEK_CUR) + self._filled
                padded = -(-self._filled // DIRECT_ALIGN) * DIRECT_ALIGN
                self._stage[self._filled : padded] = 0
                self._write_all(memoryview(self._staging)[:padded])
                os.ftruncate(self._fd, size)
            os.fsync(self._fd)
            self._closed = True
            os.close(self._fd)
        self._release()

    def abort(self) -> None:
        with contextlib.suppress(BaseException):
            self._wait()  # the fd must outlive the write in flight
        if not self._closed:
            self._closed = True
            close_quietly(self._fd)  # the failure being handled is the one to report
        with contextlib.suppress(OSError):
            os.unlink(self._path)
        self._release()

    def _release(self) -> None:
        # Dropped, not closed: a failed write's traceback may still hold a view of them.
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._staging is not None:
            del self._stage, self._view
            self._staging = self._spare = None
