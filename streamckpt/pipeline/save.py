"""Save: prepare -> plan -> claim -> stream every shard concurrently -> check -> commit.

The claim and the commit are :mod:`streamckpt.pipeline.commit`'s, shared with the
multi-process save.

Invariants:
- one writer per prefix: a save claims its prefix before it writes anything
  (``storage.claim``); a second save of it fails fast with SaveInProgressError and never
  touches the first one's files; leftovers of crashed saves are reclaimed under the claim;
- the index is written only after every shard write has been committed (fsync'd / uploaded)
  and every shard was found again with the size written (one metadata request each, right
  before the commit), in one atomic step, create-only unless ``overwrite``; a reader that
  finds an index finds complete data;
- a save that fails or is cancelled before its commit point removes every data file it
  created (cleanup is shielded from cancellation) and never touches another prefix's files;
  a failure after it (the index is visible) removes nothing, and its error says the
  checkpoint is committed and whole; a save that lost its claim removes nothing;
- a tensor's bytes are never copied by the pipeline: each shard task streams views of the
  caller's arrays to its writer (``pipeline.shard_stream``), and a deferred tensor
  (``tensors.Deferred``) is fetched right before it is written and dropped right after;
- the index is encoded once every shard has streamed, while the shards are made durable.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import anyio
import anyio.from_thread
import anyio.to_thread
import numpy as np

from streamckpt.device import start_transfers
from streamckpt.errors import StreamCkptError, unwrap_task_group
from streamckpt.format.bundle import BundleHeader
from streamckpt.format.crc import crc32c, mask
from streamckpt.format.entries import entry_head, spell_entries
from streamckpt.format.index_file import encode_index_records
from streamckpt.pipeline.commit import Outcome, abandon, begin, claimed, commit, tidy
from streamckpt.pipeline.plan import (
    SavePlan,
    auto_num_shards,
    plan_in_order,
    plan_save,
)
from streamckpt.pipeline.shard_stream import FetchBudget, ShardResult, stream_shard
from streamckpt.pipeline.tensors import PreparedTensor, prepare_values
from streamckpt.storage import Store
from streamckpt.storage.base import ShardWriter, wait_from_thread

DEFAULT_CHUNK_BYTES = 8 << 20
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
    # every device array's copy is under way before the first is waited for
    started: dict[str | bytes, Any] = start_transfers(cast(Mapping[str | bytes, Any], tensors))
    return await anyio.to_thread.run_sync(functools.partial(prepare_values, started, copy=copy))


def _plan(sizes: Mapping[bytes, int], num_shards: int | None, shard_bytes: int | None) -> SavePlan:
    """``plan_save``, the shard count the store's when not given; one shard: name order."""
    if num_shards is None:
        num_shards = auto_num_shards(sizes.values(), shard_bytes=shard_bytes)
    if num_shards == 1:  # what plan_save gives, without its balancing of 20,000 sizes
        return plan_in_order(shards=[sorted(sizes)], sizes=sizes)
    return plan_save(sizes=sizes, num_shards=num_shards)


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
            wait_from_thread(self.acquire)

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
    """Execute a save plan and commit the index. The executor behind :func:`save`.

    The whole save runs under the prefix's claim (``storage.claim``), renewed beside it:
    no other save writes these names meanwhile, and a second one fails fast.
    """
    started = time.perf_counter()
    if progress is not None:
        store.stats.on_bytes = progress  # byte counts as they reach the store
    phases: dict[str, float] = {}
    async with claimed(store, prefix_path, overwrite=overwrite) as claim:
        session = await begin(store, prefix_path, overwrite=overwrite)
        paths = [session.write_path(i, plan.num_shards) for i in range(plan.num_shards)]
        outcome = Outcome()
        try:
            t0 = time.perf_counter()
            results, index_bytes = await _write_and_encode(
                store, paths, prepared, plan, chunk_bytes, max_concurrent_shards
            )
            phases["write_shards"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            # Every shard still there, whole, right before the commit (a store that restarted
            # and lost them must fail the save, not acknowledge an index without data): one
            # metadata request per shard, all at once.
            await verify_shards(store, paths, results)
            await commit(store, session, claim, index_bytes, outcome, paths, overwrite=overwrite)
            phases["commit_index"] = time.perf_counter() - t0
        finally:
            if not outcome.committed:
                await abandon(store, session, claim, paths)
            else:
                with anyio.CancelScope(shield=True):
                    await store.drain()
        await tidy(store, session, num_shards=plan.num_shards)
        stats = store.stats.snapshot()
    return SaveInfo(
        prefix=store.uri(prefix_path),
        num_shards=plan.num_shards,
        num_tensors=len(prepared),
        bytes_written=sum(t.size for t in prepared.values()),
        index_bytes=len(index_bytes),
        files=(*(store.uri(p) for p in paths), store.uri(session.index_path)),
        seconds=time.perf_counter() - started,
        seconds_by_phase=phases,
        stats=stats,
    )


async def _write_and_encode(
    store: Store,
    paths: Sequence[str],
    prepared: Mapping[bytes, PreparedTensor],
    plan: SavePlan,
    chunk_bytes: int,
    max_concurrent_shards: int,
) -> tuple[list[ShardResult], bytes]:
    """Write the shards; the index, encoded once every shard's bytes are handed over.

    The encoding then runs while the shards are made durable (fsync, an upload's
    completion: no GIL held). Beside the streaming it would hold the GIL each time a write
    returns and wants it back. Workload B (20,000 tensors, 297 MiB) on the benchmark VM's
    disk, alternating: 0.56 s this way against 0.60-0.70 s encoding beside the writes
    (safetensors 0.69 s). Where a commit costs nothing (tmpfs) the encoding is left alone
    after the writes: 0.44 s against 0.36 s there.

    Payloads all in memory are checksummed in a thread of their own from the start
    (``payload_crcs``), not on the way: crc32c gives the GIL back for all but the smallest
    payloads, and the writes hold it only between batches, so both go at once. On a disk
    whose fsync returns at once (B on the faster VM: the crcs took 0.04-0.06 s of 0.3) that
    takes them off the end of the save.
    """
    in_memory = all(t.transfer is None and t.deferred is None for t in prepared.values())
    keys = sorted(plan.placements)
    crcs: dict[bytes, int] = {}
    column: np.ndarray[Any, Any] | None = None
    streamed = anyio.Event()
    checksummed = anyio.Event()
    unstreamed = set(range(plan.num_shards))
    index_bytes = b""

    def shard_streamed(shard_id: int, result: ShardResult) -> None:
        crcs.update(result.tensor_crcs)
        unstreamed.discard(shard_id)
        if not unstreamed:
            streamed.set()

    async def checksum() -> None:
        nonlocal column
        column = await anyio.to_thread.run_sync(payload_crcs, [prepared[k] for k in keys])
        checksummed.set()

    async def encode() -> None:
        nonlocal index_bytes
        await streamed.wait()
        await checksummed.wait()
        index_bytes = await anyio.to_thread.run_sync(
            _encode_index, prepared, plan, keys, crcs if column is None else column
        )

    with unwrap_task_group():
        async with anyio.create_task_group() as tg:
            if in_memory:
                tg.start_soon(checksum)
            else:
                checksummed.set()
            tg.start_soon(encode)
            results = await write_shards(
                store,
                paths,
                prepared,
                plan,
                chunk_bytes=chunk_bytes,
                max_concurrent_shards=max_concurrent_shards,
                tensor_crcs=not in_memory,
                on_streamed=shard_streamed,
            )
            if not streamed.is_set():  # a store that wrote a shard without streaming it
                for result in results:
                    crcs.update(result.tensor_crcs)
                streamed.set()
    return results, index_bytes


async def write_shards(
    store: Store,
    shard_paths: Sequence[str],
    prepared: Mapping[bytes, PreparedTensor],
    plan: SavePlan,
    *,
    chunk_bytes: int,
    max_concurrent_shards: int,
    tensor_crcs: bool = True,
    on_streamed: Callable[[int, ShardResult], None] | None = None,
) -> list[ShardResult]:
    """Stream every shard of the plan, concurrently; what each one produced, in shard order.

    ``tensor_crcs=False``: the payloads are not checksummed on the way (the caller does it).

    ``on_streamed(shard_id, result)`` runs in the event loop each time a shard's bytes are
    all handed to its writer, before the commit that makes them durable.
    """
    sizes = [plan.shard_bytes(shard_id) for shard_id in range(plan.num_shards)]
    # A shard streams while it holds one of `writers`: the store planned its memory for that
    # many. Once every byte of it is sent, what is left of its commit (an S3 complete, a GCS
    # compose) is the server's work, and the next shard starts streaming meanwhile.
    writers = anyio.CapacityLimiter(min(max_concurrent_shards, store.plan_writers(sizes)))
    threads = anyio.CapacityLimiter(2 * writers.total_tokens)
    results: list[ShardResult | None] = [None] * plan.num_shards
    # the store's in-flight budget, as the bytes its writers may buffer are
    deferred = any(tensor.deferred is not None for tensor in prepared.values())
    fetch_budget = FetchBudget(store.budget.total) if deferred else None

    async def run_shard(shard_id: int) -> None:
        path = shard_paths[shard_id]

        def stream(writer: ShardWriter) -> ShardResult:
            result = stream_shard(
                writer,
                plan.shards[shard_id],
                prepared,
                chunk_bytes,
                store.reports_crc32c,
                fetch_budget,
                tensor_crcs,
            )
            if on_streamed is not None:
                anyio.from_thread.run_sync(on_streamed, shard_id, result)
            return result

        # The writer's thread takes the slot itself (stream_into), so no slot is ever held
        # while waiting for a thread: threads waiting to take a slot back (an upload started
        # over after a failed complete) cannot starve the shards that hold one.
        slot = _WriterSlot(writers)
        write = functools.partial(store.write_object, chunk_bytes=chunk_bytes, slot=slot)
        try:
            results[shard_id] = await anyio.to_thread.run_sync(write, path, stream, limiter=threads)
        except StreamCkptError as exc:
            raise exc.with_context(shard=shard_id) from None
        finally:
            slot.release()

    with unwrap_task_group():
        async with anyio.create_task_group() as tg:
            for shard_id in range(plan.num_shards):
                tg.start_soon(run_shard, shard_id)
    return [result for result in results if result is not None]


async def verify_shards(
    store: Store, shard_paths: Sequence[str], results: Sequence[ShardResult]
) -> None:
    async def verify(shard_id: int) -> None:
        result = results[shard_id]
        try:
            await store.verify_upload(
                shard_paths[shard_id], size=result.size, crc32c=result.shard_crc
            )
        except StreamCkptError as exc:
            raise exc.with_context(shard=shard_id) from None

    with unwrap_task_group():
        async with anyio.create_task_group() as tg:
            for shard_id in range(len(shard_paths)):
                tg.start_soon(verify, shard_id)


def _encode_index(
    prepared: Mapping[bytes, PreparedTensor],
    plan: SavePlan,
    keys: Sequence[bytes],
    crcs: Mapping[bytes, int] | np.ndarray[Any, Any],
) -> bytes:
    """The index, its entries spelled all at once (20,000 small tensors: milliseconds).

    ``keys``: every tensor's, sorted; ``crcs``: each one's masked crc32c, by key as the
    shards streamed them, or as a column in ``keys``' order (``payload_crcs``).
    """
    placements = plan.placements
    tensors = [prepared[key] for key in keys]
    heads: dict[tuple[int, tuple[int, ...]], int] = {}
    head_of = [heads.setdefault((int(t.dtype), t.shape), len(heads)) for t in tensors]
    where = [placements[key] for key in keys]
    values = spell_entries(
        [entry_head(dtype, shape) for dtype, shape in heads],
        np.array(head_of, dtype=np.int64),
        np.fromiter((p.shard_id for p in where), np.int64, len(where)),
        np.fromiter((p.offset for p in where), np.int64, len(where)),
        np.fromiter((p.size for p in where), np.int64, len(where)),
        crcs
        if isinstance(crcs, np.ndarray)
        else np.fromiter((crcs[key] for key in keys), np.int64, len(keys)),
    )
    return encode_index_records(BundleHeader(num_shards=plan.num_shards), keys, values)


def payload_crcs(tensors: Sequence[PreparedTensor]) -> np.ndarray[Any, Any]:
    """Each payload's masked crc32c, as one int64 column (an encoded one's as it was made).

    Only for payloads already in memory (no device transfer, nothing deferred).
    """
    return np.fromiter(
        (mask(crc32c(t.payload)) if t.crc32c is None else t.crc32c for t in tensors),
        np.int64,
        len(tensors),
    )


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
    # every device array's copy is under way before the first is waited for
    started: dict[str | bytes, Any] = start_transfers(cast(Mapping[str | bytes, Any], tensors))

    def work() -> tuple[dict[bytes, PreparedTensor], SavePlan]:  # one thread hop for both
        prepared = prepare_values(started, copy=copy)
        sizes = {k: t.size for k, t in prepared.items()}
        return prepared, _plan(sizes, num_shards, store.shard_bytes)

    prepared, plan = await anyio.to_thread.run_sync(work)
    return await write_bundle(
        store,
        prefix_path,
        prepared,
        plan,
        overwrite=overwrite,
        chunk_bytes=chunk_bytes,
        progress=progress,
    )
