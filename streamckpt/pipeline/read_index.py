"""The index side of an open checkpoint: its header, its entries, and lookups of one entry.

:class:`IndexReader` answers what the index says, reading as little of it as it can: opening
(:func:`streamckpt.pipeline.read.open_reader`) costs one suffix read of the .index file,
which usually holds the footer, the index block and, for small checkpoints, every data block
too; looking up one tensor in a huge index then costs one more read (its data block), and
``load_index`` fetches all data blocks at once. The state it reads into
(:class:`~streamckpt.pipeline.index.IndexState`) is shared by the readers of one index
through the index cache. Data reads build on it: :mod:`streamckpt.pipeline.read_ranges`
(whole tensors) and :mod:`streamckpt.pipeline.read` (boxes and regions of them).
"""

from __future__ import annotations

import anyio

from streamckpt.errors import StreamCkptError, TensorNotFoundError, unwrap_task_group
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
from streamckpt.format.index_file import decode_records
from streamckpt.format.partitioned import check_piece, tensor_keys
from streamckpt.format.slices import TensorSlice
from streamckpt.format.table import BlockHandle, decode_block, iter_data_block, lookup_in_block
from streamckpt.pipeline.index import IndexState
from streamckpt.pipeline.info import TensorInfo, info_of
from streamckpt.storage import Store


class IndexReader:
    """What the index of an open checkpoint says; entries may load lazily."""

    def __init__(self, store: Store, prefix_path: str, state: IndexState) -> None:
        self.store = store
        self.prefix_path = prefix_path
        self.uri = store.uri(prefix_path)
        self._s = state
        #: True when the index came from the cache (a stale one is retried by the API)
        self.from_cache = False
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

    def shard_path(self, shard_id: int) -> str:
        return data_filename(self.prefix_path, shard_id, self.header.num_shards)

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
