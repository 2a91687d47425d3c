"""Storage: one async Store interface over local disk and every fsspec filesystem."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from streamckpt.storage.base import ByteRange, ShardWriter, Store, map_errors
from streamckpt.storage.local import LocalStore
from streamckpt.storage.retry import RetryPolicy, StoreStats

if TYPE_CHECKING:
    from streamckpt.storage.fsspec_store import FsspecStore

__all__ = [
    "ByteRange",
    "FsspecStore",
    "LocalStore",
    "PathLike",
    "RetryPolicy",
    "ShardWriter",
    "Store",
    "StoreStats",
    "map_errors",
    "resolve",
]

PathLike = str | os.PathLike[str]


def __getattr__(name: str) -> Any:
    # The fsspec store (and its upload writers) loads for the first URL that needs it: a
    # process that only touches local paths never imports it (issue 15.1).
    if name != "FsspecStore":
        raise AttributeError(f"module 'streamckpt.storage' has no attribute {name!r}")
    from streamckpt.storage.fsspec_store import FsspecStore

    return FsspecStore


def _local_store(max_inflight_bytes: int | None, options: dict[str, Any] | None) -> LocalStore:
    """The local store; a budget given bounds the fetched bytes of a save's deferred values.

    Its one option, ``direct_io`` (default False), writes shards with O_DIRECT: what
    background saves ask for (:func:`background_options`). Other keys are another store's
    (a copy from a bucket passes the bucket's options to both ends) and are left alone.
    """
    direct_io = (options or {}).get("direct_io", False)
    if not isinstance(direct_io, bool):
        raise TypeError(f"storage_options['direct_io'] must be a bool, got {direct_io!r}")
    if max_inflight_bytes is None:
        return LocalStore(direct_io=direct_io)
    return LocalStore(max_inflight_bytes=max_inflight_bytes, direct_io=direct_io)


def background_options(
    prefix: PathLike, storage_options: dict[str, Any] | None, filesystem: Any
) -> dict[str, Any] | None:
    """``storage_options`` for a save in the background: O_DIRECT on local disk, unless asked.

    A background save runs beside the training step, which needs the CPU that writes through
    the page cache would take (about 0.35 s a GiB of kernel time on the benchmark VM).
    """
    text = os.fspath(prefix)
    local = filesystem is None and ("://" not in text or text.startswith("file://"))
    if not local:
        return storage_options
    return {"direct_io": True, **(storage_options or {})}


def resolve(
    prefix: PathLike,
    *,
    storage_options: dict[str, Any] | None = None,
    filesystem: Any = None,
    max_inflight_bytes: int | None = None,
    retry_policy: RetryPolicy | None = None,
) -> tuple[Store, str]:
    """A fresh store (fresh statistics) for a checkpoint prefix, and the prefix as its path.

    Plain paths and ``file://`` URLs use :class:`LocalStore`; any other URL goes to an fsspec
    filesystem made with ``storage_options`` (cached per options, client retries off: ours
    decide). A ready ``filesystem`` instance (any fsspec filesystem) is used as it is.
    """
    text = os.fspath(prefix)
    if filesystem is None and "://" not in text:
        return _local_store(max_inflight_bytes, storage_options), text
    if filesystem is None and text.startswith("file://"):
        return _local_store(max_inflight_bytes, storage_options), text[len("file://") :]
    from streamckpt.storage.fsspec_store import DEFAULT_MAX_INFLIGHT_BYTES, FsspecStore
    from streamckpt.storage.owned import owned_filesystem

    budget = max_inflight_bytes or DEFAULT_MAX_INFLIGHT_BYTES
    if filesystem is not None:
        store = FsspecStore(filesystem, max_inflight_bytes=budget, retry_policy=retry_policy)
        return store, str(filesystem._strip_protocol(text))
    if "::" in text:  # chained URLs (simplecache::s3://...): fsspec's own resolution
        import fsspec.core

        fs, path = fsspec.core.url_to_fs(text, **(storage_options or {}))
        return FsspecStore(fs, max_inflight_bytes=budget, retry_policy=retry_policy), str(path)
    protocol = text.split("://", 1)[0]
    fs = owned_filesystem(protocol, storage_options or {})
    if type(fs).__name__ == "LocalFileSystem":
        return _local_store(max_inflight_bytes, None), str(fs._strip_protocol(text))
    store = FsspecStore(fs, max_inflight_bytes=budget, retry_policy=retry_policy)
    return store, str(fs._strip_protocol(text))
