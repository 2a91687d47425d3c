"""What a managed directory holds, and the I/O of reading, checking and deleting it.

A managed directory is laid out as TensorFlow lays it out, so ``tf.train.latest_checkpoint``
and ``tf.train.CheckpointManager`` read it and this manager reads theirs::

    <directory>/ckpt-7.index, ckpt-7.data-00000-of-00001, ...   the checkpoints
    <directory>/checkpoint                 state file: TF's text-format CheckpointState
    <directory>/checkpoint.metrics.json    metrics per checkpoint, for keep-best (ours only)

Rule: a checkpoint is deleted index first, so a half-deleted one looks like an interrupted save
(shards without an index), never like a committed checkpoint with missing data.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import anyio

from streamckpt import api
from streamckpt.errors import CheckpointNotFoundError, CorruptCheckpointError
from streamckpt.format.bundle import index_filename
from streamckpt.format.state import decode_state
from streamckpt.retention import basename, join_user
from streamckpt.storage import PathLike, Store, resolve

__all__ = [
    "DELETING_FILENAME",
    "METRICS_FILENAME",
    "STATE_FILENAME",
    "SkippedCheckpoint",
    "broken_reason",
    "decode_deleting",
    "delete_checkpoints",
    "encode_deleting",
    "find_unpublished",
    "latest_checkpoint",
    "read_optional",
    "verify_checkpoint",
]

STATE_FILENAME = "checkpoint"
# TensorFlow's text parser rejects unknown fields, so metrics cannot go into the state file.
METRICS_FILENAME = "checkpoint.metrics.json"
# Checkpoints a sweep dropped from the state file and is deleting: a deletion cut short is
# finished by the next sweep, instead of leaving files that look like preserved checkpoints.
DELETING_FILENAME = "checkpoint.deleting.json"
_SHARD_SUFFIX = re.compile(r"\.data-\d{5}-of-\d{5}$")
# Shard sizes checked at once when verifying a checkpoint with many shards.
_MAX_CONCURRENT_CHECKS = 16


@dataclass(frozen=True, slots=True)
class SkippedCheckpoint:
    """A checkpoint :meth:`CheckpointManager.restore_or_initialize` passed over, and why."""

    path: str
    reason: str


async def read_optional(store: Store, path: str) -> bytes | None:
    try:
        return await store.read_all(path)
    except CheckpointNotFoundError:
        return None


async def latest_checkpoint(
    directory: PathLike,
    *,
    storage_options: dict[str, Any] | None = None,
    filesystem: Any = None,
) -> str | None:
    """The newest checkpoint's prefix per the directory's state file, or None if it has none.

    One read (the state file), no listing: a manager writes the state file only after the
    checkpoint's index is committed, so the prefix it names is complete. Unlike TF, which
    checks that the index exists, this does not; a corrupt state file raises
    CorruptCheckpointError instead of reading as "no checkpoint".
    """
    text = os.fspath(directory)
    store, path = resolve(text, storage_options=storage_options, filesystem=filesystem)
    data = await read_optional(store, store.join(path, STATE_FILENAME))
    if data is None:
        return None
    try:
        state = decode_state(data)
    except CorruptCheckpointError as exc:
        raise exc.with_context(uri=store.uri(store.join(path, STATE_FILENAME))) from None
    urls = filesystem is not None or "://" in text
    return join_user(text, state.model_checkpoint_path, urls=urls)


_BROKEN = (CheckpointNotFoundError, CorruptCheckpointError)


def broken_reason(exc: Exception) -> str:
    """Why a checkpoint is unusable, when ``exc`` says so; re-raises any other error.

    Task groups wrap errors in groups, so a group counts when every error in it is one of
    ours for a missing file or corrupt bytes.
    """
    if isinstance(exc, ExceptionGroup):
        if exc.split(_BROKEN)[1] is not None:
            raise exc
        leaf: BaseException = exc
        while isinstance(leaf, BaseExceptionGroup):
            leaf = leaf.exceptions[0]
        exc_text = str(leaf)
        kind = type(leaf)
    elif isinstance(exc, _BROKEN):
        exc_text, kind = str(exc), type(exc)
    else:
        raise exc
    return f"{'missing' if issubclass(kind, CheckpointNotFoundError) else 'corrupt'}: {exc_text}"


async def delete_checkpoints(store: Store, prefixes: Sequence[str]) -> None:
    """Remove checkpoints' files: every index first, then the data shards found by listing."""
    if not prefixes:
        return
    await store.delete([index_filename(p) for p in prefixes])
    by_dir: dict[str, set[str]] = {}
    for prefix in prefixes:
        by_dir.setdefault(store.dirname(prefix), set()).add(basename(prefix))
    shards: list[str] = []
    for directory, bases in by_dir.items():
        for listed in await store.list_dir(directory):
            name = basename(listed)
            match = _SHARD_SUFFIX.search(name)
            if match is not None and name[: match.start()] in bases:
                shards.append(listed)
    await store.delete(shards)


