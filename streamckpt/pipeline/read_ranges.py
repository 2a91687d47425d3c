"""Whole tensors of an open checkpoint: merged ranged reads, each entry verified as it lands.

:class:`RangeReader` adds to the index side (:class:`~streamckpt.pipeline.read_index.
IndexReader`) the fetch of byte ranges: the entries asked for (a partitioned tensor's
pieces among them) are planned into merged reads of neighbours (:func:`~streamckpt.pipeline.
plan.plan_reads`), fetched several at a time, and each entry is checked by its crc32c and
decoded in a worker thread while the next reads are in flight. Every judgement of bytes is a
pure function of :mod:`streamckpt.format`; its error gets the URI, tensor and shard here.

Invariant: nothing is allocated from a size an entry claims before the bytes are known to
exist (large claims are checked against the shard's real size first).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import anyio
import numpy as np

from streamckpt.errors import CheckpointNotFoundError, StreamCkptError, unwrap_task_group
from streamckpt.format.bundle import BundleEntry, check_within_shard, key_to_name, name_to_key
from streamckpt.format.dtypes import numpy_dtype
from streamckpt.format.partitioned import check_tiling, piece_keys, tensor_keys
from streamckpt.format.payload import decode_tensor
from streamckpt.format.slices import TensorSlice
from streamckpt.pipeline.index import IndexState
from streamckpt.pipeline.plan import Placement, ReadGroup, plan_reads
from streamckpt.pipeline.read_index import IndexReader
from streamckpt.storage import ByteRange, Store

# Reads of one shard closer than the store's read_gap are merged, each merged read below this.
DEFAULT_MAX_GROUP_BYTES = 64 << 20
# Tensors claiming more than this are checked against the shard's real size before any buffer
# is allocated for them (a hostile index must not make us allocate what it merely claims).
_SIZE_CHECK_THRESHOLD = 16 << 20
DEFAULT_MAX_CONCURRENT_READS = 16


class RangeReader(IndexReader):
    """Whole tensors of an open checkpoint, fetched with merged ranged reads and verified."""

    def __init__(self, store: Store, prefix_path: str, state: IndexState) -> None:
        super().__init__(store, prefix_path, state)
        self.max_concurrent_reads = DEFAULT_MAX_CONCURRENT_READS
        #: ranges of one shard this close are fetched in one request (the gap is read too)
        self.max_gap = store.read_gap

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
