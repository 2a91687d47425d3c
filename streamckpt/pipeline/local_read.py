"""Blocking reads of a checkpoint on local disk: the format's pure decoders driven by preads.

Why: a sync caller that reads one tensor of a local checkpoint, or lists its tensors, needs
no event loop. Importing anyio and asyncio and starting a loop and its worker thread is about
a third of a fresh process's time, and what a cold process pays first is what a user of
``streamckpt.sync.read_tensor`` or ``streamckpt ls`` feels (issues 15.1 and 14.8). This module
imports neither anyio nor the storage layer.

It covers what a cold process most often asks: a whole tensor stored whole, every tensor (or
some) stored whole (:func:`load_planned`, which :mod:`streamckpt.pipeline.local_load` drives),
and the list of tensors. A partitioned tensor (pieces to assemble) is left to the async
pipeline, which handles every case: :func:`read_whole` and :func:`load_planned` then return
``None``. Both executors run the same plans (:func:`streamckpt.pipeline.plan.plan_reads`) with
the same checks.

Invariants, the same as :mod:`streamckpt.pipeline.read`'s, whose decoders these are: a value
is returned only after its crc32c matched; nothing is allocated from a size the index claims
before the shard is known to hold those bytes; errors name URI, tensor, shard and offset.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from streamckpt.errors import (
    CheckpointNotFoundError,
    StreamCkptError,
    TensorNotFoundError,
    TruncatedError,
    error_for,
)
from streamckpt.fileio import READ_CHUNK, CachedOrDirect, read_span, refuse_past_end
from streamckpt.format.bundle import (
    HEADER_KEY,
    BundleEntry,
    BundleHeader,
    data_filename,
    decode_entry,
    header_block,
    header_in_block,
    index_filename,
    key_to_name,
    name_to_key,
)
from streamckpt.format.crc import crc32c
from streamckpt.format.dtypes import is_fixed_size
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
from streamckpt.pipeline.plan import Placement, ReadGroup, plan_reads

if TYPE_CHECKING:  # a listing loads it; a read has no use for it
    from streamckpt.pipeline.info import TensorInfo

# The first read of an index, as the async reader's: footer and index block of any realistic
# checkpoint, and every data block of one with up to ~1,000 tensors.
TAIL_BYTES = 64 << 10
# One read call at most this long (Linux moves at most ~2 GiB per call).
_MAX_READ = 1 << 30
# As the async reader: neighbouring tensors are read together, each merged read below this.
MAX_GROUP_BYTES = 64 << 20
# (tests make it smaller)
_CHUNK = READ_CHUNK
# Reads in flight when a load has several (threads: preads and crc32c release the GIL).
MAX_THREADS = 8


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


def _close(fd: int, uri: str, **context: Any) -> None:
    """Close ``fd``; a failure is a ``StreamCkptError`` naming ``uri``, as any other call's."""
    try:
        os.close(fd)
    except OSError as exc:
        raise error_for(exc, uri).with_context(**context) from exc


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
            with contextlib.suppress(OSError):  # the error at hand is the one to tell
                os.close(self._fd)
            raise

    def close(self) -> None:
        _close(self._fd, self.uri)

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
        # here: a read of one tensor, which looks up one record, never loads the bulk decoder
        from streamckpt.format.index_file import decode_records

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
    from streamckpt.format.partitioned import tensor_keys
    from streamckpt.pipeline.info import info_of

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
    key = name_to_key(name)
    group = ReadGroup(
        entry.shard_id,
        entry.offset,
        entry.offset + entry.size,
        (Placement(key, entry.shard_id, entry.offset, entry.size),),
    )
    path = data_filename(prefix_path, entry.shard_id, num_shards)
    ((_, array),) = _read_groups(path, entry.shard_id, [group], {key: entry}, big_endian)
    return array


def load_planned(
    prefix_path: str,
    keys: Sequence[bytes],
    entries: dict[bytes, BundleEntry],
    num_shards: int,
    big_endian: bool,
) -> dict[str, np.ndarray[Any, Any]] | None:
    """``entries`` read as planned: merged reads of neighbours, several at a time."""
    if any(entry.slices for entry in entries.values()):
        return None
    groups = plan_reads(
        [Placement(k, e.shard_id, e.offset, e.size) for k, e in entries.items()],
        max_gap=0,
        max_group_bytes=MAX_GROUP_BYTES,
    )
    by_shard: dict[int, list[ReadGroup]] = {}
    for group in groups:
        by_shard.setdefault(group.shard_id, []).append(group)
    # as the async reader: up to two merged reads per task, so several reads overlap
    tasks = [
        (shard_id, shard_groups[i : i + 2])
        for shard_id, shard_groups in by_shard.items()
        for i in range(0, len(shard_groups), 2)
    ]
    arrays: dict[bytes, np.ndarray[Any, Any]] = {}

    def run(task: tuple[int, Sequence[ReadGroup]]) -> None:
        shard_id, task_groups = task
        path = data_filename(prefix_path, shard_id, num_shards)
        for key, array in _read_groups(path, shard_id, task_groups, entries, big_endian):
            arrays[key] = array

    if len(tasks) == 1:
        run(tasks[0])
    elif tasks:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(MAX_THREADS, len(tasks))) as pool:
            for _ in pool.map(run, tasks):
                pass
    return {key_to_name(k): arrays[k] for k in keys}


