"""Save: prepare -> plan -> stream every shard concurrently -> commit the index.

Invariants:
- the index is written only after every shard write has been committed (fsync'd / uploaded),
  in one atomic step, create-only unless ``overwrite``; a reader that finds an index finds
  complete data;
- a save that fails or is cancelled removes every data file it created (cleanup is shielded
  from cancellation) and never touches another prefix's files;
- a tensor's bytes are never copied whole: each shard task streams views of the caller's
  arrays in chunks of ``chunk_bytes``, extending the tensor's crc32c as it goes.
"""

from __future__ import annotations

import functools
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread

from streamckpt.errors import CheckpointExistsError, StreamCkptError, unwrap_task_group
from streamckpt.format.bundle import (
    BundleEntry,
    BundleHeader,
    data_filename,
    encode_index,
    index_filename,
    name_to_key,
)
from streamckpt.format.crc import crc32c, mask
from streamckpt.pipeline.cache import INDEX_CACHE
from streamckpt.pipeline.plan import Placement, SavePlan, auto_num_shards, plan_save
from streamckpt.pipeline.tensors import PreparedTensor, prepare
from streamckpt.storage import Store
from streamckpt.storage.base import ShardWriter

DEFAULT_CHUNK_BYTES = 8 << 20
# Payloads up to this size are copied into a shared write buffer instead of written alone.
_SMALL_PAYLOAD = 256 << 10
# Shards written at once; each is one worker thread streaming sequentially.
DEFAULT_MAX_CONCURRENT_SHARDS = 16

ProgressCallback = Callable[[int], None]
# Mapping keys are invariant, so spell out the forms callers pass.
Tensors = Mapping[str, Any] | Mapping[bytes, Any] | Mapping[str | bytes, Any]


@dataclass(frozen=True, slots=True)
class SaveInfo:
    """What a save wrote, and how long it took."""

    prefix: str
    num_shards: int
    num_tensors: int
    bytes_written: int
    index_bytes: int
    files: tuple[str, ...]
    seconds: float
    seconds_by_phase: Mapping[str, float]
    #: requests, bytes_written, retries, throttles, failures of the store during the save
    stats: Mapping[str, int]


async def prepare_all(tensors: Tensors, *, copy: bool) -> dict[bytes, PreparedTensor]:
    """Payloads for every tensor, in one worker thread (string encoding and copies are CPU)."""

    def work() -> dict[bytes, PreparedTensor]:
        prepared: dict[bytes, PreparedTensor] = {}
        for name, value in tensors.items():
            key = name_to_key(name)
            if not key:
                raise ValueError("a tensor name must not be empty (it is the header's key)")
            if key in prepared:
                raise ValueError(f"duplicate tensor name {name!r}")
            try:
                prepared[key] = prepare(key, value, copy=copy)
            except StreamCkptError as exc:
                raise exc.with_context(tensor=str(name)) from None
        return prepared

    return await anyio.to_thread.run_sync(work)


@dataclass(frozen=True, slots=True)
class ShardResult:
    """What streaming one shard produced.

    Each tensor's masked crc32c, and the shard's own (unmasked) crc32c when the store can
    check it.
    """

    tensor_crcs: dict[bytes, int]
    size: int
    shard_crc: int | None


