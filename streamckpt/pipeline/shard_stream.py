"""One shard's bytes, from a worker thread to its writer: batched views, checksums on the way.

Rule: a tensor's bytes are never copied here. Views of the caller's arrays go to the writer
in batches of at most one chunk (``ShardWriter.write_many``), which copies them once, where
it writes them from; each payload's crc32c is taken as it is batched. A deferred tensor is
fetched right before it is written and let go right after, the fetched and unwritten ones
within the store's in-flight budget together (``FetchBudget``; one larger tensor alone).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import anyio
import anyio.from_thread

from streamckpt.format.crc import crc32c, mask
from streamckpt.pipeline.plan import Placement
from streamckpt.pipeline.tensors import PreparedTensor
from streamckpt.storage.base import ByteBudget, ShardWriter, wait_from_thread

# Views handed to a writer at once (one writev takes at most 1024 on Linux).
BATCH_VIEWS = 1024


@dataclass(frozen=True, slots=True)
class ShardResult:
    """What streaming one shard produced.

    Each tensor's masked crc32c, and the shard's own (unmasked) crc32c when the store can
    check it.
    """

    tensor_crcs: dict[bytes, int]
    size: int
    shard_crc: int | None


class FetchBudget:
    """Bytes of deferred tensors fetched and not yet written, across a save's shard threads.

    Without it every shard thread would hold its current deferred tensor at once: as many
    tensors as shards stream side by side, whatever the caller's memory budget.
    """

    def __init__(self, total: int) -> None:
        self._budget = ByteBudget(total)

    @contextlib.contextmanager
    def holding(self, nbytes: int) -> Iterator[None]:
        """From a writer thread: wait until ``nbytes`` may be held, hold them for the block."""
        taken = 0

        async def acquire() -> None:
            nonlocal taken
            taken = await self._budget.acquire(nbytes)

        wait_from_thread(acquire)
        try:
            yield
        finally:
            anyio.from_thread.run(self._budget.release, taken)


def stream_shard(
    writer: ShardWriter,
    placements: Sequence[Placement],
    prepared: Mapping[bytes, PreparedTensor],
    chunk_bytes: int,
    whole_crc: bool,
    fetch_budget: FetchBudget | None = None,
    tensor_crcs: bool = True,
) -> ShardResult:
    """Runs in a worker thread: write one shard's tensors in order, checksumming each.

    The payloads' views go to the writer in batches of at most ``chunk_bytes`` (and
    ``BATCH_VIEWS`` views): one system call or upload part for thousands of small tensors,
    copied once, by the store, where it writes them from (``ShardWriter.write_many``). A
    payload larger than a chunk goes alone, slice by slice. Each payload's crc32c is taken
    as it is batched, while its bytes are still in cache for the write. Every batch sent is
    a cancellation point. A deferred tensor's batch is sent before its fetched array is let
    go: the next one is fetched only after. ``tensor_crcs=False``: payloads all in memory,
    which the caller checksums itself (``payload_crcs``); the result has no tensor crcs.
    """
    crcs: dict[bytes, int] = {}
    batch: list[memoryview] = []
    held = 0
    shard_crc = 0
    size = 0
    check_cancelled = anyio.from_thread.check_cancelled

    def send() -> None:
        nonlocal shard_crc, held
        check_cancelled()
        if whole_crc:
            for view in batch:
                shard_crc = crc32c(view, shard_crc)
        writer.write_many(batch)
        batch.clear()
        held = 0

    def write_tensor(tensor: PreparedTensor, view: memoryview) -> int:
        """Batch one payload; its masked crc32c."""
        nonlocal held, size
        nbytes = len(view)
        size += nbytes
        if nbytes <= chunk_bytes:
            if held + nbytes > chunk_bytes or len(batch) == BATCH_VIEWS:
                send()  # a batch stays within one chunk
            batch.append(view)
            held += nbytes
            if tensor.crc32c is not None:
                return tensor.crc32c
            return mask(crc32c(view)) if tensor_crcs else 0
        if batch:
            send()
        crc = 0
        for start in range(0, nbytes, chunk_bytes):
            piece = view[start : start + chunk_bytes]
            if tensor.crc32c is None and tensor_crcs:
                crc = crc32c(piece, crc)
            batch.append(piece)
            send()
        return mask(crc) if tensor.crc32c is None else tensor.crc32c

    for placement in placements:
        tensor = prepared[placement.key]
        if tensor.deferred is None or fetch_budget is None:
            # a device array's view: once its transfer is done
            crcs[placement.key] = write_tensor(tensor, tensor.data())
        else:
            with fetch_budget.holding(tensor.size):
                crcs[placement.key] = write_tensor(tensor, tensor.data())
                if batch:
                    send()
    if batch:
        send()
    return ShardResult(crcs if tensor_crcs else {}, size, shard_crc if whole_crc else None)