def _read_groups(
    path: str,
    shard_id: int,
    groups: Sequence[ReadGroup],
    entries: dict[bytes, BundleEntry],
    big_endian: bool,
) -> list[tuple[bytes, np.ndarray[Any, Any]]]:
    """The tensors of ``groups`` of one shard, each verified; errors as the async reader's."""
    single = len(groups) == 1 and len(groups[0].members) == 1
    context: dict[str, Any] = {"shard": shard_id}
    if single:
        context["tensor"] = key_to_name(groups[0].members[0].key)
    fd = _open(path, missing="data shard is missing", **context)
    file = CachedOrDirect(fd, path)
    out: list[tuple[bytes, np.ndarray[Any, Any]]] = []
    try:
        try:
            size = os.fstat(fd).st_size
        except OSError as exc:
            raise error_for(exc, path).with_context(**context) from exc
        for group in groups:
            refuse_past_end(path, size, group.start, group.end, **context)
            try:
                view, crcs = _read_checksummed(file, group, entries)
            except OSError as exc:
                raise error_for(exc, path).with_context(**context) from exc
            except StreamCkptError as exc:
                raise exc.with_context(uri=path, **context) from None
            for p, crc in zip(group.members, crcs, strict=True):
                start = p.offset - group.start
                payload = view[start : start + p.size]
                out.append(
                    (p.key, decode_checked(path, p.key, entries[p.key], payload, big_endian, crc))
                )
    finally:
        try:  # the plain descriptor goes even if the direct one fails to close
            file.close()
        except OSError as exc:
            raise error_for(exc, path).with_context(**context) from exc
        finally:
            _close(fd, path, **context)
    return out


def _read_checksummed(
    file: CachedOrDirect, group: ReadGroup, entries: dict[bytes, BundleEntry]
) -> tuple[memoryview, list[int | None]]:
    """``group``'s bytes in fresh memory, and the crc32c of each fixed-size member's bytes.

    Each chunk's bytes go through crc32c right after the read brought them in
    (:func:`~streamckpt.fileio.read_span`): the check costs no second pass over memory
    (issue 15.4). A member's crc runs on over the chunks it spans; None for strings and
    variants, whose codecs check their own sums.
    """
    members = group.members
    crcs: list[int | None] = [0 if is_fixed_size(entries[p.key].dtype) else None for p in members]
    bounds = [(p.offset - group.start, p.offset - group.start + p.size) for p in members]
    first = 0  # members before this one are wholly read

    def checksum(span: memoryview, pos: int, end: int) -> None:
        nonlocal first
        for i in range(first, len(members)):
            lo, hi = bounds[i]
            if lo >= end:
                break
            crc = crcs[i]
            if crc is None or hi <= pos:
                continue
            if pos <= lo and hi <= end:  # most small tensors: wholly inside the chunk
                crcs[i] = crc32c(span[lo:hi], crc)
            else:
                crcs[i] = crc32c(span[max(lo, pos) : min(hi, end)], crc)
        while first < len(members) and bounds[first][1] <= end:
            first += 1

    view = read_span(file, group.start, group.end, chunk=_CHUNK, each=checksum)
    if len(view) < group.length:
        at = group.start + len(view)
        raise TruncatedError(
            f"file ends after {at} bytes, {group.end - at} more expected", offset=at
        )
    return view, crcs


def decode_checked(
    path: str,
    key: bytes,
    entry: BundleEntry,
    payload: memoryview,
    big_endian: bool,
    crc: int | None = None,
) -> np.ndarray[Any, Any]:
    """Entry ``key`` checked by its crc32c; errors name file, tensor, shard and file offset."""
    try:
        return decode_tensor(
            payload,
            dtype=entry.dtype,
            shape=entry.shape,
            big_endian=big_endian,
            expected_crc=entry.crc32c,
            crc=crc,
        )
    except StreamCkptError as exc:
        inside, exc.offset = exc.offset, None  # the codecs count from the payload's start
        raise exc.with_context(
            uri=path,
            tensor=key_to_name(key),
            shard=entry.shard_id,
            offset=entry.offset + (inside or 0),
        ) from None
