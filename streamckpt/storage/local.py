"""Local disk through the os module.

Positional reads into caller buffers, large sequential writes, fsync, and the commit rule's
atomic publish (temp file, fsync, link or rename, fsync of the directory).

fsspec's local filesystem would work too, but it hides fsync and ``readinto``; on local disk
those are exactly where the time and the durability are.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import functools
import logging
import mmap
import os
import secrets
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import anyio.to_thread
import numpy as np

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None  # type: ignore[assignment]

from streamckpt.errors import SaveInProgressError, StorageError, TruncatedError
from streamckpt.fileio import (
    READ_CHUNK,
    CachedOrDirect,
    read_exact_into,
    read_span,
    refuse_past_end,
)
from streamckpt.storage.base import (
    Buffer,
    ByteBudget,
    ByteRange,
    ShardWriter,
    Store,
    check_length,
    map_errors,
)
from streamckpt.storage.claim import Claim, claim_record, describe_holder, parse_claim
from streamckpt.storage.retry import StoreStats

logger = logging.getLogger(__name__)

_O_BINARY = getattr(os, "O_BINARY", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
# Files we create are never opened through a symlink: a shard name planted as a link would
# send a checkpoint's bytes to a file outside its directory.
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
# fsync of a directory is refused by some filesystems as unsupported; the entries of such a
# filesystem are made durable by the fsync of the files themselves. Any other error is a
# failed fsync, and a failed fsync is a failed write ("fsyncgate"): its entries may never
# reach the disk.
_FSYNC_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP})


def open_for_writing(path: str, flags: int) -> int:
    """``os.open`` of a file we write; a symlink at ``path`` is refused with a clear error."""
    try:
        return os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP and _O_NOFOLLOW and os.path.islink(path):
            raise StorageError(
                "refusing to write through a symbolic link at this name: a checkpoint's files "
                "stay inside its directory (remove the link)",
                uri=path,
            ) from exc
        raise


def _close_quietly(fd: int) -> None:
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
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _O_BINARY | _O_NOFOLLOW | _O_CLOEXEC
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
                        _close_quietly(self._fd)
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
            _close_quietly(self._fd)  # the failure being handled is the one to report
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


class LocalClaim(Claim):
    """The claim file of a prefix, locked with ``flock`` for as long as the save runs.

    The lock is the claim (see ``streamckpt.storage.claim``): the kernel drops it when the
    process dies, so a crashed save's claim file is simply locked by the next save. The
    record inside only names the holder in messages.
    """

    def __init__(self, path: str, fd: int) -> None:
        super().__init__(path)
        self._path = path
        self._fd: int | None = fd

    @classmethod
    def take(cls, path: str) -> LocalClaim:
        """Lock the claim file, or raise SaveInProgressError naming its holder."""
        for _ in range(8):
            fd = open_for_writing(path, os.O_RDWR | os.O_CREAT | _O_NOFOLLOW | _O_CLOEXEC)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    held = parse_claim(os.pread(fd, 4096, 0))
                    raise SaveInProgressError(
                        f"another save of this prefix is running ({describe_holder(held)})",
                        uri=path,
                    ) from None
                # The lock is on this inode: it must still be the one at `path` (a holder
                # removes its file when it is done, before it unlocks).
                if not _same_file(fd, path):
                    _close_quietly(fd)
                    continue
            except BaseException:
                _close_quietly(fd)
                raise
            try:
                record = claim_record(secrets.token_hex(16), lease_s=0.0)
                os.ftruncate(fd, 0)
                os.pwrite(fd, record, 0)
            except BaseException:
                _unlink_twice(path)  # ours: it is locked
                _close_quietly(fd)
                raise
            return cls(path, fd)
        raise SaveInProgressError("other saves keep taking this prefix's claim", uri=path)

    async def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None

        def work() -> None:
            failure = _unlink_twice(self._path)  # removed while still locked, then unlocked
            _close_quietly(fd)
            if failure is not None:
                logger.warning(
                    "could not remove the claim file %s (harmless): %s", self._path, failure
                )

        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(work)


def _same_file(fd: int, path: str) -> bool:
    try:
        at_path = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (at_path.st_dev, at_path.st_ino)


class LocalStore(Store):
    """Paths are ordinary OS paths.

    ``stats.requests`` counts file reads (one per range) so that local reads can be compared
    with object-store requests.
    """

    def __init__(self, *, max_inflight_bytes: int = 1 << 62, direct_io: bool = False) -> None:
        self.stats = StoreStats()
        self.budget = ByteBudget(max_inflight_bytes)
        #: shards written with O_DIRECT (background saves: least CPU), else through the cache
        self.direct_io = direct_io

    def uri(self, path: str) -> str:
        return path

    supports_rename = True
    read_gap = 0
    # Several files written side by side beat one on local disk too: workload A (1 GiB in 200
    # tensors, durable) saved in a median 2.55 s as 1 shard and 1.91 s as 4 (5 alternating
    # runs on the benchmark VM; 8 shards no better than 4); 256 MiB a shard makes 4 of A, and
    # a checkpoint under 128 MiB stays one file.
    shard_bytes = 256 << 20

    # Shards written at once. Each writer holds two staging buffers of a write chunk (16 MiB
    # at the default 8 MiB chunk), so 64 at once, a 16 GiB checkpoint's count, would pin 1 GiB;
    # and a disk gains little past a few streams (workload A: 8 shards no faster than 4).
    max_writers = 8
    #: staging memory one writer holds at the default chunk (two alternating buffers)
    writer_bytes = 2 * (8 << 20)

    def plan_writers(self, sizes: Sequence[int]) -> int:
        """At most ``max_writers`` files at once, and no more than the budget's staging."""
        affordable = self.budget.total // self.writer_bytes
        return max(1, min(len(sizes), self.max_writers, affordable))

    async def rename(self, source: str, target: str) -> None:
        with map_errors(target):
            await anyio.to_thread.run_sync(os.replace, source, target)

    async def version(self, path: str) -> object:
        try:
            st = os.stat(path)  # one syscall; no thread hop for it
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def join(self, *parts: str) -> str:
        return os.path.join(*parts)

    def dirname(self, path: str) -> str:
        return os.path.dirname(path) or "."

    async def size(self, path: str) -> int:
        with map_errors(path):
            return (await anyio.to_thread.run_sync(os.stat, path)).st_size

    async def exists(self, path: str) -> bool:
        return await anyio.to_thread.run_sync(os.path.exists, path)

    async def read_range(self, path: str, start: int, end: int) -> Buffer:
        (buffer,) = await self.read_ranges(path, [ByteRange(start, end)])
        return buffer

    async def read_ranges(self, path: str, ranges: Sequence[ByteRange]) -> list[Buffer]:
        def work() -> list[Buffer]:
            results: list[Buffer] = []
            with map_errors(path):
                fd = os.open(path, os.O_RDONLY | _O_BINARY | _O_CLOEXEC)
                file = CachedOrDirect(fd, path)  # what the page cache lacks: O_DIRECT
                try:
                    size = os.fstat(fd).st_size
                    for r in ranges:
                        refuse_past_end(path, size, r.start, r.end)
                        data = read_span(file, r.start, r.end, chunk=READ_CHUNK)
                        self.stats.add(requests=1, bytes_read=len(data))
                        if len(data) != r.length:
                            check_length(data, r.length, uri=path, offset=r.start)
                        results.append(data)
                finally:
                    try:  # the plain descriptor goes even if the direct one fails to close
                        file.close()
                    finally:
                        os.close(fd)
            return results

        return await anyio.to_thread.run_sync(work)

    async def read_suffix(self, path: str, length: int) -> tuple[bytes, int | None]:
        def work() -> tuple[bytes, int | None]:
            with map_errors(path):
                fd = os.open(path, os.O_RDONLY | _O_BINARY | _O_CLOEXEC)
                try:
                    size = os.fstat(fd).st_size
                    start = max(0, size - length)
                    buf = bytearray(size - start)
                    got = read_exact_into(fd, start, memoryview(buf))
                    self.stats.add(requests=1, bytes_read=got)
                finally:
                    os.close(fd)
            return bytes(buf[:got]), size

        return await anyio.to_thread.run_sync(work)

    async def read_all(self, path: str) -> bytes:
        def work() -> bytes:
            with map_errors(path):
                fd = os.open(path, os.O_RDONLY | _O_BINARY | _O_CLOEXEC)
                try:
                    buf = bytearray(os.fstat(fd).st_size)
                    got = read_exact_into(fd, 0, memoryview(buf))
                    self.stats.add(requests=1, bytes_read=got)
                finally:
                    os.close(fd)
            del buf[got:]
            return bytes(buf)

        return await anyio.to_thread.run_sync(work)

    async def write_atomic(self, path: str, data: bytes, *, exclusive: bool) -> None:
        await anyio.to_thread.run_sync(
            functools.partial(write_file_atomic, exclusive=exclusive), path, data
        )

    def open_writer(self, path: str, *, chunk_bytes: int = 8 << 20) -> ShardWriter:
        return LocalShardWriter(path, self.stats, staging=chunk_bytes, direct=self.direct_io)

    async def claim(self, path: str) -> Claim:
        if fcntl is None:  # no flock here: a create-only file with a lease, as on object stores
            return await super().claim(path)
        with map_errors(path):
            return await anyio.to_thread.run_sync(LocalClaim.take, path)

    async def verify_upload(self, path: str, *, size: int, crc32c: int | None) -> None:
        """The file is still there with the size written (its bytes were fsync'd)."""
        found = await self.size(path)
        if found != size:
            raise TruncatedError(f"the file has {found} bytes, {size} were written", uri=path)

    async def delete(self, paths: Sequence[str]) -> None:
        def work() -> None:
            for path in paths:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    with map_errors(path):
                        raise exc

        await anyio.to_thread.run_sync(work)

    async def list_dir(self, path: str) -> list[str]:
        def work() -> list[str]:
            try:
                names = os.listdir(path)
            except FileNotFoundError:
                return []
            return [os.path.join(path, n) for n in sorted(names)]

        with map_errors(path):
            return await anyio.to_thread.run_sync(work)

    async def make_dirs(self, path: str) -> None:
        with map_errors(path):
            await anyio.to_thread.run_sync(lambda: os.makedirs(path, exist_ok=True))

    async def sync_dir(self, path: str) -> None:
        with map_errors(path):
            await anyio.to_thread.run_sync(_fsync_dir, path)


