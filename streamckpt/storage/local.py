"""Local disk through the os module.

Positional reads into caller buffers, large sequential writes, fsync, and the commit rule's
atomic publish (temp file, fsync, link or rename, fsync of the directory).

fsspec's local filesystem would work too, but it hides fsync and ``readinto``; on local disk
those are exactly where the time and the durability are.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
from collections.abc import Sequence

import anyio.to_thread

from streamckpt.errors import TruncatedError
from streamckpt.storage.base import (
    Buffer,
    ByteBudget,
    ByteRange,
    ShardWriter,
    Store,
    check_length,
    map_errors,
)
from streamckpt.storage.retry import StoreStats

_O_BINARY = getattr(os, "O_BINARY", 0)


# Buffers of at least this size are anonymous mappings the kernel fills with zero pages up
# front (MAP_POPULATE): much cheaper than faulting them in one page at a time while reading,
# and without the transparent-hugepage compaction that numpy's allocations may trigger.
_POPULATE_MIN = 1 << 20
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


def _fresh_buffer(nbytes: int) -> bytearray | mmap.mmap:
    if nbytes >= _POPULATE_MIN and _MAP_POPULATE:
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_POPULATE
        return mmap.mmap(-1, nbytes, flags=flags)
    return bytearray(nbytes)


def _read_exact_into(fd: int, offset: int, out: memoryview) -> int:
    done = 0
    while done < len(out):
        n = os.preadv(fd, [out[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done


class LocalShardWriter(ShardWriter):
    def __init__(self, path: str, stats: StoreStats) -> None:
        self._path = path
        self._stats = stats
        with map_errors(path):
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _O_BINARY, 0o644)
        self._closed = False

    def write(self, chunk: memoryview) -> None:
        with map_errors(self._path):
            while chunk:
                n = os.write(self._fd, chunk)
                chunk = chunk[n:]
                self._stats.add(bytes_written=n)

    def commit(self) -> None:
        with map_errors(self._path):
            os.fsync(self._fd)
            self._closed = True
            os.close(self._fd)

    def abort(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._fd)
        with contextlib.suppress(OSError):
            os.unlink(self._path)


class LocalStore(Store):
    """Paths are ordinary OS paths.

    ``stats.requests`` counts file reads (one per range) so that local reads can be compared
    with object-store requests.
    """

    def __init__(self, *, max_inflight_bytes: int = 1 << 62) -> None:
        self.stats = StoreStats()
        self.budget = ByteBudget(max_inflight_bytes)

    def uri(self, path: str) -> str:
        return path

    supports_rename = True

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
                fd = os.open(path, os.O_RDONLY | _O_BINARY)
                try:
                    size = os.fstat(fd).st_size
                    for r in ranges:
                        if r.end > size:  # refuse before allocating what an index claims
                            raise TruncatedError(
                                f"wanted bytes up to {r.end}, the file has {size}",
                                uri=path,
                                offset=r.start,
                            )
                        buf = _fresh_buffer(r.length)
                        got = _read_exact_into(fd, r.start, memoryview(buf))
                        self.stats.add(requests=1, bytes_read=got)
                        if got != r.length:  # (slicing a bytearray would copy it)
                            check_length(buf[:got], r.length, uri=path, offset=r.start)
                        results.append(buf)
                finally:
                    os.close(fd)
            return results

        return await anyio.to_thread.run_sync(work)

    async def read_suffix(self, path: str, length: int) -> tuple[bytes, int | None]:
        def work() -> tuple[bytes, int | None]:
            with map_errors(path):
                fd = os.open(path, os.O_RDONLY | _O_BINARY)
                try:
                    size = os.fstat(fd).st_size
                    start = max(0, size - length)
                    buf = bytearray(size - start)
                    got = _read_exact_into(fd, start, memoryview(buf))
                    self.stats.add(requests=1, bytes_read=got)
                finally:
                    os.close(fd)
            return bytes(buf[:got]), size

        return await anyio.to_thread.run_sync(work)

    async def read_all(self, path: str) -> bytes:
        def work() -> bytes:
            with map_errors(path), open(path, "rb") as f:
                return f.read()

        return await anyio.to_thread.run_sync(work)

    async def write_atomic(self, path: str, data: bytes, *, exclusive: bool) -> None:
        def work() -> None:
            with map_errors(path):
                directory = os.path.dirname(path) or "."
                tmp = os.path.join(
                    directory, f".{os.path.basename(path)}.tmp-{secrets.token_hex(6)}"
                )
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_BINARY, 0o644)
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view) :]
                    os.fsync(fd)
                finally:
                    os.close(fd)
                try:
                    if exclusive:
                        os.link(tmp, path)  # atomic and create-only, unlike rename
                        os.unlink(tmp)
                    else:
                        os.replace(tmp, path)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                    raise
                _fsync_dir(directory)

        await anyio.to_thread.run_sync(work)

    def open_writer(self, path: str) -> ShardWriter:
        return LocalShardWriter(path, self.stats)

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
        await anyio.to_thread.run_sync(_fsync_dir, path)


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the data itself is synced
    finally:
        os.close(fd)