async def find_unpublished(
    store: Store, directory: str, name: str, *, known: set[str], latest: str | None
) -> list[tuple[str, str]]:
    """(path, why) of checkpoints newer than ``latest`` that the state file does not name.

    One listing. They come from saves interrupted before their index was committed (shards
    only) or before the state file was written.
    """
    pattern = re.compile(re.escape(basename(name)) + r"-(\d+)(\.index|\.data-\d{5}-of-\d{5})$")
    latest_match = pattern.match(basename(latest or "") + ".index")
    newest_known = int(latest_match.group(1)) if latest_match else -1
    listed_dir = store.dirname(store.join(directory, f"{name}-0"))
    has_index: dict[int, bool] = {}
    for listed in await store.list_dir(listed_dir):
        match = pattern.match(basename(listed))
        if match is not None:
            number = int(match.group(1))
            has_index[number] = has_index.get(number, False) or match.group(2) == ".index"
    found = []
    for number in sorted(has_index, reverse=True):
        path = f"{name}-{number}"
        if number <= newest_known or path in known:
            continue
        reason = (
            "not in the state file: the save stopped before it was published"
            if has_index[number]
            else "no index: the save stopped before its commit"
        )
        found.append((path, reason))
    return found


async def verify_checkpoint(
    prefix: str, *, storage_options: dict[str, Any] | None, filesystem: Any
) -> str | None:
    """Why the checkpoint cannot be restored, or None if it looks whole.

    Checks that the index opens and decodes (block checksums included) and that every data
    shard exists and is long enough for the tensors the index places in it. Tensor checksums
    are left to the restore, which reads the data anyway.
    """
    try:
        async with api.open(
            prefix, storage_options=storage_options, filesystem=filesystem
        ) as reader:
            needed = dict.fromkeys(range(reader.header.num_shards), 0)
            for info in reader.entries.values():
                if info.shard in needed:
                    needed[info.shard] = max(needed[info.shard], info.offset + info.size)
            sizes: dict[int, int] = {}
            limiter = anyio.CapacityLimiter(_MAX_CONCURRENT_CHECKS)

            async def measure(shard: int) -> None:
                async with limiter:
                    sizes[shard] = await reader.store.size(reader.shard_path(shard))

            async with anyio.create_task_group() as tg:
                for shard in needed:
                    tg.start_soon(measure, shard)
    except Exception as exc:
        return broken_reason(exc)
    for shard, size in sorted(sizes.items()):
        if size < needed[shard]:
            return f"data shard {shard} has {size} bytes, the index needs {needed[shard]}"
    return None


def encode_deleting(paths: Sequence[str]) -> bytes:
    """The pending-deletions file: the state-file spellings of the checkpoints being deleted."""
    return (json.dumps({"deleting": list(paths)}) + "\n").encode()


def decode_deleting(data: bytes) -> list[str]:
    """Parse :func:`encode_deleting`'s bytes; anything else is corrupt."""
    try:
        document = json.loads(bytes(data).decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise CorruptCheckpointError(f"pending-deletions file is not JSON: {exc}") from None
    paths = document.get("deleting") if isinstance(document, dict) else None
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise CorruptCheckpointError("pending-deletions file holds no list of paths")
    return paths
