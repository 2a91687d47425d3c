"""The async public API: save, load, read_tensor, open. Thin: resolve a store, run a pipeline."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from streamckpt.errors import CheckpointNotFoundError, CorruptCheckpointError
from streamckpt.pipeline.info import TensorInfo
from streamckpt.pipeline.read import CheckpointReader, open_reader
from streamckpt.sharding import Slice
from streamckpt.storage import PathLike, resolve

if TYPE_CHECKING:
    from streamckpt.distributed import Coordinator
    from streamckpt.pipeline.save import ProgressCallback, SaveInfo, Tensors

# The save pipeline loads on the first save, so that a process that only reads never pays
# for it; this is its DEFAULT_CHUNK_BYTES, held equal to it by test_cold_start.
DEFAULT_CHUNK_BYTES = 8 << 20


def _given_in_pieces(value: object) -> bool:
    """A :class:`Slice` or a non-empty list of them.

    A sharded framework leaf saved without a coordinator is saved whole, as before.
    """
    return isinstance(value, Slice) or (
        isinstance(value, list) and bool(value) and all(isinstance(v, Slice) for v in value)
    )


async def save(
    prefix: PathLike,
    tensors: Tensors,
    *,
    num_shards: int | None = None,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    filesystem: Any = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    max_inflight_bytes: int | None = None,
    progress: ProgressCallback | None = None,
    coordinator: Coordinator | None = None,
) -> SaveInfo:
    """Save ``{name: array}`` as ``PREFIX.index`` + ``PREFIX.data-*-of-N``.

    Shards are written concurrently and the index is committed last, create-only unless
    ``overwrite``; a failed or cancelled save removes what it wrote. Without ``num_shards``
    the store chooses: on S3 and GCS about 64 MiB per shard (at most 16, never more than the
    largest tensor fills), since the server joins each uploaded object after its last byte
    and several shards are joined side by side; one shard on local disk and elsewhere.

    Values may be numpy arrays and scalars, Python numbers, ``bytes``/``str`` (DT_STRING),
    object arrays of bytes, anything with ``__array__`` or DLPack,
    :class:`streamckpt.Typed` for an explicit dtype, or :class:`streamckpt.Deferred` for bytes
    fetched only as they are written (at most ``max_inflight_bytes`` of them held at once).

    With a ``coordinator`` (:mod:`streamckpt.distributed`) every process of the job calls
    ``save`` with its own values and one checkpoint comes out: a value may then also be a
    :class:`streamckpt.Slice` (or a list of them), a torch ``DTensor`` or a multi-device
    ``jax.Array``; pieces become TensorFlow slices, values given by several processes are
    written once. ``num_shards`` is then per process. Every process gets the same
    :class:`SaveInfo`, after the commit. A single process may save pieces too (all of them,
    without a coordinator): they are stored as TensorFlow slices.
    """
    store, path = resolve(
        prefix,
        storage_options=storage_options,
        filesystem=filesystem,
        max_inflight_bytes=max_inflight_bytes,
    )
    from streamckpt.pipeline.save import save_tensors

    pieces = (v for v in tensors.values() if isinstance(v, Slice | list))  # arrays: skipped
    if coordinator is None and any(_given_in_pieces(value) for value in pieces):
        from streamckpt.distributed.solo import SOLO

        coordinator = SOLO  # one process holding pieces: the same planner and merge
    if coordinator is not None:
        # imported here: a process that never saves together does not pay for the planner
        from streamckpt.distributed.save import save_distributed

        return await save_distributed(
            store,
            path,
            tensors,
            coordinator,
            num_shards=num_shards,
            overwrite=overwrite,
            chunk_bytes=chunk_bytes,
            progress=progress,
        )
    return await save_tensors(
        store,
        path,
        tensors,
        num_shards=num_shards,
        overwrite=overwrite,
        chunk_bytes=chunk_bytes,
        progress=progress,
    )


# Errors a stale cached index would cause; the read is retried once on a fresh index.
_STALE = (CheckpointNotFoundError, CorruptCheckpointError)
_T = TypeVar("_T")


async def _read_with_fresh_retry(
    opener: Callable[..., contextlib.AbstractAsyncContextManager[CheckpointReader]],
    work: Callable[[CheckpointReader], Awaitable[_T]],
    *,
    stats: dict[str, float] | None,
) -> _T:
    """Run ``work`` on a checkpoint that ``opener(use_cache=...)`` opens.

    If the index came from the cache and the read fails as a stale index would (a shard
    missing, a checksum wrong: the checkpoint was rewritten elsewhere), ``work`` runs once
    more on an index read afresh.
    """
    for use_cache in (True, False):
        async with opener(use_cache=use_cache) as reader:
            try:
                return await work(reader)
            except _STALE:
                if not reader.from_cache:
                    raise
            finally:
                if stats is not None:
                    stats.update(reader.stats)
    raise AssertionError("unreachable: the second pass does not use the cache")


@contextlib.asynccontextmanager
async def open(
    prefix: PathLike,
    *,
    load_index: bool = True,
    storage_options: dict[str, Any] | None = None,
    filesystem: Any = None,
    max_inflight_bytes: int | None = None,
    progress: ProgressCallback | None = None,
    use_cache: bool = True,
) -> AsyncIterator[CheckpointReader]:
    """Open a checkpoint without reading tensor data: ``ckpt.entries``, ``await ckpt.read``.

    With ``load_index=False`` only the index's tail is read; entries are then looked up one
    data block at a time (``await ckpt.info(name)``), which suits huge indexes.
    """
    store, path = resolve(
        prefix,
        storage_options=storage_options,
        filesystem=filesystem,
        max_inflight_bytes=max_inflight_bytes,
    )
    store.stats.on_bytes = progress
    reader = await open_reader(store, path, load_index=load_index, use_cache=use_cache)
    async with reader:
        yield reader


async def load(
    prefix: PathLike,
    *,
    names: Iterable[str | bytes] | None = None,
    storage_options: dict[str, Any] | None = None,
    filesystem: Any = None,
    max_inflight_bytes: int | None = None,
    progress: ProgressCallback | None = None,
    stats: dict[str, float] | None = None,
) -> dict[str, np.ndarray[Any, Any]]:
    """Every tensor (or those in ``names``), each verified by its crc32c.

    Partitioned tensors come back assembled; DT_STRING tensors are object arrays of bytes.
    ``progress`` gets byte counts as they arrive; a ``stats`` dict is filled with requests,
    bytes, retries, throttles and seconds per phase.
    """
    wanted = None if names is None else list(names)

    async def read(reader: CheckpointReader) -> dict[str, np.ndarray[Any, Any]]:
        return await reader.read_many(wanted)

    opener = functools.partial(
        open,
        prefix,
        load_index=wanted is None,
        storage_options=storage_options,
        filesystem=filesystem,
        max_inflight_bytes=max_inflight_bytes,
        progress=progress,
    )
    return await _read_with_fresh_retry(opener, read, stats=stats)


async def read_tensor(
    prefix: PathLike,
    name: str | bytes,
    *,
    index: Any = None,
    storage_options: dict[str, Any] | None = None,
    filesystem: Any = None,
    stats: dict[str, float] | None = None,
) -> np.ndarray[Any, Any]:
    """One tensor, fetching only the index pieces and byte ranges it needs."""

    async def read(reader: CheckpointReader) -> np.ndarray[Any, Any]:
        return await reader.read(name, index=index)

    opener = functools.partial(
        open, prefix, load_index=False, storage_options=storage_options, filesystem=filesystem
    )
    return await _read_with_fresh_retry(opener, read, stats=stats)


async def list_tensors(
    prefix: PathLike,
    *,
    storage_options: dict[str, Any] | None = None,
    filesystem: Any = None,
) -> dict[str, TensorInfo]:
    """What the index says of every tensor (dtype, shape, shard, bytes), reading no data.

    A partitioned tensor is listed once, whole; its pieces are not. Equal to
    ``ckpt.entries`` of an opened checkpoint, for callers who want only the listing.
    """
    async with open(prefix, storage_options=storage_options, filesystem=filesystem) as reader:
        return reader.entries