def _stream_shard(
    writer: ShardWriter,
    placements: Sequence[Placement],
    prepared: Mapping[bytes, PreparedTensor],
    chunk_bytes: int,
    whole_crc: bool,
) -> ShardResult:
    """Runs in a worker thread: write one shard's tensors in order, in bounded chunks.

    Small payloads are gathered into one buffer of up to ``chunk_bytes`` and written together
    (one system call or upload part for thousands of small tensors); large ones are written
    straight from the caller's memory, chunk by chunk. Every write is a cancellation point.
    """
    crcs: dict[bytes, int] = {}
    shard_crc = 0
    size = 0
    small = min(_SMALL_PAYLOAD, chunk_bytes)
    pending = bytearray()

    def flush() -> None:
        nonlocal shard_crc
        if pending:
            anyio.from_thread.check_cancelled()
            if whole_crc:
                shard_crc = crc32c(pending, shard_crc)
            writer.write(memoryview(pending))
            del pending[:]

    for placement in placements:
        tensor = prepared[placement.key]
        view = tensor.payload
        if len(view) <= small:
            crc = crc32c(view) if tensor.crc32c is None else 0
            pending += view
            if len(pending) >= chunk_bytes:
                flush()
        else:
            flush()
            crc = 0
            for start in range(0, len(view), chunk_bytes):
                anyio.from_thread.check_cancelled()
                chunk = view[start : start + chunk_bytes]
                if tensor.crc32c is None:
                    crc = crc32c(chunk, crc)
                if whole_crc:
                    shard_crc = crc32c(chunk, shard_crc)
                writer.write(chunk)
        size += len(view)
        crcs[placement.key] = tensor.crc32c if tensor.crc32c is not None else mask(crc)
    flush()
    return ShardResult(crcs, size, shard_crc if whole_crc else None)


class _WriterSlot:
    """One of a save's writer slots, for one shard (``storage.base.WriterSlot``)."""

    def __init__(self, writers: anyio.CapacityLimiter) -> None:
        self._writers = writers
        self._held = False

    async def acquire(self) -> None:
        await self._writers.acquire_on_behalf_of(self)
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._writers.release_on_behalf_of(self)

    def take(self) -> None:  # from the writer's thread
        if not self._held:
            anyio.from_thread.run(self.acquire)

    def give_back(self) -> None:  # from the writer's thread
        if self._held:
            anyio.from_thread.run_sync(self.release)


