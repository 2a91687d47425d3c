"""Blocking reads of a checkpoint on local disk: the format's pure decoders driven by preads.

Why: a sync caller that reads one tensor of a local checkpoint, or lists its tensors, needs
no event loop. Importing anyio and asyncio and starting a loop and its worker thread is about
a third of a fresh process's time, and what a cold process pays first is what a user of
``streamckpt.sync.read_tensor`` or ``streamckpt ls`` feels (issues 15.1 and 14.8). This module
imports neither anyio nor the storage layer.

It covers what a cold process most often asks: a whole tensor stored whole, and the list of
tensors. A partitioned tensor (pieces to assemble) is left to the async pipeline, which
handles every case: :func:`read_whole` then returns ``None``.

Invariants, the same as :mod:`streamckpt.pipeline.read`'s, whose decoders these are: a value
is returned only after its crc32c matched; nothing is allocated from a size the index claims
before the shard is known to hold those bytes; errors name URI, tensor, shard and offset.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from streamckpt.errors import (
    CheckpointNotFoundError,
    StreamCkptError,
    TensorNotFoundError,
    TruncatedError,
    error_for,
)
from streamckpt.format.bundle import (
    HEADER_KEY,
    BundleEntry,
    BundleHeader,
    data_filename,
    decode_entry,
    decode_records,
    header_block,
    header_in_block,
    index_filename,
    key_to_name,
    name_to_key,
)
from streamckpt.format.partitioned import tensor_keys
from streamckpt.format.payload import decode_tensor
from streamckpt.format.table import (
    FOOTER_SIZE,
    BlockHandle,
    IndexBlock,
    decode_block,
    decode_footer,
    decode_index_block,
    lookup_in_block,
)
from streamckpt.pipeline.info import TensorInfo, info_of

# The first read of an index, as the async reader's: footer and index block of any realistic
# checkpoint, and every data block of one with up to ~1,000 tensors.
TAIL_BYTES = 64 << 10
# One read call at most this long (Linux moves at most ~2 GiB per call).
_MAX_READ = 1 << 30


def local_path(prefix: Any, filesystem: Any) -> str | None:
    """The OS path of a prefix that :func:`streamckpt.storage.resolve` would open locally.

    Only the unambiguous spellings: a plain path or a ``file://`` URL, with no filesystem
    given. Anything else (``local://``, chained URLs, a filesystem instance) goes the general
    way, which resolves it exactly.
    """
    if filesystem is not None:
        return None
    try:
        text = os.fspath(prefix)
    except TypeError:
        return None
    if not isinstance(text, str):
        return None
    if "://" not in text:
        return text
    if text.startswith("file://") and "::" not in text:
        return text[len("file://") :]
    return None


def _read_into(fd: int, view: memoryview, offset: int, *, uri: str) -> None:
    """Fill ``view`` from ``offset``; a file that ends first is a truncated one."""
    done = 0
    total = view.nbytes
    while done < total:
        try:
            got = os.preadv(fd, [view[done : done + _MAX_READ]], offset + done)
        except OSError as exc:
            raise error_for(exc, uri) from exc
        if got == 0:
            raise TruncatedError(
                f"file ends after {offset + done} bytes, {total - done} more expected",
                uri=uri,
                offset=offset + done,
            )
        done += got


def _pread(fd: int, start: int, end: int, *, uri: str) -> bytearray:
    buffer = bytearray(end - start)
    _read_into(fd, memoryview(buffer), start, uri=uri)
    return buffer


def _open(path: str, *, missing: str, **context: Any) -> int:
    try:
        return os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError as exc:
        raise CheckpointNotFoundError(missing, uri=path, **context) from exc
    except OSError as exc:
        raise error_for(exc, path).with_context(**context) from exc


class LocalIndex:
    """An open .index file: its index block and header, entries looked up on demand."""

    def __init__(self, prefix_path: str) -> None:
        self.prefix_path = prefix_path
        self.uri = index_filename(prefix_path)
        self._fd = _open(self.uri, missing="no checkpoint at this prefix (its .index is missing)")
        try:
            self._open()
        except BaseException:
            os.close(self._fd)
            raise

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> LocalIndex:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _open(self) -> None:
        try:
            size = os.fstat(self._fd).st_size
        except OSError as exc:
            raise error_for(exc, self.uri) from exc
        self.size = size
        self._tail_start = max(0, size - TAIL_BYTES)
        self._tail = self._pread(self._tail_start, size)
        try:
            footer = decode_footer(bytes(self._tail[-FOOTER_SIZE:]), file_size=size)
            handle = footer.index
            self.index: IndexBlock = decode_index_block(
                self._block(handle), index_offset=handle.offset, limit=size - FOOTER_SIZE
            )
            first = header_block(self.index)
            self.header: BundleHeader = header_in_block(self._block(first), offset=first.offset)
        except StreamCkptError as exc:
            raise exc.with_context(uri=self.uri) from None

    def _pread(self, start: int, end: int) -> bytearray:
        return _pread(self._fd, start, end, uri=self.uri)

    def _bytes(self, start: int, end: int) -> memoryview:
        if start >= self._tail_start and end <= self._tail_start + len(self._tail):
            base = start - self._tail_start
            return memoryview(self._tail)[base : base + end - start]
        return memoryview(self._pread(start, end))

    def _block(self, handle: BlockHandle) -> bytes | memoryview:
        return decode_block(
            self._bytes(handle.offset, handle.end_with_trailer), offset=handle.offset
        )

    def entry(self, name: str | bytes) -> BundleEntry:
        """The entry of one tensor: one data block read and searched."""
        key = name_to_key(name)
        handle = self.index.find(key) if key != HEADER_KEY else None
        value = None
        if handle is not None:
            try:
                value = lookup_in_block(self._block(handle), key, offset=handle.offset)
                if value is not None:
                    return decode_entry(value, num_shards=self.header.num_shards)
            except StreamCkptError as exc:
                raise exc.with_context(
                    uri=self.uri, tensor=key_to_name(key), offset=handle.offset
                ) from None
        raise TensorNotFoundError(
            "no such tensor in the checkpoint", uri=self.prefix_path, tensor=key_to_name(key)
        )

    def entries(self) -> dict[bytes, BundleEntry]:
        """Every entry, from one read of all data blocks."""
        handles = self.index.handles
        start, end = self.index.data_span
        view = self._bytes(start, end)
        blocks = [(view[h.offset - start : h.end_with_trailer - start], h.offset) for h in handles]
        try:
            return decode_records(blocks).entries
        except StreamCkptError as exc:
            raise exc.with_context(uri=self.uri) from None


def list_local_tensors(prefix_path: str) -> dict[str, TensorInfo]:
    """Every tensor of a local checkpoint by name (the pieces of partitioned ones left out)."""
    with LocalIndex(prefix_path) as index:
        decoded = index.entries()
    return {key_to_name(k): info_of(k, decoded[k]) for k in tensor_keys(decoded)}


def read_whole(prefix_path: str, name: str | bytes) -> np.ndarray[Any, Any] | None:
    """One whole tensor of a local checkpoint, verified; ``None`` if it is partitioned."""
    with LocalIndex(prefix_path) as index:
        entry = index.entry(name)
        num_shards = index.header.num_shards
        big_endian = index.header.big_endian
    if entry.slices:
        return None
    tensor = key_to_name(name_to_key(name))
    path = data_filename(prefix_path, entry.shard_id, num_shards)
    context: dict[str, Any] = {"tensor": tensor, "shard": entry.shard_id}
    fd = _open(path, missing="data shard is missing", **context)
    try:
        try:
            shard_size = os.fstat(fd).st_size
        except OSError as exc:
            raise error_for(exc, path).with_context(**context) from exc
        end = entry.offset + entry.size
        if end > shard_size:  # refuse before allocating what the index claims
            raise TruncatedError(
                f"wanted bytes up to {end}, the file has {shard_size}",
                uri=path,
                offset=entry.offset,
                **context,
            )
        payload = np.empty(entry.size, dtype=np.uint8)
        try:
            _read_into(fd, payload.data, entry.offset, uri=path)
        except StreamCkptError as exc:
            raise exc.with_context(**context) from None
    finally:
        os.close(fd)
    try:
        return decode_tensor(
            payload.data,
            dtype=entry.dtype,
            shape=entry.shape,
            big_endian=big_endian,
            expected_crc=entry.crc32c,
        )
    except StreamCkptError as exc:
        inside, exc.offset = exc.offset, None  # the codecs count from the payload's start
        raise exc.with_context(uri=path, offset=entry.offset + (inside or 0), **context) from None
