"""Read: open (one ranged read of the index tail) -> plan -> coalesce -> fetch -> verify.

This module only runs plans: every judgement of bytes and entries (sizes, shapes, dtypes,
slices, checksums) is a pure function of :mod:`streamckpt.format`, called here with what the
reads returned, and its error gets the URI, tensor and shard added here.

Opening costs one suffix read of the .index file, which usually holds the footer, the index
block and, for small checkpoints, every data block too. Looking up one tensor in a huge index
then costs one more read (its data block); ``load_index`` fetches all data blocks at once.

A box or a basic index of a tensor reads only the bytes it needs: of a plain tensor, of the
pieces of a partitioned one that it meets (``read_boxes``, planned by
:mod:`streamckpt.pipeline.region`).

Invariants: every whole-entry read (a whole tensor, or a whole piece of one) verifies the
entry's crc32c before a value is returned (a read of part of an entry cannot: the checksum
covers whole entries only); nothing is allocated from a size an entry claims before the
bytes are known to exist (large claims are checked against the shard's real size first);
errors name URI, tensor, shard and offset.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import numpy as np

from streamckpt.errors import (
    CheckpointNotFoundError,
    StreamCkptError,
    TensorNotFoundError,
    unwrap_task_group,
)
from streamckpt.format.bundle import (
    HEADER_KEY,
    BundleEntry,
    BundleHeader,
    check_within_shard,
    data_filename,
    decode_entry,
    decode_records,
    header_block,
    header_in_block,
    index_filename,
    key_to_name,
    name_to_key,
)
from streamckpt.format.dtypes import is_fixed_size, itemsize, numpy_dtype
from streamckpt.format.partitioned import check_piece, check_tiling, piece_keys, tensor_keys
from streamckpt.format.payload import check_payload_size, decode_tensor
from streamckpt.format.slices import TensorSlice, encode_slice_key_tail, slice_key_head
from streamckpt.format.table import (
    FOOTER_SIZE,
    BlockHandle,
    IndexBlock,
    decode_block,
    decode_footer,
    decode_index_block,
    iter_data_block,
    lookup_in_block,
    table_size_from_tail,
)
from streamckpt.pipeline.index import INDEX_CACHE, IndexState
from streamckpt.pipeline.info import TensorInfo, info_of
from streamckpt.pipeline.plan import Placement, ReadGroup, plan_reads
from streamckpt.pipeline.region import (
    PieceRead,
    Region,
    plan_box,
    plan_piece_reads,
    plan_region,
)
from streamckpt.sharding import Box, box_shape, full_box
from streamckpt.storage import ByteRange, Store

# First read of an index: enough for footer + index block of any realistic checkpoint, and the
# whole index of a checkpoint with up to ~1,000 tensors.
DEFAULT_TAIL_BYTES = 64 << 10
# Reads of one shard closer than the store's read_gap are merged, each merged read below this.
DEFAULT_MAX_GROUP_BYTES = 64 << 20
# Tensors claiming more than this are checked against the shard's real size before any buffer
# is allocated for them (a hostile index must not make us allocate what it merely claims).
_SIZE_CHECK_THRESHOLD = 16 << 20
DEFAULT_MAX_CONCURRENT_READS = 16
# A box read of one stored entry is at most this many requests: past it, gaps are read too.
DEFAULT_MAX_RUNS = 4096


class CheckpointReader:
    """An open checkpoint. Create with :func:`open_reader`; entries may load lazily."""

    def __init__(self, store: Store, prefix_path: str, state: IndexState) -> None:
        self.store = store
        self.prefix_path = prefix_path
        self.uri = store.uri(prefix_path)
        self._s = state
        #: True when the index came from the cache (a stale one is retried by the API)
        self.from_cache = False
        self.max_concurrent_reads = DEFAULT_MAX_CONCURRENT_READS
        #: ranges of one shard this close are fetched in one request (the gap is read too)
        self.max_gap = store.read_gap
        #: a box read of one stored entry makes at most this many requests (then reads gaps)
        self.max_runs = DEFAULT_MAX_RUNS
        self.seconds_by_phase: dict[str, float] = {}
        # ``entries`` built once per decoded entries dict (checked by identity: the shared
        # state may load its entries after this reader was made)
        self._entries_view: tuple[dict[bytes, BundleEntry], dict[str, TensorInfo]] | None = None

    def _timed(self, phase: str, seconds: float) -> None:
        self.seconds_by_phase[phase] = self.seconds_by_phase.get(phase, 0.0) + seconds

    @property
    def stats(self) -> dict[str, float]:
        """Requests, bytes, retries, throttles so far, and seconds per phase."""
        out: dict[str, float] = dict(self.store.stats.snapshot())
        out.update({f"seconds_{k}": v for k, v in self.seconds_by_phase.items()})
        return out

    # -- index --------------------------------------------------------------------------

    @property
    def header(self) -> BundleHeader:
        if self._s.header is None:
            raise RuntimeError("the bundle header has not been read")
        return self._s.header

    async def read_header(self) -> BundleHeader:
        """The bundle header: the first record of the first data block."""
        if self._s.header is None:
            first = header_block(self._s.index)
            block = await self._block(first)
            self._s.header = header_in_block(block, offset=first.offset)
        return self._s.header

    @property
    def index_uri(self) -> str:
        return self.store.uri(index_filename(self.prefix_path))

    def _from_tail(self, start: int, end: int) -> memoryview | None:
        if start >= self._s.tail_start and end <= self._s.index_size:
            base = start - self._s.tail_start
            return memoryview(self._s.tail)[base : base + end - start]
        return None

    async def _fetch_index_bytes(self, start: int, end: int) -> bytes | memoryview:
        cached = self._from_tail(start, end)
        if cached is not None:
            return cached
        path = index_filename(self.prefix_path)
        return bytes(await self.store.read_range(path, start, end))

    async def load_index(self) -> None:
        """Fetch every data block of the index (one read) and decode all entries."""
        if self._s.entries is not None:
            return
        handles = self._s.index.handles
        if not handles:
            self._s.entries = {}
            return
        start, end = self._s.index.data_span
        span = await self._fetch_index_bytes(start, end)
        view = memoryview(span)
        blocks = [(view[h.offset - start : h.end_with_trailer - start], h.offset) for h in handles]
        try:
            decoded = await anyio.to_thread.run_sync(decode_records, blocks)
        except StreamCkptError as exc:
            raise exc.with_context(uri=self.index_uri) from None
        self._s.entries = decoded.entries
        self._s.header = decoded.header

    @property
    def entries(self) -> dict[str, TensorInfo]:
        """Every tensor by name (the pieces of partitioned tensors are left out).

        Built on first access and then returned as is, so a caller looking up many names
        pays for the dict once; treat it as read-only.
        """
        decoded = self._s.entries
        if decoded is None:
            raise RuntimeError("the index is not loaded; open with load_index=True")
        view = self._entries_view
        if view is None or view[0] is not decoded:
            infos = {key_to_name(k): info_of(k, decoded[k]) for k in tensor_keys(decoded)}
            view = self._entries_view = (decoded, infos)
        return view[1]

    async def _block(self, handle: BlockHandle) -> bytes | memoryview:
        block = self._s.blocks.get(handle.offset)
        if block is None:
            stored = await self._fetch_index_bytes(handle.offset, handle.end_with_trailer)
            try:
                block = decode_block(stored, offset=handle.offset)
            except StreamCkptError as exc:
                raise exc.with_context(uri=self.index_uri) from None
            self._s.blocks[handle.offset] = block
        return block

    async def entry(self, name: str | bytes) -> BundleEntry:
        """The entry of one tensor, reading at most one index block if not loaded yet."""
        key = name_to_key(name)
        if self._s.entries is not None:
            found = self._s.entries.get(key)
        elif key in self._s.lookups:
            found = self._s.lookups[key]
        else:
            found = None
            handle = self._s.index.find(key) if key != HEADER_KEY else None
            if handle is not None:
                if self._s.header is None and handle.offset == self._s.index.handles[0].offset:
                    await self.read_header()  # the key sits in the header's own block
                elif self._s.header is None:
                    # the header's block and this key's block in one round trip
                    with unwrap_task_group():
                        async with anyio.create_task_group() as tg:
                            tg.start_soon(self.read_header)
                            tg.start_soon(self._block, handle)
                block = await self._block(handle)
                value = self._lookup_in_block(handle, block, key)
                if value is not None:
                    try:
                        found = decode_entry(value, num_shards=self.header.num_shards)
                    except StreamCkptError as exc:
                        raise exc.with_context(
                            uri=self.index_uri, tensor=key_to_name(key), offset=handle.offset
                        ) from None
            self._s.lookups[key] = found
        if found is None or key == HEADER_KEY:
            raise TensorNotFoundError(
                "no such tensor in the checkpoint", uri=self.uri, tensor=key_to_name(key)
            )
        return found

    def _lookup_in_block(
        self, handle: BlockHandle, block: bytes | memoryview, key: bytes
    ) -> memoryview | None:
        """The value under ``key`` in one data block, or None.

        The first lookup in a block is a binary search; a second parses the whole block into
        a dict once. A block with a single restart point makes every search a scan of the
        block, and many lookups (one per piece of a partitioned tensor) would otherwise cost
        lookups x block size.
        """
        records = self._s.block_records.get(handle.offset)
        if records is None:
            if handle.offset not in self._s.searched_blocks:
                self._s.searched_blocks.add(handle.offset)
                return lookup_in_block(block, key, offset=handle.offset)
            records = dict(iter_data_block(block, offset=handle.offset))
            self._s.block_records[handle.offset] = records
        return records.get(key)

    async def info(self, name: str | bytes) -> TensorInfo:
        """What the index says about one tensor (one block read at most when not loaded)."""
        key = name_to_key(name)
        return info_of(key, await self.entry(key))

    # -- data ---------------------------------------------------------------------------

    def shard_path(self, shard_id: int) -> str:
        return data_filename(self.prefix_path, shard_id, self.header.num_shards)

    async def _check_fits(self, placements: Iterable[Placement]) -> None:
        """Large claimed sizes are checked against the real shard size before allocating."""
        for p in placements:
            if p.size <= _SIZE_CHECK_THRESHOLD:
                continue
            size = self._s.shard_sizes.get(p.shard_id)
            if size is None:
                size = await self.store.size(self.shard_path(p.shard_id))
                self._s.shard_sizes[p.shard_id] = size
            try:
                check_within_shard(
                    shard_id=p.shard_id, offset=p.offset, size=p.size, shard_size=size
                )
            except StreamCkptError as exc:
                raise exc.with_context(
                    uri=self.store.uri(self.shard_path(p.shard_id)), tensor=key_to_name(p.key)
                ) from None

    async def _fetch_groups(
        self, groups: Sequence[ReadGroup], plain: Mapping[bytes, BundleEntry]
    ) -> dict[bytes, np.ndarray[Any, Any]]:
        """Fetch merged ranges of whole tensors; verify and decode each as it arrives."""
        results: dict[bytes, np.ndarray[Any, Any]] = {}

        def consume(p: Placement, payload: memoryview) -> None:
            results[p.key] = self._verify_and_decode(p.key, plain[p.key], payload)

        await self._fetch_ranges(groups, consume)
        return results

    async def _fetch_ranges(
        self, groups: Sequence[ReadGroup], consume: Callable[[Placement, memoryview], None]
    ) -> None:
        """Fetch merged ranges concurrently; hand every member's bytes to ``consume``.

        ``consume`` runs on views of the fetched buffers (no copy), in a worker thread per
        batch, so that checking one batch overlaps with fetching the next; a batch's buffers
        are let go once it is consumed.
        """
        limiter = anyio.CapacityLimiter(self.max_concurrent_reads)

        async def fetch_shard(shard_id: int, shard_groups: list[ReadGroup]) -> None:
            path = self.shard_path(shard_id)
            async with limiter:
                try:
                    buffers = await self.store.read_ranges(
                        path, [ByteRange(g.start, g.end) for g in shard_groups]
                    )
                except StreamCkptError as exc:
                    if isinstance(exc, CheckpointNotFoundError):
                        exc.message = "data shard is missing"
                    raise exc.with_context(
                        uri=self.store.uri(path),
                        shard=shard_id,
                        tensor=key_to_name(shard_groups[0].members[0].key)
                        if len(shard_groups) == 1 and len(shard_groups[0].members) == 1
                        else None,
                    ) from None

            def consume_batch() -> None:
                for group, buffer in zip(shard_groups, buffers, strict=True):
                    view = memoryview(buffer)
                    for p in group.members:
                        consume(p, view[p.offset - group.start : p.offset - group.start + p.size])

            await anyio.to_thread.run_sync(consume_batch)

        by_shard: dict[int, list[ReadGroup]] = {}
        for g in groups:
            by_shard.setdefault(g.shard_id, []).append(g)
        with unwrap_task_group():
            async with anyio.create_task_group() as tg:
                for shard_id, shard_groups in by_shard.items():
                    # split the shard's groups into batches so several requests overlap
                    for i in range(0, len(shard_groups), 2):
                        tg.start_soon(fetch_shard, shard_id, shard_groups[i : i + 2])

    def _verify_and_decode(
        self, key: bytes, entry: BundleEntry, payload: memoryview, *, tensor: bytes | None = None
    ) -> np.ndarray[Any, Any]:
        """Entry ``key`` checked by its crc32c; errors name ``tensor`` (a piece's tensor)."""
        buffer = payload if payload.readonly is False else bytearray(payload)
        try:
            return decode_tensor(
                buffer,
                dtype=entry.dtype,
                shape=entry.shape,
                big_endian=self.header.big_endian,
                expected_crc=entry.crc32c,
            )
        except StreamCkptError as exc:
            # the payload codecs report offsets inside the payload; ours are file offsets
            inside, exc.offset = exc.offset, None
            raise exc.with_context(
                uri=self.store.uri(self.shard_path(entry.shard_id)),
                tensor=key_to_name(key if tensor is None else tensor),
                shard=entry.shard_id,
                offset=entry.offset + (inside or 0),
            ) from None

    async def _plain_entries(
        self, keys: Sequence[bytes]
    ) -> tuple[dict[bytes, BundleEntry], dict[bytes, list[tuple[TensorSlice, bytes]]]]:
        """Entries to fetch for ``keys``: partitioned tensors expand to their slice pieces."""
        plain: dict[bytes, BundleEntry] = {}
        pieces: dict[bytes, list[tuple[TensorSlice, bytes]]] = {}
        await self._load_index_for(len(keys))
        for key in keys:
            entry = await self.entry(key)
            if not entry.slices:
                plain[key] = entry
                continue
            try:
                check_tiling(entry.shape, entry.slices)
            except StreamCkptError as exc:
                raise exc.with_context(uri=self.uri, tensor=key_to_name(key)) from None
            pieces[key] = []
            if entry.num_elements == 0:
                continue  # nothing to copy: its pieces are not even looked up
            await self._load_index_for(len(entry.slices))
            for piece, piece_key in piece_keys(key, entry):
                plain[piece_key] = await self._piece_entry(key, entry, piece, piece_key)
                pieces[key].append((piece, piece_key))
        return plain, pieces

    async def _piece_entry(
        self, key: bytes, entry: BundleEntry, piece: TensorSlice, piece_key: bytes
    ) -> BundleEntry:
        """The checked entry of one piece of partitioned tensor ``key``; errors name it."""
        try:
            found: BundleEntry | None = await self.entry(piece_key)
        except TensorNotFoundError:
            found = None
        try:
            return check_piece(entry, piece, found)
        except StreamCkptError as exc:
            raise exc.with_context(uri=self.uri, tensor=key_to_name(key)) from None

    async def _load_index_for(self, lookups: int) -> None:
        """Load the whole index when that is cheaper than ``lookups`` lookups.

        One read of every data block costs no more than a read per lookup once lookups
        outnumber blocks, and the entries are then decoded once, in one pass.
        """
        if self._s.entries is None and lookups > len(self._s.index.handles):
            await self.load_index()

    async def read_many(
        self, names: Iterable[str | bytes] | None = None
    ) -> dict[str, np.ndarray[Any, Any]]:
        """Whole tensors, fetched with merged ranged reads, each verified by its crc32c.

        ``None`` reads every tensor (the whole index is loaded); its keys are taken straight
        from the entries, not through ``entries``' per-tensor descriptions.
        """
        if names is None:
            await self.load_index()
            assert self._s.entries is not None
            keys = tensor_keys(self._s.entries)
        else:
            keys = [name_to_key(n) for n in names]
        plain, pieces = await self._plain_entries(keys)
        placements = [Placement(k, e.shard_id, e.offset, e.size) for k, e in plain.items()]
        await self._check_fits(placements)
        groups = plan_reads(
            placements, max_gap=self.max_gap, max_group_bytes=DEFAULT_MAX_GROUP_BYTES
        )
        t0 = time.perf_counter()
        arrays = await self._fetch_groups(groups, plain)
        self._timed("fetch_verify_decode", time.perf_counter() - t0)

        def assemble_all() -> dict[str, np.ndarray[Any, Any]]:
            out: dict[str, np.ndarray[Any, Any]] = {}
            for key in keys:
                if key in pieces:
                    out[key_to_name(key)] = self._assemble(key, pieces[key], arrays)
                else:
                    out[key_to_name(key)] = arrays[key]
            return out

        if not pieces:
            return assemble_all()
        t0 = time.perf_counter()
        assembled = await anyio.to_thread.run_sync(assemble_all)
        self._timed("assemble", time.perf_counter() - t0)
        return assembled

    def _assemble(
        self,
        key: bytes,
        pieces: list[tuple[TensorSlice, bytes]],
        arrays: dict[bytes, np.ndarray[Any, Any]],
    ) -> np.ndarray[Any, Any]:
        entry = self._s.entries[key] if self._s.entries is not None else self._s.lookups[key]
        assert entry is not None
        full = np.empty(entry.shape, dtype=numpy_dtype(entry.dtype))
        for piece, piece_key in pieces:
            full[piece.index_in(entry.shape)] = arrays[piece_key]
        return full

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
