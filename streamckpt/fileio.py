"""Plain file reads into fresh memory, shared by the local store and the blocking local reads.

No anyio and no storage layer here: :mod:`streamckpt.pipeline.local_read` reads a local
checkpoint without an event loop, and must fill memory exactly as
:class:`streamckpt.storage.local.LocalStore` does, so that both paths cost the same.
"""

from __future__ import annotations

import mmap
import os

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
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23 if _MADV_HUGEPAGE else 0)


def fresh_buffer(nbytes: int) -> bytearray | mmap.mmap:
    """Writable zeroed memory of ``nbytes``, cheap to fill when large."""
    if nbytes >= _HUGE_MIN and _MADV_HUGEPAGE and _MADV_POPULATE_WRITE:
        mapped = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            mapped.madvise(_MADV_HUGEPAGE)
            mapped.madvise(_MADV_POPULATE_WRITE)
        except OSError:  # an older kernel: EINVAL; the pages fault in as they are filled
            mapped.close()
        else:
            return mapped
    if nbytes >= _POPULATE_MIN and _MAP_POPULATE:
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_POPULATE
        return mmap.mmap(-1, nbytes, flags=flags)
    return bytearray(nbytes)


def read_exact_into(fd: int, offset: int, out: memoryview) -> int:
    """Fill ``out`` from ``offset`` of ``fd``; returns the bytes read (fewer at end of file)."""
    done = 0
    while done < len(out):
        n = os.preadv(fd, [out[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done
