"""Plain file reads into fresh memory, shared by the local store and the blocking local reads.

No anyio and no storage layer here: :mod:`streamckpt.pipeline.local_read` reads a local
checkpoint without an event loop, and must fill memory exactly as
:class:`streamckpt.storage.local.LocalStore` does, so that both paths cost the same.
"""

from __future__ import annotations

import mmap
import os

# Buffers of at least this size are anonymous mappings the kernel fills with zero pages up
# front (MAP_POPULATE): much cheaper than faulting them in one page at a time while they are
# filled (on a small VM, a third of the time of numpy's fresh memory), and without the
# transparent-hugepage compaction that numpy's allocations may trigger.
_POPULATE_MIN = 1 << 20
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


def fresh_buffer(nbytes: int) -> bytearray | mmap.mmap:
    """Writable zeroed memory of ``nbytes``, cheap to fill when large."""
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
