"""Storage: one async Store interface over local disk and every fsspec filesystem."""

from __future__ import annotations

import os
from typing import Any

from streamckpt.storage.base import ByteRange, ShardWriter, Store, map_errors
from streamckpt.storage.fsspec_store import FsspecStore
from streamckpt.storage.local import LocalStore

__all__ = [
    "ByteRange",
    "FsspecStore",
    "LocalStore",
    "PathLike",
    "ShardWriter",
    "Store",
    "map_errors",
    "resolve",
]

PathLike = str | os.PathLike[str]


def resolve(
    prefix: PathLike,
    *,
    storage_options: dict[str, Any] | None = None,
    filesystem: Any = None,
) -> tuple[Store, str]:
    """The store for a checkpoint prefix and the prefix as that store's path.

    Plain paths and ``file://`` URLs use :class:`LocalStore`; any other URL goes to fsspec with
    ``storage_options``. A ready ``filesystem`` instance (any fsspec filesystem) wins over both.
    """
    text = os.fspath(prefix)
    if filesystem is not None:
        return FsspecStore(filesystem), str(filesystem._strip_protocol(text))
    if "://" not in text:
        return LocalStore(), text
    if text.startswith("file://"):
        return LocalStore(), text[len("file://") :]
    import fsspec.core

    fs, path = fsspec.core.url_to_fs(text, **(storage_options or {}))
    if type(fs).__name__ == "LocalFileSystem":
        return LocalStore(), str(path)
    return FsspecStore(fs), str(path)
