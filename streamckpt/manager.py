"""CheckpointManager: numbered checkpoints in one directory, a retention policy, and resume.

A managed directory is laid out as TensorFlow lays it out, so ``tf.train.latest_checkpoint``
and ``tf.train.CheckpointManager`` read it and this manager reads theirs::

    <directory>/ckpt-7.index, ckpt-7.data-00000-of-00001, ...   the checkpoints
    <directory>/checkpoint                 state file: TF's text-format CheckpointState
    <directory>/checkpoint.metrics.json    metrics per checkpoint, for keep-best (ours only)

Invariants:

- A save publishes in this order: the checkpoint (its index committed last by ``write``), the
  metrics sidecar, the state file, and only then deletions. The state file names committed
  checkpoints only, and no longer names the ones about to be deleted, so a crash at any point
  leaves every checkpoint it names intact (at worst, some unreferenced files stay behind).
- A checkpoint is deleted index first: a half-deleted one looks like an interrupted save
  (shards without an index), never like a committed checkpoint with missing data.
- The ``keep_best`` best checkpoints by ``best_metric`` are never deleted by the manager.
- At most one save runs at a time per manager; one manager per directory (as with TF).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, SupportsFloat, SupportsInt, overload

import anyio

from streamckpt import api
from streamckpt.bridge import BlockingTwin, blocking_method, default_bridge
from streamckpt.checkpoint import Checkpoint, SaveHandle, SyncCheckpoint
from streamckpt.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    SaveInProgressError,
    StorageError,
)
from streamckpt.format.bundle import index_filename
from streamckpt.format.state import (
    CheckpointState,
    decode_metrics,
    decode_state,
    encode_metrics,
    encode_state,
)
from streamckpt.retention import (
    ManagedEntry,
    basename,
    best_paths,
    is_absolute,
    is_contained,
    join_user,
    plan_retention,
)
from streamckpt.storage import PathLike, Store, resolve

__all__ = [
    "CheckpointManager",
    "ManagedCheckpoint",
    "SkippedCheckpoint",
    "SyncCheckpointManager",
    "latest_checkpoint",
]

logger = logging.getLogger(__name__)

STATE_FILENAME = "checkpoint"
# TensorFlow's text parser rejects unknown fields, so metrics cannot go into the state file.
METRICS_FILENAME = "checkpoint.metrics.json"
_SHARD_SUFFIX = re.compile(r"\.data-\d{5}-of-\d{5}$")
# Shard sizes checked at once when verifying a checkpoint with many shards.
_MAX_CONCURRENT_CHECKS = 16


class ManagedCheckpoint(Protocol):
    """What the manager needs of a checkpoint object (``streamckpt.Checkpoint`` has it).

    ``save`` counts ``save_counter`` up, stores it in the checkpoint and writes
    ``<file_prefix>-<checkpoint_number>`` (default: the new ``save_counter``), as TensorFlow's
    manager does; ``restore`` brings ``save_counter`` back, so later saves do not reuse names.
    Background saves (:meth:`CheckpointManager.save_async`) need a :class:`Checkpoint`.
    """

    @property
    def save_counter(self) -> int: ...

    async def save(
        self,
        file_prefix: str,
        /,
        *,
        checkpoint_number: int | None = None,
        storage_options: dict[str, Any] | None = None,
        filesystem: Any = None,
    ) -> str: ...

    async def restore(
        self,
        save_path: str,
        /,
        *,
        storage_options: dict[str, Any] | None = None,
        filesystem: Any = None,
    ) -> object: ...


@dataclass(frozen=True, slots=True)
class SkippedCheckpoint:
    """A checkpoint :meth:`CheckpointManager.restore_or_initialize` passed over, and why."""

    path: str
    reason: str


async def _read_optional(store: Store, path: str) -> bytes | None:
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
    data = await _read_optional(store, store.join(path, STATE_FILENAME))
    if data is None:
        return None
    try:
        state = decode_state(data)
    except CorruptCheckpointError as exc:
        raise exc.with_context(uri=store.uri(store.join(path, STATE_FILENAME))) from None
    urls = filesystem is not None or "://" in text
    return join_user(text, state.model_checkpoint_path, urls=urls)


_BROKEN = (CheckpointNotFoundError, CorruptCheckpointError)


def _broken_reason(exc: Exception) -> str:
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


def _read_step(counter: Callable[[], SupportsInt] | SupportsInt) -> int:
    return int(counter() if callable(counter) else counter)


class CheckpointManager:
    """Keeps numbered checkpoints of one checkpoint object in ``directory``, TF-style.

    The constructor does no I/O; the state is read by the first async call (or :meth:`reload`),
    and :attr:`checkpoints` / :attr:`latest_checkpoint` are available from then on.

    ``save`` names checkpoints ``<checkpoint_name>-<N>`` with N the ``step`` passed, else the
    checkpoint's incremented ``save_counter``; it is skipped (returns None) while fewer than
    ``checkpoint_interval`` steps passed since the last save (step from ``step``, else
    ``step_counter``: an int, anything ``int()`` takes such as a tf.Variable, or a callable).
    Retention is TF's (``max_to_keep`` newest, ``keep_checkpoint_every_n_hours`` preserved
    forever and dropped from the list), plus the ``keep_best`` best by ``metrics[best_metric]``
    (``mode`` "min" or "max"), which stay listed and are never deleted. ``clock`` returns
    seconds since the epoch (tests inject one); ``init_fn`` (sync or async) runs when
    :meth:`restore_or_initialize` finds nothing to restore.
    """

    def __init__(
        self,
        checkpoint: ManagedCheckpoint | SyncCheckpoint,
        directory: PathLike,
        *,
        max_to_keep: int | None = 5,
        keep_checkpoint_every_n_hours: float | None = None,
        checkpoint_name: str = "ckpt",
        checkpoint_interval: int | None = None,
        step_counter: Callable[[], SupportsInt] | SupportsInt | None = None,
        best_metric: str | None = None,
        mode: Literal["min", "max"] = "min",
        keep_best: int = 1,
        init_fn: Callable[[], Awaitable[None] | None] | None = None,
        clock: Callable[[], float] = time.time,
        storage_options: dict[str, Any] | None = None,
        filesystem: Any = None,
    ) -> None:
        if max_to_keep is not None and max_to_keep <= 0:
            raise ValueError(f"max_to_keep must be a positive integer or None, got {max_to_keep}")
        if checkpoint_interval is not None and checkpoint_interval <= 0:
            raise ValueError(f"checkpoint_interval must be positive, got {checkpoint_interval}")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if keep_best < 1:
            raise ValueError(f"keep_best must be at least 1, got {keep_best}")
        # A blocking face is driven through the async checkpoint it carries.
        self._checkpoint: ManagedCheckpoint = (
            checkpoint.checkpoint if isinstance(checkpoint, SyncCheckpoint) else checkpoint
        )
        self._directory = os.fspath(directory)
        self._max_to_keep = max_to_keep
        self._keep_hours = keep_checkpoint_every_n_hours
        self._name = checkpoint_name
        self._interval = checkpoint_interval
        self._step_counter = step_counter
        self._best_metric = best_metric
        self._mode: Literal["min", "max"] = mode
        self._keep_best = keep_best
        self._init_fn = init_fn
        self._clock = clock
        self._storage_options = storage_options
        self._filesystem = filesystem
        self._store, self._dir_path = resolve(
            self._directory, storage_options=storage_options, filesystem=filesystem
        )
        self._urls = filesystem is not None or "://" in self._directory
        self._state_path = self._store.join(self._dir_path, STATE_FILENAME)
        self._metrics_path = self._store.join(self._dir_path, METRICS_FILENAME)

        self._loaded = False
        self._entries: list[ManagedEntry] = []
        self._latest: str | None = None
        self._last_preserved = 0.0
        self._last_step: int | None = None
        self._has_sidecar = False
        self._saving = False
        self._in_flight: SaveHandle | None = None  # the last save_async
        # Paths restore_or_initialize found broken; a save reusing one clears it first.
        self._broken: set[str] = set()
        self.skipped: list[SkippedCheckpoint] = []
        """What the last :meth:`restore_or_initialize` passed over (also logged)."""

    # -- views ----------------------------------------------------------------------------

    @property
    def directory(self) -> str:
        return self._directory

    @property
    def checkpoints(self) -> list[str]:
        """Managed checkpoints, oldest first (preserved-by-hours ones are not listed, as in TF)."""
        self._require_loaded()
        return [self._user_path(e.path) for e in self._entries]

    @property
    def latest_checkpoint(self) -> str | None:
        """The newest checkpoint's prefix, or None; what ``tf.train.latest_checkpoint`` says."""
        self._require_loaded()
        return None if self._latest is None else self._user_path(self._latest)

    def _require_loaded(self) -> None:
        if not self._loaded:
            raise RuntimeError(
                "the manager has not read its directory yet: await reload(), save() or "
                "restore_or_initialize() first"
            )

    def _user_path(self, path: str) -> str:
        return join_user(self._directory, path, urls=self._urls)

    def _store_path(self, path: str) -> str:
        if "://" in path:
            return resolve(
                path, storage_options=self._storage_options, filesystem=self._filesystem
            )[1]
        if is_absolute(path):
            return path
        return self._store.join(self._dir_path, path)

    # -- state ----------------------------------------------------------------------------

    async def reload(self) -> None:
        """Rebuild the view from the state file and the metrics sidecar, as TF's constructor.

        Listed checkpoints newer than ``last_preserved_timestamp`` form the active set (with no
        timestamps in the file, none do); timestamps from the future are clamped to now.
        """
        state_bytes = await _read_optional(self._store, self._state_path)
        metrics_bytes = await _read_optional(self._store, self._metrics_path)
        try:
            state = None if state_bytes is None else decode_state(state_bytes)
        except CorruptCheckpointError as exc:
            raise exc.with_context(uri=self._store.uri(self._state_path)) from None
        try:
            metrics = {} if metrics_bytes is None else decode_metrics(metrics_bytes)
        except CorruptCheckpointError as exc:
            raise exc.with_context(uri=self._store.uri(self._metrics_path)) from None
        now = self._clock()
        self._has_sidecar = metrics_bytes is not None
        self._entries = []
        if state is None:
            self._latest = None
            self._last_preserved = now - 1.0
        else:
            self._latest = state.model_checkpoint_path
            self._last_preserved = min(state.last_preserved_timestamp, now)
            paths = state.all_model_checkpoint_paths
            stamps = state.all_model_checkpoint_timestamps or (self._last_preserved,) * len(paths)
            for path, stamp in zip(paths, stamps, strict=False):  # TF's zip, too
                stamp = min(stamp, now)
                if stamp > self._last_preserved:
                    self._entries = [e for e in self._entries if e.path != path]
                    self._entries.append(ManagedEntry(path, stamp, metrics.get(path)))
        self._loaded = True

    async def _ensure_loaded(self) -> None:
        if not self._loaded:
            await self.reload()

    async def _publish(
        self,
        entries: Sequence[ManagedEntry],
        *,
        metrics_of: Sequence[ManagedEntry],
        last_preserved_timestamp: float,
    ) -> None:
        """Write the sidecar (if metrics are in play), then the state file; each atomically."""
        metrics_by_path = {e.path: e.metrics for e in metrics_of if e.metrics is not None}
        if metrics_by_path or self._has_sidecar:
            await self._store.write_atomic(
                self._metrics_path, encode_metrics(metrics_by_path), exclusive=False
            )
            self._has_sidecar = True
        state = CheckpointState(
            model_checkpoint_path=entries[-1].path,
            all_model_checkpoint_paths=tuple(e.path for e in entries),
            all_model_checkpoint_timestamps=tuple(e.timestamp for e in entries),
            last_preserved_timestamp=last_preserved_timestamp,
        )
        await self._store.write_atomic(self._state_path, encode_state(state), exclusive=False)

    def _contained(self, path: str) -> bool:
        """Whether a state-file path names a checkpoint in this manager's own directory."""
        return is_contained(self._dir_path, self._store_path(path))

    async def _delete(self, paths: Sequence[str]) -> None:
        """Remove checkpoints' files: every index first, then the data shards found by listing.

        A path outside the manager's directory (a state file naming ``../x`` or another
        absolute directory) is never deleted: logged and left alone.
        """
        outside = [p for p in paths if not self._contained(p)]
        if outside:
            logger.warning(
                "not deleting %s: outside the manager's directory %s", outside, self._directory
            )
        prefixes = [self._store_path(p) for p in paths if p not in outside]
        if not prefixes:
            return
        await self._store.delete([index_filename(p) for p in prefixes])
        by_dir: dict[str, set[str]] = {}
        for prefix in prefixes:
            by_dir.setdefault(self._store.dirname(prefix), set()).add(basename(prefix))
        shards: list[str] = []
        for directory, bases in by_dir.items():
            for listed in await self._store.list_dir(directory):
                name = basename(listed)
                match = _SHARD_SUFFIX.search(name)
                if match is not None and name[: match.start()] in bases:
                    shards.append(listed)
        await self._store.delete(shards)

    # -- save -----------------------------------------------------------------------------

    async def save(
        self,
        step: int | None = None,
        metrics: Mapping[str, SupportsFloat] | None = None,
        *,
        force: bool = False,
    ) -> str | None:
        """Write a checkpoint, publish it in the state file, then apply the retention policy.

        Returns the new prefix, or None when ``checkpoint_interval`` says not yet (``force``
        overrides the interval but, as in TF, never saves the same step twice). Without
        ``step`` the checkpoint's ``save`` numbers it (and stores the counter); with ``step``
        its ``write`` stores exactly ``<checkpoint_name>-<step>``, which (unlike TF) neither
        counts nor stores ``save_counter``. Deletions that fail after the state file is written
        are logged, not raised: the new checkpoint is saved and published by then.
        """
        if self._saving:
            raise SaveInProgressError("a save of this manager is already running")
        self._saving = True
        try:
            await self._background_done()
            return await self._save(step, metrics, force)
        finally:
            self._saving = False

    def save_async(
        self,
        step: int | None = None,
        metrics: Mapping[str, SupportsFloat] | None = None,
        *,
        force: bool = False,
    ) -> SaveHandle | None:
        """:meth:`save` in the background: the checkpoint's :meth:`~Checkpoint.save_async`.

        Returns as soon as the leaves are snapshotted (None when ``checkpoint_interval`` says
        not yet); the write, the state file and the deletions of the retention policy follow
        on the checkpoint's background thread, in that order, so a checkpoint is published
        only once committed and old ones go only after that. A save while another is in flight
        waits for it, or raises :class:`SaveInProgressError`, as the checkpoint's ``on_busy``
        says. Needs a :class:`streamckpt.Checkpoint`. A plain function, callable from sync
        and async code alike (it blocks while it waits for a previous save).
        """
        checkpoint = self._checkpoint
        if not isinstance(checkpoint, Checkpoint):
            raise TypeError("save_async needs a streamckpt.Checkpoint to snapshot")
        if self._saving:
            raise SaveInProgressError("a save of this manager is already running")
        # The previous save's publication changes the view this one is planned from.
        checkpoint.wait_for_save()
        if not self._loaded:
            self._twin_run(self.reload)
        current_step = self._current_step(step)
        if not self._due(current_step, force):
            return None
        values = None if metrics is None else {str(k): float(v) for k, v in metrics.items()}
        path = self._next_path(step)
        if path in self._broken:
            self._twin_run(self._clear_broken, path)

        async def record(_: str) -> None:
            await self._record(path, current_step, values)

        handle = checkpoint.save_async(
            self._user_path(self._name),
            checkpoint_number=None if step is None else int(step),
            storage_options=self._storage_options,
            filesystem=self._filesystem,
            after_commit=record,
        )
        self._in_flight = handle
        return handle

    def _twin_run(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        return default_bridge.run(fn, *args)

    async def _background_done(self) -> None:
        """Wait for a :meth:`save_async` in flight; its errors are its handle's."""
        handle = self._in_flight
        if handle is not None and not handle.done():
            with contextlib.suppress(Exception):
                await handle.wait()

    def _current_step(self, step: int | None) -> int | None:
        if step is not None:
            return int(step)
        if self._step_counter is not None:
            return _read_step(self._step_counter)
        return None

    def _due(self, current_step: int | None, force: bool) -> bool:
        """Whether ``checkpoint_interval`` lets this step be saved."""
        if self._interval is not None:
            if current_step is None:
                raise ValueError("checkpoint_interval needs a step: pass step= or step_counter=")
            if self._last_step is not None:
                if current_step == self._last_step:
                    return False
                if not force and current_step < self._last_step + self._interval:
                    return False
        return True

    def _next_path(self, step: int | None) -> str:
        number = int(step) if step is not None else self._checkpoint.save_counter + 1
        return f"{self._name}-{number}"

    async def _clear_broken(self, path: str) -> None:
        if path in self._broken:
            await self._delete([path])
            self._broken.discard(path)

    async def _save(
        self, step: int | None, metrics: Mapping[str, SupportsFloat] | None, force: bool
    ) -> str | None:
        await self._ensure_loaded()
        current_step = self._current_step(step)
        if not self._due(current_step, force):
            return None
        values = None if metrics is None else {str(k): float(v) for k, v in metrics.items()}
        path = self._next_path(step)
        await self._clear_broken(path)
        saved = await self._checkpoint.save(
            self._user_path(self._name),
            checkpoint_number=None if step is None else int(step),
            storage_options=self._storage_options,
            filesystem=self._filesystem,
        )
        await self._record(path, current_step, values)
        return saved

    async def _record(
        self, path: str, current_step: int | None, values: dict[str, float] | None
    ) -> None:
        """A committed checkpoint joins the view: publish it, then apply the policy."""
        new = ManagedEntry(path, self._clock(), values)
        entries = [e for e in self._entries if e.path != path] + [new]
        protected = best_paths(
            entries, best_metric=self._best_metric, mode=self._mode, keep_best=self._keep_best
        )
        plan = plan_retention(
            entries,
            max_to_keep=self._max_to_keep,
            keep_checkpoint_every_n_hours=self._keep_hours,
            last_preserved_timestamp=self._last_preserved,
            protected=protected,
        )
        deleted = set(plan.deleted)
        await self._publish(
            plan.kept,
            # the deleted ones' metrics go with them; preserved ones keep theirs
            metrics_of=[e for e in entries if e.path not in deleted],
            last_preserved_timestamp=plan.last_preserved_timestamp,
        )
        self._last_preserved = plan.last_preserved_timestamp
        self._entries = list(plan.kept)
        self._latest = path
        self._last_step = current_step
        try:
            await self._delete(plan.deleted)
        except StorageError as exc:
            logger.warning("could not delete old checkpoints %s: %s", list(plan.deleted), exc)

    # -- restore --------------------------------------------------------------------------

    async def _unpublished(self) -> list[SkippedCheckpoint]:
        """Checkpoints newer than the latest that the state file does not name (one listing).

        They come from saves interrupted before their index was committed (shards only) or
        before the state file was written.
        """
        pattern = re.compile(
            re.escape(basename(self._name)) + r"-(\d+)(\.index|\.data-\d{5}-of-\d{5})$"
        )
        known = {e.path for e in self._entries} | {self._latest or ""}
        latest_match = pattern.match(basename(self._latest or "") + ".index")
        newest_known = int(latest_match.group(1)) if latest_match else -1
        directory = self._store.dirname(self._store.join(self._dir_path, f"{self._name}-0"))
        has_index: dict[int, bool] = {}
        for listed in await self._store.list_dir(directory):
            match = pattern.match(basename(listed))
            if match is not None:
                number = int(match.group(1))
                has_index[number] = has_index.get(number, False) or match.group(2) == ".index"
        skipped = []
        for number in sorted(has_index, reverse=True):
            path = f"{self._name}-{number}"
            if number <= newest_known or path in known:
                continue
            reason = (
                "not in the state file: the save stopped before it was published"
                if has_index[number]
                else "no index: the save stopped before its commit"
            )
            self._broken.add(path)
            skipped.append(SkippedCheckpoint(self._user_path(path), reason))
        return skipped

    async def _verify(self, path: str) -> str | None:
        """Why the checkpoint cannot be restored, or None if it looks whole.

        Checks that the index opens and decodes (block checksums included) and that every data
        shard exists and is long enough for the tensors the index places in it. Tensor
        checksums are left to the restore, which reads the data anyway.
        """
        try:
            async with api.open(
                self._user_path(path),
                storage_options=self._storage_options,
                filesystem=self._filesystem,
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
            return _broken_reason(exc)
        for shard, size in sorted(sizes.items()):
            if size < needed[shard]:
                return f"data shard {shard} has {size} bytes, the index needs {needed[shard]}"
        return None

    async def restore_or_initialize(self) -> str | None:
        """Restore the newest checkpoint that verifies; else run ``init_fn`` and return None.

        Candidates are the state file's checkpoints, newest first. Each must pass
        :meth:`_verify` and then restore without a checksum or missing-file error; the ones
        that fail, and newer unpublished ones found by listing the directory, are recorded in
        :attr:`skipped`, logged as warnings, and dropped from the view (their files are left
        for inspection; a later save that reuses such a name removes them first). Storage
        errors are raised, not skipped: a flaky network must not silently roll training back.
        """
        await self._background_done()
        await self.reload()
        skipped = await self._unpublished()
        candidates = [self._latest] if self._latest is not None else []
        candidates += [e.path for e in reversed(self._entries) if e.path != self._latest]
        restored: str | None = None
        for path in candidates:
            if not self._contained(path):
                reason: str | None = "outside the manager's directory: not restored"
            else:
                reason = await self._verify(path)
            if reason is None:
                try:
                    await self._checkpoint.restore(
                        self._user_path(path),
                        storage_options=self._storage_options,
                        filesystem=self._filesystem,
                    )
                except Exception as exc:
                    reason = f"restore failed: {_broken_reason(exc)}"
            if reason is None:
                restored = path
                break
            self._broken.add(path)
            skipped.append(SkippedCheckpoint(self._user_path(path), reason))
        self.skipped = skipped
        for item in skipped:
            logger.warning("skipped checkpoint %s: %s", item.path, item.reason)
        self._entries = [e for e in self._entries if e.path not in self._broken]
        self._latest = restored
        if restored is None:
            if self._init_fn is not None:
                result = self._init_fn()
                if inspect.isawaitable(result):
                    await result
            return None
        if self._interval is not None and self._step_counter is not None:
            self._last_step = _read_step(self._step_counter)
        return self._user_path(restored)


class SyncCheckpointManager(BlockingTwin):
    """Blocking :class:`CheckpointManager` for sync training loops.

    Reads the directory's state on construction, as TensorFlow's manager does. Every async
    method has its twin here with the same parameters (``save`` adds ``blocking``);
    ``manager`` is the async one.
    """

    def __init__(
        self,
        checkpoint: ManagedCheckpoint | SyncCheckpoint,
        directory: PathLike,
        *,
        max_to_keep: int | None = 5,
        keep_checkpoint_every_n_hours: float | None = None,
        checkpoint_name: str = "ckpt",
        checkpoint_interval: int | None = None,
        step_counter: Callable[[], SupportsInt] | SupportsInt | None = None,
        best_metric: str | None = None,
        mode: Literal["min", "max"] = "min",
        keep_best: int = 1,
        init_fn: Callable[[], Awaitable[None] | None] | None = None,
        clock: Callable[[], float] = time.time,
        storage_options: dict[str, Any] | None = None,
        filesystem: Any = None,
    ) -> None:
        self.manager = CheckpointManager(
            checkpoint,
            directory,
            max_to_keep=max_to_keep,
            keep_checkpoint_every_n_hours=keep_checkpoint_every_n_hours,
            checkpoint_name=checkpoint_name,
            checkpoint_interval=checkpoint_interval,
            step_counter=step_counter,
            best_metric=best_metric,
            mode=mode,
            keep_best=keep_best,
            init_fn=init_fn,
            clock=clock,
            storage_options=storage_options,
            filesystem=filesystem,
        )
        self.reload()

    def _twin_target(self) -> CheckpointManager:
        return self.manager

    @property
    def directory(self) -> str:
        return self.manager.directory

    @property
    def checkpoints(self) -> list[str]:
        return self.manager.checkpoints

    @property
    def latest_checkpoint(self) -> str | None:
        return self.manager.latest_checkpoint

    @property
    def skipped(self) -> list[SkippedCheckpoint]:
        return self.manager.skipped

    reload = blocking_method(CheckpointManager.reload)
    restore_or_initialize = blocking_method(CheckpointManager.restore_or_initialize)

    @overload
    def save(
        self,
        step: int | None = ...,
        metrics: Mapping[str, SupportsFloat] | None = ...,
        *,
        force: bool = ...,
        blocking: Literal[True] = ...,
    ) -> str | None: ...
    @overload
    def save(
        self,
        step: int | None = ...,
        metrics: Mapping[str, SupportsFloat] | None = ...,
        *,
        force: bool = ...,
        blocking: Literal[False],
    ) -> SaveHandle | None: ...
    def save(
        self,
        step: int | None = None,
        metrics: Mapping[str, SupportsFloat] | None = None,
        *,
        force: bool = False,
        blocking: bool = True,
    ) -> str | SaveHandle | None:
        """Blocking :meth:`CheckpointManager.save`; ``blocking=False`` is its ``save_async``."""
        if not blocking:
            return self.manager.save_async(step, metrics, force=force)
        saved: str | None = self._twin_run(self.manager.save, step, metrics, force=force)
        return saved

    def save_async(
        self,
        step: int | None = None,
        metrics: Mapping[str, SupportsFloat] | None = None,
        *,
        force: bool = False,
    ) -> SaveHandle | None:
        """:meth:`CheckpointManager.save_async`."""
        return self.manager.save_async(step, metrics, force=force)
