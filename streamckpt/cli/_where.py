"""Checking where a command reads and writes, before any work starts.

Rule: a URL the command cannot use (an unknown protocol, a backend whose extra is not
installed, ``memory://`` as a destination, a path under a regular file) is refused here, with
what to do, so that no command fails halfway through with a backend's traceback.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from streamckpt.cli._output import hinted
from streamckpt.errors import (
    CheckpointNotFoundError,
    PermissionDeniedError,
    StorageError,
    UnsupportedError,
)

# fsspec protocols whose backend ships as one of streamckpt's extras
_EXTRAS = {"gs": "gcs", "gcs": "gcs", "s3": "s3", "s3a": "s3"}


def protocol_of(url: str) -> str | None:
    """The URL's protocol (``gs``), or None for a plain local path."""
    if "::" in url:
        url = url.rsplit("::", 1)[-1]
    if "://" not in url:
        return None
    return url.split("://", 1)[0].lower()


def is_local(url: str) -> bool:
    return protocol_of(url) in (None, "file", "local")


def check_url(url: str, *, writing: bool = False) -> None:
    """Raise if ``url`` cannot be used (:class:`UnsupportedError`); imports its backend."""
    protocol = protocol_of(url)
    if protocol is None or protocol in ("file", "local"):
        if writing:
            _check_local_destination(url[len("file://") :] if url.startswith("file://") else url)
        return
    if writing and protocol == "memory":
        raise hinted(
            UnsupportedError(
                f"refusing to write to {url}: memory:// lives only as long as this process, "
                "so the data would be gone when the command exits"
            ),
            "write to a local path or a bucket (gs://, s3://) instead",
        )
    import fsspec

    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError:
        raise hinted(
            UnsupportedError(f"unknown storage protocol {protocol}:// in {url}"),
            "use a local path, or a URL of a filesystem fsspec knows (gs://, s3://, memory://)",
        ) from None
    except ImportError as exc:
        extra = _EXTRAS.get(protocol)
        hint = (
            f'install it with: pip install "streamckpt[{extra}]"'
            if extra
            else f"install the fsspec backend for {protocol}:// ({exc})"
        )
        raise hinted(
            UnsupportedError(f"{protocol}:// needs a package that is not installed"), hint
        ) from None


def _check_local_destination(path: str) -> None:
    """Refuse a destination under a regular file, or in a directory we may not write."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise hinted(
            StorageError(f"cannot write {path}: {parent} is a file, not a directory"),
            "choose a destination in a directory",
        )
    if not os.access(parent, os.W_OK):
        raise PermissionDeniedError(
            f"cannot write {path}: no permission to create files in {parent}"
        )


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem and path of ``url`` (for plain files: JSON, safetensors, torch)."""
    check_url(url)
    import fsspec.core

    fs, path = fsspec.core.url_to_fs(url)
    return fs, str(path)


def must_exist(url: str) -> None:
    fs, path = filesystem(url)
    if not fs.exists(path):
        raise hinted(
            CheckpointNotFoundError(f"no such file or directory: {url}"),
            "check the path (a URL needs its protocol, e.g. gs://bucket/model.safetensors)",
        )


@contextmanager
def writing_to(destination: str) -> Iterator[None]:
    """Say "cannot write DST" when a save finds no place to create its files.

    The library reports a directory it cannot create files in as the file it could not
    create (``CheckpointNotFoundError``), which reads like a missing source in a copy.
    """
    try:
        yield
    except CheckpointNotFoundError as exc:
        raise hinted(
            StorageError(f"cannot write {destination}: {exc.message}", uri=exc.uri),
            "choose a destination in a directory you can write",
        ) from exc
