"""Plain file reads into fresh memory, shared by the local store and the blocking local reads.

No anyio and no storage layer here: :mod:`streamckpt.pipeline.local_read` reads a local
checkpoint without an event loop, and must fill memory exactly as
:class:`streamckpt.storage.local.LocalStore` does, so that both paths cost the same.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
from collections.abc import Callable
from typing import Any

# Buffers of at least this size are anonymous mappings that the kernel fills with zero pages
# up front: much cheaper than faulting them in one page at a time while they are filled, and
# without the transparent-hugepage compaction that numpy's allocations may trigger.
_POPULATE_MIN = 1 << 20
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
# From this size they are backed by huge pages where the kernel offers them on request
# (transparent hugepages in "madvise" mode, the common default), and populated after that
# request (MADV_POPULATE_WRITE, Linux 5.14): a GiB took 0.09-0.10 s so against 0.40 s as 4 KiB
# pages mapped with MAP_POPULATE (the benchmark VM), which cannot be asked for huge pages
# before it populates. Either may be missing: then MAP_POPULATE, as before.
_HUGE_MIN = 4 << 20
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23 if _MADV_HUGEPAGE else 0)


def fresh_buffer(nbytes: int, *, populate: bool = True) -> bytearray | mmap.mmap:
    """Writable zeroed memory of ``nbytes``, cheap to fill when large.

    ``populate=False``, for memory that a read fills front to back right away: its huge
    pages fault in as the read reaches them, each zeroed just before its bytes land in it,
    while both are in cache, instead of the whole buffer zeroed first and its lines fetched
    back from memory for the copy. A warm load of 1 GiB: 0.24-0.27 s against 0.30-0.36 s
    (6 alternating fresh processes). Only where the kernel gives huge pages on request: one
    fault per 4 KiB page would cost more than populating them.
    """
    if nbytes >= _HUGE_MIN and _MADV_HUGEPAGE and _MADV_POPULATE_WRITE:
        lazy = not populate and _huge_pages_on_request()
        mapped = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            mapped.madvise(_MADV_HUGEPAGE)
            if not lazy:
                mapped.madvise(_MADV_POPULATE_WRITE)
        except OSError:  # an older kernel: EINVAL; the pages fault in as they are filled
            mapped.close()
        else:
            return mapped
    if nbytes >= _POPULATE_MIN and _MAP_POPULATE:
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_POPULATE
        return mmap.mmap(-1, nbytes, flags=flags)
    return bytearray(nbytes)


_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"
_huge_on_request: bool | None = None  # read once


def _huge_pages_on_request() -> bool:
    """Whether transparent huge pages are "always" or "madvise" (not "never", not absent)."""
    global _huge_on_request
    if _huge_on_request is None:
        try:
            with open(_THP_MODE) as f:
                mode = f.read()
        except OSError:
            mode = ""
        _huge_on_request = "[always]" in mode or "[madvise]" in mode
    return _huge_on_request


def read_exact_into(fd: int, offset: int, out: memoryview) -> int:
    """Fill ``out`` from ``offset`` of ``fd``; returns the bytes read (fewer at end of file)."""
    done = 0
    while done < len(out):
        n = os.preadv(fd, [out[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done


# A read of a span goes this many bytes at a time: small enough that its bytes are still in
# cache when crc32c goes over them right after (L2 is 0.5-1 MiB a core, L3 tens), large
# enough to cost one system call per ~100 µs of copying.
READ_CHUNK = 2 << 20

# Offsets, lengths and memory of O_DIRECT reads are multiples of the logical block size: 512
# or 4096 bytes on the disks we meet, so 4096 serves both.
ALIGN = 4096
_O_DIRECT = getattr(os, "O_DIRECT", 0)
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
_UNSUPPORTED = (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP)


class CachedOrDirect:
    """Reads of one file: from the page cache where it holds the bytes, else with O_DIRECT.

    A direct read goes from the disk straight into the caller's memory. A restore that finds
    its files cold (the first at job start) then skips the page cache: no kernel copy out of
    it, no pages of it to allocate and fill, more of two cores' memory bandwidth left to
    crc32c and to filling the arrays (issue 15.4). Warm bytes come out of the cache as before.

    Which is which is asked per chunk by a one-byte read of its first page with
    ``RWF_NOWAIT``, which fails rather than wait for the disk. Such a probe is no larger:
    the kernel answers a missed ``RWF_NOWAIT`` read by starting readahead of what it asked
    for (4 pages for one, 8 MiB for a 2 MiB read: Linux 6.18 here), which a direct read of
    the same bytes would then duplicate. Where either flag is missing or refused (tmpfs,
    other systems), every read is a plain one. Both ways read the same bytes: the kernel
    writes a file's dirty pages out before a direct read of them.

    Plain reads run without readahead (``POSIX_FADV_RANDOM``, on this open file alone): it
    would bring the next chunk into the cache ahead of its probe, and so turn a file whose
    first page alone was cached into one read entirely through the cache.
    """

    __slots__ = ("_direct", "_nowait", "_probe", "fd", "path")

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path
        self._nowait = bool(_RWF_NOWAIT and _O_DIRECT)
        self._direct: int | None = None
        self._probe = bytearray(1)
        if self._nowait:
            self._advise(os.POSIX_FADV_RANDOM)

    def _advise(self, advice: int) -> None:
        with contextlib.suppress(OSError):  # advice only
            os.posix_fadvise(self.fd, 0, 0, advice)

    def read(self, offset: int, out: memoryview, *, aligned: bool) -> int:
        """Fill ``out`` from ``offset``; the bytes read, fewer only where the file ends.

        ``aligned``: ``offset``, ``len(out)`` (unless it reaches the end of the file) and
        ``out``'s address are multiples of :data:`ALIGN`, so a direct read may fill it.
        """
        if aligned and self._nowait and not self._cached(offset):
            done = self._read_direct(offset, out)
            if done is not None:
                return done
        return read_exact_into(self.fd, offset, out)

    def _cached(self, offset: int) -> bool:
        try:
            os.preadv(self.fd, [self._probe], offset, _RWF_NOWAIT)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise
            self._plain_from_now_on()
        return True

    def _plain_from_now_on(self) -> None:
        self._nowait = False
        self._advise(os.POSIX_FADV_NORMAL)

    def _read_direct(self, offset: int, out: memoryview) -> int | None:
        """Bytes read with O_DIRECT; None where the file system refuses it."""
        try:
            if self._direct is None:
                self._direct = os.open(self.path, os.O_RDONLY | _O_DIRECT | _O_CLOEXEC)
            done = 0
            while done < len(out):
                n = os.preadv(self._direct, [out[done:]], offset + done)
                done += n
                if n == 0 or done % ALIGN:  # the end of the file
                    break
            return done
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise
            self._plain_from_now_on()
            return None

    def close(self) -> None:
        if self._direct is not None:
            os.close(self._direct)
            self._direct = None


def read_span(
    file: CachedOrDirect,
    start: int,
    end: int,
    *,
    chunk: int,
    each: Callable[[memoryview, int, int], None] | None = None,
) -> memoryview:
    """Bytes ``[start, end)`` of ``file`` in fresh memory; shorter only where the file ends.

    Read ``chunk`` bytes at a time, each call of ``each(span, lo, hi)`` right after
    ``span[lo:hi]`` arrived (to checksum bytes while they are in cache). The buffer starts
    at the aligned offset before ``start``, so that chunks the page cache lacks are read
    into it directly (:class:`CachedOrDirect`); the returned view skips those few bytes.
    """
    base = start - start % ALIGN
    need = end - base
    buffer = fresh_buffer(-(-need // ALIGN) * ALIGN, populate=False)
    whole = memoryview(buffer)
    aligned = isinstance(buffer, mmap.mmap) and chunk % ALIGN == 0  # page-aligned memory
    skip = start - base
    span = whole[skip : skip + end - start]
    pos = 0 if aligned else skip  # a direct read starts aligned: a few bytes early
    while pos < need:
        stop = min(pos - pos % chunk + chunk, len(whole))
        got = file.read(base + pos, whole[pos:stop], aligned=aligned)
        filled = min(pos + got, need)
        if each is not None and filled > skip:
            each(span, max(pos, skip) - skip, filled - skip)
        if filled < min(stop, need):  # the file ended
            return span[: max(0, filled - skip)]
        pos = stop
    return span


def refuse_past_end(path: str, size: int, start: int, end: int, **context: Any) -> None:
    """Refuse ``[start, end)`` of a file of ``size`` bytes before anything is allocated for it.

    An index may claim any size: a read past the file's end is a truncated shard, named as
    such, never a buffer of the claimed size that then comes back short.
    """
    if end > size:
        from streamckpt.errors import TruncatedError

        raise TruncatedError(
            f"wanted bytes up to {end}, the file has {size}", uri=path, offset=start, **context
        )
