"""A save's claim and commit: what happens around the shard writes, for one or many processes.

The single-process save (:mod:`streamckpt.pipeline.save`) and the multi-process one
(:mod:`streamckpt.distributed.save`) share it; in the latter only the primary calls it, and
the other processes learn the :class:`Session` from the primary.

1. :func:`claimed` — the prefix's claim (``storage.claim``), renewed beside the save;
2. :func:`begin` — under the claim: refuse a committed checkpoint unless ``overwrite``,
   reclaim leftovers of crashed saves, and decide how shards are named (staged under a
   temporary suffix where the store can rename, so that a failed overwrite leaves the old
   checkpoint whole; elsewhere the old index goes first, so that a failed save leaves no
   checkpoint, never a mix);
3. :func:`commit` — every shard written: staged names become final, the directory is synced,
   the claim confirmed, the index written create-only (unless ``overwrite``); an index that
   is there with our bytes after a failure means committed;
4. :func:`abandon` — a save that did not commit removes what it wrote (shielded), unless it
   lost its claim (then the names are the new holder's);
5. :func:`tidy` — after an overwrite, data files of other shard counts go; after retried
   requests, what no writer knows of is swept.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import secrets
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import anyio

from streamckpt.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    StorageError,
    StreamCkptError,
    unwrap_task_group,
)
from streamckpt.format.bundle import data_filename, index_filename
from streamckpt.pipeline.index import INDEX_CACHE
from streamckpt.storage import Store, StoreStats
from streamckpt.storage.claim import Claim, claim_filename

__all__ = [
    "Outcome",
    "Session",
    "abandon",
    "begin",
    "claimed",
    "commit",
    "committed_but",
    "refuse_existing",
    "tidy",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Session:
    """How this save names its shards; small and picklable, sent to every process."""

    prefix_path: str
    replacing: bool
    #: staged shards carry this suffix until the commit renames them; None: final names
    suffix: str | None

    def final_path(self, shard_id: int, num_shards: int) -> str:
        return data_filename(self.prefix_path, shard_id, num_shards)

    def write_path(self, shard_id: int, num_shards: int) -> str:
        path = self.final_path(shard_id, num_shards)
        return path if self.suffix is None else path + self.suffix

    @property
    def index_path(self) -> str:
        return index_filename(self.prefix_path)


@dataclass(slots=True)
class Outcome:
    """Whether the index is in place: set by :func:`commit`, also when it raises after it."""

    committed: bool = False


async def refuse_existing(store: Store, prefix_path: str) -> None:
    index_path = index_filename(prefix_path)
    if await store.exists(index_path):
        raise CheckpointExistsError(
            "a checkpoint already exists at this prefix (pass overwrite=True)",
            uri=store.uri(index_path),
        )


@contextlib.asynccontextmanager
async def claimed(store: Store, prefix_path: str, *, overwrite: bool) -> AsyncIterator[Claim]:
    """The prefix claimed for the block, the claim renewed beside it, released after."""
    if not overwrite:
        await refuse_existing(store, prefix_path)  # before touching anything; again in begin
    directory = store.dirname(prefix_path)
    if directory:
        await store.make_dirs(directory)
    claim = await store.claim(claim_filename(prefix_path))
    try:
        with unwrap_task_group():
            async with anyio.create_task_group() as guard:
                guard.start_soon(claim.keep_alive)
                yield claim
                guard.cancel_scope.cancel()
    finally:
        await claim.release()  # shielded; never raises


def _name(prefix_path: str) -> str:
    return prefix_path.replace("\\", "/").rsplit("/", 1)[-1]


async def begin(store: Store, prefix_path: str, *, overwrite: bool) -> Session:
    """Under the claim: what is there, what goes, how this save names its shards."""
    index_path = index_filename(prefix_path)
    # checked under the claim: a save that committed just before we claimed is seen here
    replacing = await store.exists(index_path)
    if replacing and not overwrite:
        await refuse_existing(store, prefix_path)
    await store.reclaim(store.dirname(prefix_path), _name(prefix_path), committed=replacing)
    staged = replacing and store.supports_rename
    if replacing and not staged:
        await store.delete([index_path])
    suffix = f".tmp-{secrets.token_hex(6)}" if staged else None
    return Session(prefix_path, replacing, suffix)


async def commit(
    store: Store,
    session: Session,
    claim: Claim,
    index_bytes: bytes,
    outcome: Outcome,
    paths: list[str],
    *,
    overwrite: bool,
) -> None:
    """Every shard is written and verified: give them their names and write the index.

    ``paths`` are the shards' names as written, in shard order; renamed ones are replaced by
    their final names as they go, so that it always lists what :func:`abandon` must remove.
    ``outcome.committed`` says whether the index is in place, also when this raises (an
    error then says the checkpoint is committed, see :func:`committed_but`; a cancellation
    is re-raised as it is). Uncommitted, the caller calls :func:`abandon`.
    """
    index_path = session.index_path
    index_uri = store.uri(index_path)
    directory = store.dirname(session.prefix_path)
    if session.suffix is not None:
        # the old index goes, then the staged shards take their final names
        await store.delete([index_path])
        num_shards = len(paths)
        for shard_id in range(num_shards):
            final_path = session.final_path(shard_id, num_shards)
            await store.rename(paths[shard_id], final_path)
            paths[shard_id] = final_path
    if directory:
        await store.sync_dir(directory)  # shard names durable before the index appears
    await claim.confirm()
    try:
        await store.write_atomic(index_path, index_bytes, exclusive=not overwrite)
    except BaseException as exc:
        # A failure may come after the commit point (the index linked, then the directory's
        # fsync failed), or the store may have lost its answer. An index that is there and
        # ours points at our shards: they stay, and the error says so.
        with anyio.CancelScope(shield=True):
            outcome.committed = await _index_is_ours(store, index_path, index_bytes)
        if outcome.committed and isinstance(exc, Exception):
            raise committed_but(exc, index_uri) from exc
        raise
    outcome.committed = True
    INDEX_CACHE.invalidate_uri(index_uri)  # a cached index of an overwritten checkpoint


async def abandon(store: Store, session: Session, claim: Claim, paths: Sequence[str]) -> None:
    """A save that did not commit: remove what it wrote. Shielded; never raises."""
    with anyio.CancelScope(shield=True):
        # A save that lost its claim deletes nothing: those names are the new holder's.
        if not claim.lost:
            await delete_quietly(store, paths)
            await store.drain()
            # what the writers' own clean-up could not reach (an upload whose abort failed)
            await _reclaim_quietly(store, session)
        await store.drain()


async def tidy(store: Store, session: Session, *, num_shards: int) -> None:
    """After the commit: the garbage an overwrite or a retried request may have left."""
    if session.replacing:
        try:
            await _remove_other_shard_counts(store, session.prefix_path, num_shards)
        except StreamCkptError as exc:
            raise committed_but(exc, store.uri(session.index_path)) from exc
    stats = store.stats.snapshot()
    if stats["retries"] or stats["failures"]:
        # A request that failed or was sent again may have left what no writer knows of (an
        # S3 upload whose creation's answer was lost): swept while the claim is still held,
        # by a copy of the store whose requests do not count as the save's.
        unaccounted = copy.copy(store)
        unaccounted.stats = StoreStats()
        await _reclaim_quietly(unaccounted, session)


async def _index_is_ours(store: Store, index_path: str, index_bytes: bytes) -> bool:
    """After a failed index write: whether the index is there with our bytes (committed).

    When the store cannot say, the answer is yes: shards kept that no index points to are
    reclaimed by the next save of the prefix, shards deleted under a visible index are lost.
    """
    try:
        if not await store.exists(index_path):
            return False
        return await store.read_all(index_path) == index_bytes
    except CheckpointNotFoundError:
        return False
    except StreamCkptError:
        return True


def committed_but(exc: Exception, index_uri: str) -> StorageError:
    """The error of a save that failed after its commit point: the checkpoint stays whole."""
    message = exc.message if isinstance(exc, StreamCkptError) else repr(exc)
    error = StorageError(
        f"the checkpoint is committed and whole (its index and every shard are in place), "
        f"but the save failed after its commit point: {message}",
        uri=index_uri,
    )
    error.errno = exc.errno if isinstance(exc, OSError) else None
    return error


async def _reclaim_quietly(store: Store, session: Session) -> None:
    """A failed save's second sweep: what its writers' own clean-up could not reach.

    Data files stay wherever an index is there (an old checkpoint this save did not get to
    replace): only staged and temporary names go then.
    """
    try:
        indexed = await store.exists(session.index_path)
        await store.reclaim(
            store.dirname(session.prefix_path), _name(session.prefix_path), committed=indexed
        )
    except StreamCkptError as exc:
        logger.warning(
            "a failed save could not reclaim its leftovers (the next save will): %s", exc
        )


async def delete_quietly(store: Store, paths: Sequence[str]) -> None:
    """A failed save's clean-up: its own error is the one to report, not the clean-up's."""
    try:
        await store.delete(paths)
    except StreamCkptError as exc:
        logger.warning("a failed save could not remove its files (the next save will): %s", exc)


async def _remove_other_shard_counts(store: Store, prefix_path: str, num_shards: int) -> None:
    """After replacing a checkpoint, data files of other shard counts are garbage.

    So are any staged shards or temporary parts left by crashed saves: under the claim, every
    data file of the prefix that the new index does not name is one.
    """
    directory = store.dirname(prefix_path)
    base = _name(prefix_path) + ".data-"
    keep = f"-of-{num_shards:05d}"
    stale = [
        p
        for p in await store.list_dir(directory or ".")
        if (name := p.replace("\\", "/").rsplit("/", 1)[-1]).startswith(base)
        and not name.endswith(keep)
    ]
    if stale:
        await store.delete(stale)