def write_file_atomic(path: str, data: bytes, *, exclusive: bool) -> None:
    """Publish ``data`` at ``path`` in one step: temp file, fsync, link or rename, dir fsync.

    The link (create-only) or rename is the commit point. Before it, any failure removes the
    temp file and leaves ``path`` as it was. After it, ``path`` is visible and whole: a
    failure there (removing the temp name, the directory's fsync) raises a StorageError that
    says so, and the caller must not take the object back (a save must not delete the shards
    an index it can no longer hide points to).
    """
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{secrets.token_hex(6)}")
    with map_errors(path):
        fd = open_for_writing(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_BINARY | _O_NOFOLLOW | _O_CLOEXEC
        )
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except BaseException:
                _close_quietly(fd)
                raise
            os.close(fd)
            if exclusive:
                os.link(tmp, path)  # atomic and create-only, unlike rename
            else:
                os.replace(tmp, path)
        except BaseException:
            _unlink_twice(tmp)
            raise
    # Committed: from here on nothing takes `path` back.
    leftover = _unlink_twice(tmp) if exclusive else None
    try:
        _fsync_dir(directory)
    except OSError as exc:
        _raise_after_commit(path, f"the fsync of its directory {directory}", exc, durable=False)
    if leftover is not None:
        _raise_after_commit(path, f"removing its temp name {tmp}", leftover, durable=True)


def _unlink_twice(path: str) -> OSError | None:
    """Remove ``path``, trying once more after a failure; the last failure, if both failed."""
    failure: OSError | None = None
    for _ in range(2):
        try:
            os.unlink(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            failure = exc
        else:
            return None
    return failure


def _raise_after_commit(path: str, what: str, cause: OSError, *, durable: bool) -> NoReturn:
    state = "it is durable" if durable else "it is not known to be durable"
    error = StorageError(
        f"committed: the object is in place and whole, but {what} failed ({cause}); {state}",
        uri=path,
    )
    error.errno = cause.errno
    raise error from cause


def _fsync_dir(directory: str) -> None:
    """Make a directory's entries durable; raise on failure, except where unsupported."""
    fd = os.open(directory, os.O_RDONLY | _O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _FSYNC_UNSUPPORTED:
            _close_quietly(fd)
            raise
    os.close(fd)
