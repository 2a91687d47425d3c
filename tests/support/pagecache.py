"""The page cache and O_DIRECT in tests: whether a directory takes O_DIRECT, and eviction."""

from __future__ import annotations

import errno
import os
from pathlib import Path

O_DIRECT = getattr(os, "O_DIRECT", 0)


def direct_supported(directory: Path) -> bool:
    """Whether files in ``directory`` open with O_DIRECT (tmpfs refuses it with EINVAL)."""
    try:
        fd = os.open(directory / ".probe", os.O_WRONLY | os.O_CREAT | O_DIRECT, 0o644)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    os.close(fd)
    os.unlink(directory / ".probe")
    return True


def evict(path: str | Path) -> None:
    """Drop a file's pages (or those of every file in a directory) from the page cache, as a
    fresh boot would have none: the next read comes from the disk."""
    paths = [Path(path)] if Path(path).is_file() else sorted(Path(path).iterdir())
    for each in paths:
        fd = os.open(each, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
