"""Checkpoints as stored bytes, streamed in bounded chunks: copy and verify.

``load`` + ``save`` hold every tensor at once, and ``read`` holds a whole tensor: a copy or a
check of a checkpoint larger than memory needs neither. Here no tensor is decoded: stored
bytes are read in ranges of at most a chunk (consecutive small entries share one range, a
large entry takes many), each entry's crc32c is extended range by range, and the bytes go
on to the destination or are dropped. Memory is bounded by the chunks in flight, whatever
the size of the checkpoint or of its largest tensor.

Invariants:
- every entry's crc32c is checked (extended chunk by chunk; a string / variant payload is
  read in one piece and checked by decoding it, as ``read`` does); a bad source never
  commits a copy;
- a copy keeps every entry's dtype, shape, bytes and crc; only shard and offset may change
  (``num_shards`` other than the source's re-plans the layout by bytes, as ``save`` does);
  the header keeps the source's byte order and version;
- the destination is written as ``save`` writes it (``pipeline.commit``): claimed, shards
  first, the index last and create-only unless ``overwrite``; a failed or cancelled copy
  removes what it wrote, so no half-checkpoint is ever readable at the destination.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread

from streamckpt.errors import (
    CheckpointNotFoundError,
    ChecksumError,
    StreamCkptError,
    TruncatedError,
    unwrap_task_group,
)
from streamckpt.format.bundle import BundleEntry, key_to_name
from streamckpt.format.crc import crc32c, mask
from streamckpt.format.dtypes import is_fixed_size
from streamckpt.format.index_file import encode_index
from streamckpt.format.partitioned import check_piece, check_tiling, piece_keys
from streamckpt.format.payload import decode_tensor
from streamckpt.pipeline.commit import Outcome, abandon, begin, claimed, commit, tidy
from streamckpt.pipeline.plan import Placement, SavePlan, plan_save
from streamckpt.pipeline.read import CheckpointReader, open_reader
from streamckpt.pipeline.save import ProgressCallback, SaveInfo, verify_shards
from streamckpt.pipeline.shard_stream import ShardResult
from streamckpt.storage import PathLike, Store, resolve
from streamckpt.storage.base import ShardWriter

__all__ = [
    "DEFAULT_BUDGET_BYTES",
    "RangePart",
    "ShardRange",
    "copy_checkpoint",
    "plan_ranges",
    "verify_checkpoint",
]

#: Bytes of tensor data held at once when the caller does not say.
DEFAULT_BUDGET_BYTES = 256 << 20
_MAX_CHUNK = 8 << 20
_MAX_CONCURRENT = 16


@dataclass(frozen=True, slots=True)
class RangePart:
    """Bytes ``[start, end)`` of stored entry ``key`` (file offsets); ``last``: its end."""

    key: bytes
    start: int
    end: int
    last: bool


@dataclass(frozen=True, slots=True)
class ShardRange:
    """One read: ``[start, end)`` of source shard ``shard_id``, exactly tiled by ``parts``."""

    shard_id: int
    start: int
    end: int
    parts: tuple[RangePart, ...]


def plan_ranges(entries: Iterable[tuple[bytes, BundleEntry]], *, chunk: int) -> list[ShardRange]:
    """Reads of at most ``chunk`` bytes covering ``entries`` in the order given.

    Pure. Consecutive entries that are adjacent in one source shard share a read; an entry
    larger than ``chunk`` is cut into chunks, except a string / variant payload, which is
    checked by decoding it and so is read in one piece.
    """
    ranges: list[ShardRange] = []
    shard, start, end = -1, 0, 0
    parts: list[RangePart] = []

    def flush() -> None:
        if parts:
            ranges.append(ShardRange(shard, start, end, tuple(parts)))

    for key, entry in entries:
        step = chunk if is_fixed_size(entry.dtype) else max(1, entry.size)
        stop = entry.offset + entry.size
        cuts = list(range(entry.offset, stop, step)) or [entry.offset]
        for lo in cuts:
            hi = min(lo + step, stop)
            if not (parts and entry.shard_id == shard and lo == end and hi - start <= chunk):
                flush()
                shard, start, parts = entry.shard_id, lo, []
            parts.append(RangePart(key, lo, hi, hi == stop))
            end = hi
    flush()
    return ranges


class _Checker:
    """Each entry's crc32c, extended part by part; raises at an entry's last part if wrong."""

    def __init__(self, reader: CheckpointReader, stored: Mapping[bytes, BundleEntry]) -> None:
        self.reader = reader
        self.stored = stored
        self.crcs: dict[bytes, int] = {}

    def check(self, part: RangePart, data: memoryview) -> None:
        entry = self.stored[part.key]
        if not is_fixed_size(entry.dtype):
            try:
                decode_tensor(
                    data,
                    dtype=entry.dtype,
                    shape=entry.shape,
                    big_endian=self.reader.header.big_endian,
                    expected_crc=entry.crc32c,
                )
            except StreamCkptError as exc:
                # the payload codecs report offsets inside the payload; ours are file offsets
                inside, exc.offset = exc.offset, None
                raise self.context(exc, part.key, entry.offset + (inside or 0)) from None
            return
        crc = self.crcs[part.key] = crc32c(data, self.crcs.pop(part.key, 0))
        if part.last:
            del self.crcs[part.key]
            if mask(crc) != entry.crc32c:
                error = ChecksumError("tensor data does not match its crc32c")
                raise self.context(error, part.key, entry.offset)

    def context(self, exc: StreamCkptError, key: bytes, offset: int) -> StreamCkptError:
        entry = self.stored[key]
        path = self.reader.shard_path(entry.shard_id)
        return exc.with_context(
            uri=self.reader.store.uri(path),
            tensor=key_to_name(key),
            shard=entry.shard_id,
            offset=offset,
        )


async def _fetch(reader: CheckpointReader, read: ShardRange) -> memoryview:
    path = reader.shard_path(read.shard_id)
    try:
        data = memoryview(await reader.store.read_range(path, read.start, read.end))
        if data.nbytes != read.end - read.start:
            raise TruncatedError("data shard ends before the bytes its index points to")
    except StreamCkptError as exc:
        if isinstance(exc, CheckpointNotFoundError):
            exc.message = "data shard is missing"
        raise exc.with_context(
            uri=reader.store.uri(path),
            tensor=key_to_name(read.parts[0].key),
            shard=read.shard_id,
            offset=read.start,
        ) from None
    return data


async def _stored_entries(reader: CheckpointReader) -> dict[bytes, BundleEntry]:
    """Every entry of the index: tensors, and the pieces of partitioned ones (checked)."""
    stored: dict[bytes, BundleEntry] = {}
    for info in reader.entries.values():
        stored.update(await _entries_of(reader, info.key))
    return stored


async def _entries_of(reader: CheckpointReader, key: bytes) -> dict[bytes, BundleEntry]:
    """A tensor's entry, and its pieces' for a partitioned one; errors name the tensor."""
    entry = await reader.entry(key)
    found = {key: entry}
    try:
        if entry.slices:
            check_tiling(entry.shape, entry.slices)
            for piece, piece_key in piece_keys(key, entry):
                try:
                    piece_entry: BundleEntry | None = await reader.entry(piece_key)
                except StreamCkptError:
                    piece_entry = None
                found[piece_key] = check_piece(entry, piece, piece_entry)
    except StreamCkptError as exc:
        raise exc.with_context(uri=reader.uri, tensor=key_to_name(key)) from None
    return found


def _chunk_and_concurrency(budget_bytes: int, *, held_per_read: int) -> tuple[int, int]:
    """A read's size and how many may be in flight, ``held_per_read`` buffers each."""
    if budget_bytes < 1:
        raise ValueError(f"budget_bytes must be >= 1, got {budget_bytes}")
    chunk = max(1, min(_MAX_CHUNK, budget_bytes // held_per_read))
    return chunk, max(1, min(_MAX_CONCURRENT, budget_bytes // (held_per_read * chunk)))


async def verify_checkpoint(
    prefix: PathLike,
    *,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
    storage_options: dict[str, Any] | None = None,
    progress: ProgressCallback | None = None,
) -> dict[str, StreamCkptError]:
    """Check the crc32c of every stored byte; every tensor that fails, by name, in order.

    Holds about ``budget_bytes`` at most, however large a tensor is. A tensor that fails
    is reported once (its first failure, with shard and offset; for a partitioned tensor,
    the failing piece's), and the others are still checked. An index that cannot be read
    at all raises, as ``open`` does.
    """
    chunk, concurrent = _chunk_and_concurrency(budget_bytes, held_per_read=1)
    store, path = resolve(prefix, storage_options=storage_options)
    if progress is not None:
        store.stats.on_bytes = progress
    failures: dict[str, StreamCkptError] = {}
    async with await open_reader(store, path, use_cache=False) as reader:
        stored: dict[bytes, BundleEntry] = {}
        owner: dict[bytes, str] = {}  # a piece's failure is its tensor's
        for info in reader.entries.values():
            try:
                found = await _entries_of(reader, info.key)
            except StreamCkptError as exc:
                failures[info.name] = exc
                continue
            stored.update(found)
            owner.update({key: info.name for key in found})
        checker = _Checker(reader, stored)
        by_shard: dict[int, list[tuple[bytes, BundleEntry]]] = {}
        for key, entry in sorted(stored.items(), key=lambda item: item[1].offset):
            if not entry.slices:
                by_shard.setdefault(entry.shard_id, []).append((key, entry))
        limiter = anyio.CapacityLimiter(concurrent)

        async def check_shard(entries: list[tuple[bytes, BundleEntry]]) -> None:
            for read in plan_ranges(entries, chunk=chunk):
                if all(owner[part.key] in failures for part in read.parts):
                    continue
                async with limiter:
                    try:
                        data = await _fetch(reader, read)
                    except StreamCkptError as exc:
                        for part in read.parts:
                            failures.setdefault(owner[part.key], exc)
                        continue
                    await anyio.to_thread.run_sync(_check_all, checker, read, data, owner, failures)

        with unwrap_task_group():
            async with anyio.create_task_group() as tg:
                for entries in by_shard.values():
                    tg.start_soon(check_shard, entries)
    return {name: failures[name] for name in sorted(failures)}


def _check_all(
    checker: _Checker,
    read: ShardRange,
    data: memoryview,
    owner: Mapping[bytes, str],
    failures: dict[str, StreamCkptError],
) -> None:
    for part in read.parts:
        if owner[part.key] in failures:
            continue
        try:
            checker.check(part, data[part.start - read.start : part.end - read.start])
        except StreamCkptError as exc:
            failures[owner[part.key]] = exc


async def copy_checkpoint(
    src: PathLike,
    dst: PathLike,
    *,
    num_shards: int | None = None,
    overwrite: bool = False,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
    storage_options: dict[str, Any] | None = None,
    dst_storage_options: dict[str, Any] | None = None,
    progress: ProgressCallback | None = None,
) -> SaveInfo:
    """Copy the checkpoint at ``src`` to ``dst``, holding about ``budget_bytes`` at most.

    ``num_shards=None`` keeps the source's shard count and layout: the files come out
    byte for byte as the source's. ``progress`` gets byte counts as they reach the
    destination. ``storage_options`` are the source's, and the destination's too unless
    ``dst_storage_options`` is given.
    """
    started = time.perf_counter()
    # each shard in flight holds one range read and about one chunk in its writer
    chunk, concurrent = _chunk_and_concurrency(budget_bytes, held_per_read=2)
    src_store, src_path = resolve(src, storage_options=storage_options)
    dst_store, dst_path = resolve(
        dst,
        storage_options=storage_options if dst_storage_options is None else dst_storage_options,
        max_inflight_bytes=budget_bytes,
    )
    if progress is not None:
        dst_store.stats.on_bytes = progress
    async with await open_reader(src_store, src_path, use_cache=False) as reader:
        stored = await _stored_entries(reader)
        sizes = {key: e.size for key, e in stored.items() if not e.slices}
        plan = _layout(stored, sizes, reader.header.num_shards) if num_shards is None else None
        if plan is None:
            count = reader.header.num_shards if num_shards is None else num_shards
            plan = plan_save(sizes=sizes, num_shards=count)
        async with claimed(dst_store, dst_path, overwrite=overwrite) as claim:
            session = await begin(dst_store, dst_path, overwrite=overwrite)
            paths = [session.write_path(i, plan.num_shards) for i in range(plan.num_shards)]
            outcome = Outcome()
            try:
                results = await _write_shards(
                    reader, dst_store, paths, stored, plan, chunk=chunk, concurrent=concurrent
                )
                await verify_shards(dst_store, paths, results)
                header = reader.header.replace(num_shards=plan.num_shards)
                placed = plan.placements
                entries = [
                    (key, _moved(entry, placed.get(key))) for key, entry in sorted(stored.items())
                ]
                index_bytes = await anyio.to_thread.run_sync(encode_index, header, entries)
                await commit(
                    dst_store, session, claim, index_bytes, outcome, paths, overwrite=overwrite
                )
            finally:
                if not outcome.committed:
                    await abandon(dst_store, session, claim, paths)
                else:
                    with anyio.CancelScope(shield=True):
                        await dst_store.drain()
            await tidy(dst_store, session, num_shards=plan.num_shards)
        tensors = len(reader.entries)
    return SaveInfo(
        prefix=dst_store.uri(dst_path),
        num_shards=plan.num_shards,
        num_tensors=tensors,
        bytes_written=sum(sizes.values()),
        index_bytes=len(index_bytes),
        files=(*(dst_store.uri(p) for p in paths), dst_store.uri(session.index_path)),
        seconds=time.perf_counter() - started,
        seconds_by_phase={},
        stats=dst_store.stats.snapshot(),
    )


def _layout(
    stored: Mapping[bytes, BundleEntry], sizes: Mapping[bytes, int], num_shards: int
) -> SavePlan | None:
    """The source's own layout, when it is one a writer could have made: packed, in order.

    Kept, the shards come out byte for byte as the source's; a layout with gaps or overlaps
    (a hand-made file) is re-planned instead.
    """
    shards: list[list[Placement]] = [[] for _ in range(num_shards)]
    for key in sizes:
        entry = stored[key]
        if not 0 <= entry.shard_id < num_shards:
            return None
        shards[entry.shard_id].append(Placement(key, entry.shard_id, entry.offset, entry.size))
    for shard in shards:
        shard.sort(key=lambda p: (p.offset, p.key))
        end = 0
        for placement in shard:
            if placement.offset != end:
                return None
            end += placement.size
    return SavePlan(num_shards=num_shards, shards=tuple(tuple(s) for s in shards))


def _moved(entry: BundleEntry, placement: Placement | None) -> BundleEntry:
    if placement is None:  # a partitioned tensor's full entry owns no bytes
        return entry
    return entry.replace(shard_id=placement.shard_id, offset=placement.offset)


async def _write_shards(
    reader: CheckpointReader,
    store: Store,
    paths: Sequence[str],
    stored: Mapping[bytes, BundleEntry],
    plan: SavePlan,
    *,
    chunk: int,
    concurrent: int,
) -> list[ShardResult]:
    sizes = [plan.shard_bytes(i) for i in range(plan.num_shards)]
    writers = anyio.CapacityLimiter(min(concurrent, store.plan_writers(sizes)))
    results: list[ShardResult | None] = [None] * plan.num_shards
    checker = _Checker(reader, stored)

    async def run_shard(shard_id: int) -> None:
        entries = [(p.key, stored[p.key]) for p in plan.shards[shard_id]]
        ranges = plan_ranges(entries, chunk=chunk)

        def fetch(read: ShardRange) -> memoryview:
            return anyio.from_thread.run(_fetch, reader, read)

        stream = functools.partial(
            _stream_shard, ranges, fetch, checker, sizes[shard_id], store.reports_crc32c
        )
        write = functools.partial(store.write_object, chunk_bytes=chunk)
        try:
            results[shard_id] = await anyio.to_thread.run_sync(
                write, paths[shard_id], stream, limiter=writers
            )
        except StreamCkptError as exc:
            raise exc.with_context(shard=shard_id) from None

    with unwrap_task_group():
        async with anyio.create_task_group() as tg:
            for shard_id in range(plan.num_shards):
                tg.start_soon(run_shard, shard_id)
    return [result for result in results if result is not None]


def _stream_shard(
    ranges: Sequence[ShardRange],
    fetch: Callable[[ShardRange], memoryview],
    checker: _Checker,
    size: int,
    whole_crc: bool,
    writer: ShardWriter,
) -> ShardResult:
    """Runs in a worker thread; a store that retries restarts it from the top."""
    shard_crc = 0
    crcs: dict[bytes, int] = {}
    for read in ranges:
        data = fetch(read)
        for part in read.parts:
            checker.check(part, data[part.start - read.start : part.end - read.start])
            if part.last:
                crcs[part.key] = checker.stored[part.key].crc32c
        if whole_crc:
            shard_crc = crc32c(data, shard_crc)
        writer.write(data)
        del data  # one range per shard held, not two, while the next one is read
    return ShardResult(crcs, size, shard_crc if whole_crc else None)