async def write_bundle(
    store: Store,
    prefix_path: str,
    prepared: Mapping[bytes, PreparedTensor],
    plan: SavePlan,
    *,
    overwrite: bool,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    max_concurrent_shards: int = DEFAULT_MAX_CONCURRENT_SHARDS,
    progress: ProgressCallback | None = None,
) -> SaveInfo:
    """Execute a save plan and commit the index. The executor behind :func:`save`."""
    started = time.perf_counter()
    phases: dict[str, float] = {}
    if progress is not None:
        store.stats.on_bytes = progress  # byte counts as they reach the store
    index_path = index_filename(prefix_path)
    index_uri = store.uri(index_path)
    replacing = await store.exists(index_path)
    if replacing and not overwrite:
        raise CheckpointExistsError(
            "a checkpoint already exists at this prefix (pass overwrite=True)", uri=index_uri
        )
    # Replacing a checkpoint: where the store can rename, the new shards are staged under
    # temporary names, so that a failed save leaves the old checkpoint whole. Elsewhere the old
    # index goes first (its data files are about to be rewritten in place): a failed save then
    # leaves no checkpoint at this prefix, never a mix of old and new.
    staged = replacing and store.supports_rename
    if replacing and not staged:
        await store.delete([index_path])
    directory = store.dirname(prefix_path)
    if directory:
        await store.make_dirs(directory)
    final_paths = [
        data_filename(prefix_path, shard_id, plan.num_shards) for shard_id in range(plan.num_shards)
    ]
    suffix = f".tmp-{secrets.token_hex(6)}"
    shard_paths = [p + suffix for p in final_paths] if staged else final_paths
    crcs: dict[bytes, int] = {}
    sizes = [plan.shard_bytes(shard_id) for shard_id in range(plan.num_shards)]
    # A shard streams while it holds one of `writers`: the store planned its memory for that
    # many. Once every byte of it is sent, what is left of its commit (an S3 complete, a GCS
    # compose) is the server's work, and the next shard starts streaming meanwhile.
    writers = anyio.CapacityLimiter(min(max_concurrent_shards, store.plan_writers(sizes)))
    threads = anyio.CapacityLimiter(2 * writers.total_tokens)
    committed = False
    try:
        t0 = time.perf_counter()

        async def run_shard(shard_id: int) -> None:
            path = shard_paths[shard_id]

            def stream(writer: ShardWriter) -> ShardResult:
                return _stream_shard(
                    writer,
                    plan.shards[shard_id],
                    prepared,
                    chunk_bytes,
                    store.reports_crc32c,
                )

            # The writer's thread takes the slot itself (stream_into), so no slot is ever held
            # while waiting for a thread: threads waiting to take a slot back (an upload started
            # over after a failed complete) cannot starve the shards that hold one.
            slot = _WriterSlot(writers)
            write = functools.partial(store.write_object, chunk_bytes=chunk_bytes, slot=slot)
            try:
                result = await anyio.to_thread.run_sync(write, path, stream, limiter=threads)
            finally:
                slot.release()
            await store.verify_upload(path, size=result.size, crc32c=result.shard_crc)
            crcs.update(result.tensor_crcs)

        with unwrap_task_group():
            async with anyio.create_task_group() as tg:
                for shard_id in range(plan.num_shards):
                    tg.start_soon(run_shard, shard_id)
        phases["write_shards"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        header = BundleHeader(num_shards=plan.num_shards)
        entries = []
        for key, placement in sorted(plan.placements.items()):
            tensor = prepared[key]
            entries.append(
                (
                    key,
                    BundleEntry(
                        dtype=tensor.dtype,
                        shape=tensor.shape,
                        shard_id=placement.shard_id,
                        offset=placement.offset,
                        size=placement.size,
                        crc32c=crcs[key],
                    ),
                )
            )
        index_bytes = await anyio.to_thread.run_sync(encode_index, header, entries)
        if staged:
            # the old index goes, then the staged shards take their final names
            await store.delete([index_path])
            for staged_path, final_path in zip(shard_paths, final_paths, strict=True):
                await store.rename(staged_path, final_path)
            shard_paths = final_paths
        if directory:
            await store.sync_dir(directory)  # shard names durable before the index appears
        await store.write_atomic(index_path, index_bytes, exclusive=not overwrite)
        committed = True
        INDEX_CACHE.invalidate_uri(index_uri)  # a cached index of an overwritten checkpoint
        phases["commit_index"] = time.perf_counter() - t0
    finally:
        with anyio.CancelScope(shield=True):
            if not committed:
                await store.delete(shard_paths)
            await store.drain()
    if replacing:
        await _remove_other_shard_counts(store, prefix_path, plan.num_shards)
    return SaveInfo(
        prefix=store.uri(prefix_path),
        num_shards=plan.num_shards,
        num_tensors=len(prepared),
        bytes_written=sum(t.size for t in prepared.values()),
        index_bytes=len(index_bytes),
        files=(*(store.uri(p) for p in shard_paths), index_uri),
        seconds=time.perf_counter() - started,
        seconds_by_phase=phases,
        stats=store.stats.snapshot(),
    )


async def _remove_other_shard_counts(store: Store, prefix_path: str, num_shards: int) -> None:
    """After replacing a checkpoint with another shard count, its old data files are garbage."""
    directory = store.dirname(prefix_path)
    base = prefix_path.rsplit("/", 1)[-1] + ".data-"
    keep = f"-of-{num_shards:05d}"
    stale = [
        p
        for p in await store.list_dir(directory or ".")
        if (name := p.replace("\\", "/").rsplit("/", 1)[-1]).startswith(base)
        and not name.endswith(keep)
        and ".tmp-" not in name
    ]
    if stale:
        await store.delete(stale)


async def save_tensors(
    store: Store,
    prefix_path: str,
    tensors: Tensors,
    *,
    num_shards: int | None,
    overwrite: bool,
    copy: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: ProgressCallback | None = None,
) -> SaveInfo:
    """``num_shards=None``: as many as suit the store (``auto_num_shards``)."""
    prepared = await prepare_all(tensors, copy=copy)
    sizes = {k: t.size for k, t in prepared.items()}
    if num_shards is None:
        num_shards = auto_num_shards(sizes.values(), shard_bytes=store.shard_bytes)
    plan = plan_save(sizes=sizes, num_shards=num_shards)
    return await write_bundle(
        store,
        prefix_path,
        prepared,
        plan,
        overwrite=overwrite,
        chunk_bytes=chunk_bytes,
        progress=progress,
    )
