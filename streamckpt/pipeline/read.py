"""Read: open (one ranged read of the index tail) -> plan -> coalesce -> fetch -> verify.

These modules only run plans: every judgement of bytes and entries (sizes, shapes, dtypes,
slices, checksums) is a pure function of :mod:`streamckpt.format`, called with what the
reads returned, and its error gets the URI, tensor and shard added here. One open checkpoint
is one :class:`CheckpointReader`, built in three layers, a module each:

- :mod:`streamckpt.pipeline.read_index`: what the index says (header, entries, lookups);
- :mod:`streamckpt.pipeline.read_ranges`: whole tensors, by merged ranged reads;
- this module: opening (:func:`open_reader`), and reads of part of a tensor. A box or a
  basic index of a tensor reads only the bytes it needs: of a plain tensor, of the pieces
  of a partitioned one that it meets (``read_boxes``, planned by
  :mod:`streamckpt.pipeline.region`).

Invariants: every whole-entry read (a whole tensor, or a whole piece of one) verifies the
entry's crc32c before a value is returned (a read of part of an entry cannot: the checksum
covers whole entries only); nothing is allocated from a size an entry claims before the
bytes are known to exist (large claims are checked against the shard's real size first);
errors name URI, tensor, shard and offset.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import numpy as np

from streamckpt.errors import CheckpointNotFoundError, StreamCkptError, unwrap_task_group
from streamckpt.format.bundle import BundleEntry, index_filename, key_to_name, name_to_key
from streamckpt.format.dtypes import is_fixed_size, itemsize, numpy_dtype
from streamckpt.format.partitioned import check_tiling
from streamckpt.format.payload import check_payload_size
from streamckpt.format.slices import encode_slice_key_tail, slice_key_head
from streamckpt.format.table import (
    FOOTER_SIZE,
    IndexBlock,
    decode_block,
    decode_footer,
    decode_index_block,
    table_size_from_tail,
)
from streamckpt.pipeline.index import INDEX_CACHE, IndexState
from streamckpt.pipeline.plan import Placement, plan_reads
from streamckpt.pipeline.read_ranges import DEFAULT_MAX_GROUP_BYTES, RangeReader
from streamckpt.pipeline.region import PieceRead, Region, plan_box, plan_piece_reads, plan_region
from streamckpt.sharding import Box, box_shape, full_box
from streamckpt.storage import Store

# First read of an index: enough for footer + index block of any realistic checkpoint, and the
# whole index of a checkpoint with up to ~1,000 tensors.
DEFAULT_TAIL_BYTES = 64 << 10
# A box read of one stored entry is at most this many requests: past it, gaps are read too.
DEFAULT_MAX_RUNS = 4096


class CheckpointReader(RangeReader):
    """An open checkpoint. Create with :func:`open_reader`; entries may load lazily.

    What the index says comes from :class:`~streamckpt.pipeline.read_index.IndexReader`,
    whole tensors from :class:`~streamckpt.pipeline.read_ranges.RangeReader`; this class adds
    reads of part of a tensor: a basic index, a box.
    """

    def __init__(self, store: Store, prefix_path: str, state: IndexState) -> None:
        super().__init__(store, prefix_path, state)
        #: a box read of one stored entry makes at most this many requests (then reads gaps)
        self.max_runs = DEFAULT_MAX_RUNS

    async def read(self, name: str | bytes, index: Any = None) -> np.ndarray[Any, Any]:
        """One tensor, or with ``index`` (basic numpy indexing) only the bytes it needs.

        Of a partitioned tensor that is the index's bounding box (a step reads its span),
        from the pieces it meets; see :meth:`read_boxes`.
        """
        key = name_to_key(name)
        if index is None:
            return (await self.read_many([key]))[key_to_name(key)]
        entry = await self.entry(key)
        if is_fixed_size(entry.dtype) and not entry.slices:
            region = plan_region(entry.shape, itemsize(entry.dtype), index)
            if region is not None:
                return await self._read_region(key, entry, region)
        elif is_fixed_size(entry.dtype):
            # a partitioned tensor: the index's bounding box, from the pieces it meets
            plan = plan_box(entry.shape, index)
            if plan is not None:
                if plan.is_empty:
                    return np.empty(plan.result_shape, dtype=numpy_dtype(entry.dtype))
                (boxed,) = await self.read_boxes([(key, plan.box)])
                if plan.picks_whole_box:
                    return boxed
                return np.array(boxed[plan.inner_index], copy=True)
        whole = (await self.read_many([key]))[key_to_name(key)]
        return np.array(whole[index], copy=True)

    async def read_boxes(
        self, requests: Sequence[tuple[str | bytes, Box]]
    ) -> list[np.ndarray[Any, Any]]:
        """For every ``(name, box)``, that box of the tensor, fetching only what it needs.

        A box is per axis a half-open ``(start, stop)`` inside the tensor's shape (see
        :mod:`streamckpt.sharding`); results come in request order, each a new array of the
        box's shape. Everything is planned before anything is fetched: for a partitioned
        tensor, the pieces the box meets (the others cost nothing) and per piece the byte
        runs it needs (:func:`~streamckpt.pipeline.region.plan_piece_reads`); then all runs
        of all requests are fetched at once, bounded by :attr:`max_concurrent_reads`, runs
        of one shard closer than :attr:`max_gap` in one request, a run several requests need
        once. An entry the box covers (a whole plain tensor, a whole piece) is read whole
        and verified by its crc32c; runs of an entry are not (the checksum covers whole
        entries only), as for ``read(name, index=...)``. Strings and variants have no byte
        position per element: they are read whole, verified, and cut.
        """
        t0 = time.perf_counter()
        keys = [name_to_key(name) for name, _ in requests]
        await self._load_index_for(len(keys))
        entries = [await self.entry(key) for key in keys]
        boxes = [
            _checked_box(key, box, entry.shape)
            for key, (_, box), entry in zip(keys, requests, entries, strict=True)
        ]
        results: list[np.ndarray[Any, Any] | None] = [None] * len(requests)
        whole_reads: list[int] = []  # variable-size dtypes
        wanted: dict[Placement, list[tuple[_Copy, tuple[int, ...]]]] = {}
        direct: set[int] = set()  # requests whose result is one entry decoded as is
        for number, (key, entry, box) in enumerate(zip(keys, entries, boxes, strict=True)):
            if not is_fixed_size(entry.dtype):
                whole_reads.append(number)
                continue
            copies = await self._box_copies(number, key, entry, box)
            if (
                len(copies) == 1
                and copies[0].read.whole
                and copies[0].entry.shape == box_shape(box)
            ):
                direct.add(number)
            for copy in copies:
                for placement, position in _placements(copy):
                    wanted.setdefault(placement, []).append((copy, position))
        # large ranges a hostile index claims are checked against the shards' real sizes
        # before any result is allocated (a box is tiled by the ranges of its pieces)
        await self._check_fits(wanted)
        for number, (entry, box) in enumerate(zip(entries, boxes, strict=True)):
            if is_fixed_size(entry.dtype) and number not in direct:
                results[number] = np.empty(box_shape(box), dtype=numpy_dtype(entry.dtype))
        groups = plan_reads(wanted, max_gap=self.max_gap, max_group_bytes=DEFAULT_MAX_GROUP_BYTES)

        def consume(placement: Placement, payload: memoryview) -> None:
            decoded: dict[bytes, np.ndarray[Any, Any]] = {}
            for copy, position in wanted[placement]:
                if copy.read.runs is not None:
                    out = results[copy.request]
                    assert out is not None
                    self._copy_run(out, copy, position, payload)
                    continue
                array = decoded.get(copy.key)
                fresh = array is None
                if array is None:
                    array = decoded[copy.key] = self._verify_whole(copy, payload)
                if copy.request in direct:
                    results[copy.request] = array if fresh else array.copy()
                else:
                    out = results[copy.request]
                    assert out is not None
                    out[copy.read.target] = array

        async def read_whole() -> None:
            names = [keys[number] for number in whole_reads]
            arrays = await self.read_many(names)
            for number in whole_reads:
                index = tuple(slice(lo, hi) for lo, hi in boxes[number])
                results[number] = np.array(arrays[key_to_name(keys[number])][index], copy=True)

        with unwrap_task_group():
            async with anyio.create_task_group() as tg:
                if groups:
                    tg.start_soon(self._fetch_ranges, groups, consume)
                if whole_reads:
                    tg.start_soon(read_whole)
        self._timed("read_boxes", time.perf_counter() - t0)
        out: list[np.ndarray[Any, Any]] = []
        for result in results:
            assert result is not None
            out.append(result)
        return out

    async def _box_copies(
        self, request: int, key: bytes, entry: BundleEntry, box: Box
    ) -> list[_Copy]:
        """What to fetch of ``box`` of one tensor: its stored entries that meet it, and how.

        A plain tensor is one piece, the whole tensor. A partitioned one must be tiled by its
        pieces (checked, linear in their number); only the pieces the box meets are looked
        up and checked against the full entry. Runs are placed by an entry's shape: that its
        size is exactly its shape's bytes was checked when the entry was decoded.
        """
        size = itemsize(entry.dtype)
        limits = {"max_gap": self.max_gap, "max_runs": self.max_runs}
        if not entry.slices:
            reads = plan_piece_reads(box, [full_box(entry.shape)], size, **limits)
            copies = [_Copy(request, key, key, entry, read) for read in reads]
        else:
            try:
                check_tiling(entry.shape, entry.slices)
                pieces = [
                    tuple((s.start, s.stop) for s in piece.index_in(entry.shape))
                    for piece in entry.slices
                ]
            except StreamCkptError as exc:
                raise exc.with_context(uri=self.uri, tensor=key_to_name(key)) from None
            reads = plan_piece_reads(box, pieces, size, **limits)
            await self._load_index_for(len(reads))
            head = slice_key_head(key)
            copies = []
            for read in reads:
                piece = entry.slices[read.piece]
                piece_key = head + encode_slice_key_tail(piece)
                piece_entry = await self._piece_entry(key, entry, piece, piece_key)
                copies.append(_Copy(request, key, piece_key, piece_entry, read))
        return copies

    def _verify_whole(self, copy: _Copy, payload: memoryview) -> np.ndarray[Any, Any]:
        """A whole entry checked by its crc32c; errors name the tensor, not the piece key."""
        return self._verify_and_decode(copy.key, copy.entry, payload, tensor=copy.tensor)

    def _copy_run(
        self,
        out: np.ndarray[Any, Any],
        copy: _Copy,
        position: tuple[int, ...],
        payload: memoryview,
    ) -> None:
        """Place one fetched run (its elements at ``position`` of the outer axes) in ``out``.

        Strided as raw bytes: as_strided loses dtypes whose typestr numpy cannot parse
        (ml_dtypes' float8_e5m2 is "<f1"), so elements move as opaque items of their size.
        """
        runs = copy.read.runs
        assert runs is not None
        check_payload_size(payload.nbytes, runs.length)
        raw = np.dtype((np.void, out.dtype.itemsize))
        source = np.lib.stride_tricks.as_strided(
            np.frombuffer(payload, dtype=raw),
            shape=runs.inner_shape,
            strides=runs.inner_strides,
            writeable=False,
        )
        outer = len(position)
        target = copy.read.target
        where = (
            *(target[axis].start + at for axis, at in enumerate(position)),
            *target[outer:],
        )
        if self.header.big_endian and out.dtype.itemsize > 1:
            stored = numpy_dtype(copy.entry.dtype, big_endian=True)
            out[where] = np.array(source, copy=True).view(stored).astype(out.dtype)
        else:
            out.view(raw)[where] = source

    async def _read_region(
        self, key: bytes, entry: BundleEntry, region: Region
    ) -> np.ndarray[Any, Any]:
        """Partial reads are not checked by crc32c (it covers the whole tensor only)."""
        if region.byte_length == 0:
            return np.empty(region.result_shape, dtype=numpy_dtype(entry.dtype))
        start = entry.offset + region.byte_start
        path = self.shard_path(entry.shard_id)
        # a slice of a hostile entry can claim as much as the entry itself: check it first
        await self._check_fits([Placement(key, entry.shard_id, start, region.byte_length)])
        try:
            data = await self.store.read_range(path, start, start + region.byte_length)
        except StreamCkptError as exc:
            raise exc.with_context(
                uri=self.store.uri(path),
                tensor=key_to_name(key),
                shard=entry.shard_id,
                offset=start,
            ) from None
        try:
            check_payload_size(memoryview(data).nbytes, region.byte_length)
        except StreamCkptError as exc:
            raise exc.with_context(
                uri=self.store.uri(path),
                tensor=key_to_name(key),
                shard=entry.shard_id,
                offset=start,
            ) from None
        dtype = numpy_dtype(entry.dtype, big_endian=self.header.big_endian)
        # strided as raw bytes: as_strided loses dtypes whose typestr numpy cannot parse
        # (ml_dtypes' float8_e5m2 is "<f1"), so the element type is put back after the copy
        flat = np.frombuffer(data, dtype=np.dtype((np.void, dtype.itemsize)))
        box = np.lib.stride_tricks.as_strided(
            flat, shape=region.box_shape, strides=region.box_strides, writeable=False
        )
        picked = np.array(box[region.inner_index], copy=True).view(dtype)
        result = picked.astype(numpy_dtype(entry.dtype), copy=False)
        return result

    async def __aenter__(self) -> CheckpointReader:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._s.blocks.clear()
        self._s.block_records.clear()


@dataclass(frozen=True, slots=True)
class _Copy:
    """Bytes of one stored entry that go into one box read's result (see ``read_boxes``)."""

    request: int
    tensor: bytes  # the tensor asked for (errors name it)
    key: bytes  # the stored entry: the tensor's own, or a piece's slice key
    entry: BundleEntry
    read: PieceRead


def _placements(copy: _Copy) -> Iterable[tuple[Placement, tuple[int, ...]]]:
    """The ranges ``copy`` needs, each with its run's position (none for a whole entry)."""
    entry, runs = copy.entry, copy.read.runs
    if runs is None:
        yield Placement(copy.tensor, entry.shard_id, entry.offset, entry.size), ()
        return
    for position, start in runs.positions():
        yield Placement(copy.tensor, entry.shard_id, entry.offset + start, runs.length), position


def _checked_box(key: bytes, box: Any, shape: tuple[int, ...]) -> Box:
    """``box`` as a Box, refused unless it is a (start, stop) per axis inside ``shape``."""
    try:
        normal = tuple((int(start), int(stop)) for start, stop in box)
    except (TypeError, ValueError):
        raise ValueError(
            f"tensor {key_to_name(key)!r}: a box is a (start, stop) pair per axis, not {box!r}"
        ) from None
    inside = len(normal) == len(shape) and all(
        0 <= start <= stop <= size for (start, stop), size in zip(normal, shape, strict=False)
    )
    if not inside:
        raise ValueError(f"box {normal} is not inside tensor {key_to_name(key)!r} of shape {shape}")
    return normal


async def open_reader(
    store: Store,
    prefix_path: str,
    *,
    load_index: bool = True,
    tail_bytes: int = DEFAULT_TAIL_BYTES,
    use_cache: bool = True,
) -> CheckpointReader:
    """Read the index's tail (footer, index block, often everything) and return a reader.

    With ``use_cache`` an index opened before (see :mod:`streamckpt.pipeline.index`) is reused
    without any request.
    """
    started = time.perf_counter()
    index_path = index_filename(prefix_path)
    uri = store.uri(index_path)
    cache_key = (store.cache_key, uri)
    version = await store.version(index_path)
    if use_cache:
        cached = INDEX_CACHE.get(cache_key, version=version)
        if cached is not None:
            reader = CheckpointReader(store, prefix_path, cached)
            reader.from_cache = True
            if load_index:
                await reader.load_index()
            reader._timed("open", time.perf_counter() - started)
            return reader
    try:
        tail, known_size = await store.read_suffix(index_path, tail_bytes)
    except CheckpointNotFoundError as exc:
        raise CheckpointNotFoundError(
            "no checkpoint at this prefix (its .index is missing)", uri=uri
        ) from exc
    try:
        size = known_size if known_size is not None else table_size_from_tail(tail)
        if size is None:
            size = await store.size(index_path)
        footer = decode_footer(tail[-FOOTER_SIZE:], file_size=size)
        handle = footer.index
        tail_start = size - len(tail)
        if handle.offset >= tail_start:
            base = handle.offset - tail_start
            stored: bytes | memoryview = memoryview(tail)[base : base + handle.size + 5]
        else:
            stored = bytes(
                await store.read_range(index_path, handle.offset, handle.end_with_trailer)
            )
        index = decode_index_block(
            decode_block(stored, offset=handle.offset),
            index_offset=handle.offset,
            limit=size - FOOTER_SIZE,
        )
        reader = CheckpointReader(store, prefix_path, IndexState(index, size, tail, version))
        reader._timed("open", time.perf_counter() - started)
        if load_index:
            await reader.load_index()
        elif reader._from_tail(*_first_block_span(index)) is not None:
            await reader.read_header()  # free: the first block came with the tail
    except StreamCkptError as exc:
        raise exc.with_context(uri=uri) from None
    INDEX_CACHE.put(cache_key, reader._s)
    return reader


def _first_block_span(index: IndexBlock) -> tuple[int, int]:
    if not index.handles:
        return (0, 0)
    first = index.handles[0]
    return first.offset, first.end_with_trailer
