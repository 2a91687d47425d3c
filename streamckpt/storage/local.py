"""Local disk through the os module.

Positional reads into caller buffers, fsync, and the commit rule's atomic publish (temp file,
fsync, link or rename, fsync of the directory); a shard's writes are ``storage.local_writer``'s.

fsspec's local filesystem would work too, but it hides fsync and ``readinto``; on local disk
those are exactly where the time and the durability are.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import secrets
from collections.abc import Sequence
from typing import NoReturn

import anyio.to_thread

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
from streamckpt.storage.local_writer import (
    O_BINARY,
    O_CLOEXEC,
    O_NOFOLLOW,
    LocalShardWriter,
    close_quietly,
    open_for_writing,
)
from streamckpt.storage.retry import StoreStats

logger = logging.getLogger(__name__)

# fsync of a directory is refused by some filesystems as unsupported; the entries of such a
# filesystem are made durable by the fsync of the files themselves. Any other error is a
# failed fsync, and a failed fsync is a failed write ("fsyncgate"): its entries may never
# reach the disk.
_FSYNC_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP})


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
            fd = open_for_writing(path, os.O_RDWR | os.O_CREAT | O_NOFOLLOW | O_CLOEXEC)
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
                    close_quietly(fd)
                    continue
            except BaseException:
                close_quietly(fd)
                raise
            try:
                record = claim_record(secrets.token_hex(16), lease_s=0.0)
                os.ftruncate(fd, 0)
                os.pwrite(fd, record, 0)
            except BaseException:
                _unlink_twice(path)  # ours: it is locked
                close_quietly(fd)
                raise
            return cls(path, fd)
        raise SaveInProgressError("other saves keep taking this prefix's claim", uri=path)

    async def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None

        def work() -> None:
            failure = _unlink_twice(self._path)  # removed while still locked, then unlocked
            close_quietly(fd)
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
                fd = os.open(path, os.O_RDONLY | O_BINARY | O_CLOEXEC)
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
                fd = os.open(path, os.O_RDONLY | O_BINARY | O_CLOEXEC)
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
                fd = os.open(path, os.O_RDONLY | O_BINARY | O_CLOEXEC)
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
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_BINARY | O_NOFOLLOW | O_CLOEXEC
        )
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except BaseException:
                close_quietly(fd)
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
    fd = os.open(directory, os.O_RDONLY | O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _FSYNC_UNSUPPORTED:
            close_quietly(fd)
            raise
    os.close(fd)
