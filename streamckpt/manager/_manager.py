"""CheckpointManager: numbered checkpoints in one directory, a retention policy, and resume.

The directory's layout is described in :mod:`streamckpt.manager._files`; its files and the
view read from them are :class:`~streamckpt.manager._directory.ManagedDirectory`'s. This
module decides: when to save, what to keep, what to restore. Rules:

- A save publishes in this order: the checkpoint (its index committed last by ``write``), the
  metrics sidecar, the state file, and only then deletions. The state file names committed
  checkpoints only, and no longer names the ones about to be deleted, so a crash at any point
  leaves every checkpoint it names intact (at worst, some unreferenced files stay behind).
- Deletion goes index first (see ``_files``) and never leaves the manager's directory.
- The ``keep_best`` best checkpoints by ``best_metric`` are never deleted by the manager.
- At most one save runs at a time per manager; one manager per directory (as with TF).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal, Protocol, SupportsFloat, SupportsInt

from streamckpt.bridge import default_bridge
from streamckpt.checkpoint import Checkpoint, SaveHandle, SyncCheckpoint
from streamckpt.distributed import Coordinator
from streamckpt.distributed._protocol import PRIMARY
from streamckpt.distributed.together import all_or_none, from_primary
from streamckpt.errors import SaveInProgressError, StorageError
from streamckpt.manager._directory import ManagedDirectory
from streamckpt.manager._files import SkippedCheckpoint, verify_checkpoint
from streamckpt.manager._resume import restore_newest
from streamckpt.retention import ManagedEntry, best_paths, plan_retention
from streamckpt.storage import PathLike

__all__ = ["CheckpointManager", "ManagedCheckpoint"]

logger = logging.getLogger("streamckpt.manager")


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

    With a ``coordinator`` (:mod:`streamckpt.distributed`) every process of the job makes
    the manager and calls it together: saves are one checkpoint from all of them; only the
    primary writes the state file and deletes old checkpoints, after the commit (the others
    keep the same view); :meth:`restore_or_initialize` restores the checkpoint the primary
    chose on every process.
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
        coordinator: Coordinator | None = None,
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
        self._dir = ManagedDirectory(
            directory, storage_options=storage_options, filesystem=filesystem
        )
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
        self._coordinator = coordinator
        self._last_step: int | None = None
        self._saving = False
        self._in_flight: SaveHandle | None = None  # the last save_async
        # Paths restore_or_initialize found broken; a save reusing one clears it first.
        self._broken: set[str] = set()
        self.skipped: list[SkippedCheckpoint] = []
        """What the last :meth:`restore_or_initialize` passed over (also logged)."""

    # -- views ----------------------------------------------------------------------------

    @property
    def directory(self) -> str:
        return self._dir.directory

    @property
    def checkpoints(self) -> list[str]:
        """Managed checkpoints, oldest first (preserved-by-hours ones are not listed, as in TF)."""
        self._require_loaded()
        return [self._dir.user_path(e.path) for e in self._dir.entries]

    @property
    def latest_checkpoint(self) -> str | None:
        """The newest checkpoint's prefix, or None; what ``tf.train.latest_checkpoint`` says."""
        self._require_loaded()
        latest = self._dir.latest
        return None if latest is None else self._dir.user_path(latest)

    def _require_loaded(self) -> None:
        if not self._dir.loaded:
            raise RuntimeError(
                "the manager has not read its directory yet: await reload(), save() or "
                "restore_or_initialize() first"
            )

    def _user_path(self, path: str) -> str:
        return self._dir.user_path(path)

    # -- state ----------------------------------------------------------------------------

    async def reload(self) -> None:
        """Rebuild the view from the state file and the metrics sidecar, as TF's constructor.

        Listed checkpoints newer than ``last_preserved_timestamp`` form the active set (with no
        timestamps in the file, none do); timestamps from the future are clamped to now.
        """
        await self._dir.reload(self._clock)

    async def _ensure_loaded(self) -> None:
        if not self._dir.loaded:
            await self.reload()

    @property
    def _primary(self) -> bool:
        """Whether this process writes the manager's files (always, without a coordinator)."""
        return self._coordinator is None or self._coordinator.rank == 0

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
        copy: bool = True,
    ) -> SaveHandle | None:
        """:meth:`save` in the background: the checkpoint's :meth:`~Checkpoint.save_async`.

        Returns as soon as the leaves are snapshotted (None when ``checkpoint_interval`` says
        not yet); the write, the state file and the deletions of the retention policy follow
        on the checkpoint's background thread, in that order, so a checkpoint is published
        only once committed and old ones go only after that. A save while another is in flight
        waits for it, or raises :class:`SaveInProgressError`, as the checkpoint's ``on_busy``
        says. Needs a :class:`streamckpt.Checkpoint`. A plain function, callable from sync
        and async code alike (it blocks while it waits for a previous save). ``copy=False``
        lends the arrays instead of copying them, as in :meth:`Checkpoint.save_async`: they
        must not change until the handle is done.
        """
        checkpoint = self._checkpoint
        if not isinstance(checkpoint, Checkpoint):
            raise TypeError("save_async needs a streamckpt.Checkpoint to snapshot")
        if self._saving:
            raise SaveInProgressError("a save of this manager is already running")
        # The previous save's publication changes the view this one is planned from.
        checkpoint.wait_for_save()
        if not self._dir.loaded:
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
            storage_options=self._dir.storage_options,
            filesystem=self._dir.filesystem,
            after_commit=record,
            coordinator=self._coordinator,
            copy=copy,
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
            if self._primary:
                await self._dir.delete([path])
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
        together = {} if self._coordinator is None else {"coordinator": self._coordinator}
        saved = await self._checkpoint.save(
            self._user_path(self._name),
            checkpoint_number=None if step is None else int(step),
            storage_options=self._dir.storage_options,
            filesystem=self._dir.filesystem,
            **together,
        )
        await self._record(path, current_step, values)
        return saved

    async def _record(
        self, path: str, current_step: int | None, values: dict[str, float] | None
    ) -> None:
        """A committed checkpoint joins the view: publish it, then apply the policy."""
        new = ManagedEntry(path, self._clock(), values)
        entries = [e for e in self._dir.entries if e.path != path] + [new]
        protected = best_paths(
            entries, best_metric=self._best_metric, mode=self._mode, keep_best=self._keep_best
        )
        plan = plan_retention(
            entries,
            max_to_keep=self._max_to_keep,
            keep_checkpoint_every_n_hours=self._keep_hours,
            last_preserved_timestamp=self._dir.last_preserved,
            protected=protected,
        )
        if not self._primary:
            # the primary publishes and deletes; the others keep the same view, no I/O
            self._dir.adopt(plan.kept, plan.last_preserved_timestamp)
            self._last_step = current_step
            return
        deleted = set(plan.deleted)
        listed = {e.path for e in plan.kept}
        # What an earlier sweep did not finish deleting goes now, unless listed again; so do,
        # once per manager, checkpoints of crashed saves that were never published.
        leftovers = await self._dir.leftovers(self._name, known=listed | {path})
        doomed = list(dict.fromkeys([*plan.deleted, *self._dir.deleting, *leftovers]))
        # recorded before the state file stops naming them
        await self._dir.mark_deleting([p for p in doomed if p not in listed])
        best = (
            None if self._best_metric is None else (self._best_metric, self._mode, self._keep_best)
        )
        await self._dir.publish(
            plan.kept,
            # the deleted ones' metrics go with them; preserved ones keep theirs
            metrics_of=[e for e in entries if e.path not in deleted],
            last_preserved_timestamp=plan.last_preserved_timestamp,
            best=best,
        )
        self._last_step = current_step
        try:
            await self._dir.finish_deleting()
        except StorageError as exc:
            logger.warning("could not delete old checkpoints %s: %s", self._dir.deleting, exc)

    # -- restore --------------------------------------------------------------------------

    async def _unpublished(self) -> list[SkippedCheckpoint]:
        """Checkpoints newer than the latest that the state file does not name."""
        found = await self._dir.unpublished(self._name)
        self._broken.update(path for path, _ in found)
        return [SkippedCheckpoint(self._user_path(path), reason) for path, reason in found]

    async def _verify(self, path: str) -> str | None:
        """Why the checkpoint cannot be restored, or None if it looks whole."""
        if not self._dir.contained(path):
            return "outside the manager's directory: not restored"
        return await verify_checkpoint(
            self._user_path(path),
            storage_options=self._dir.storage_options,
            filesystem=self._dir.filesystem,
        )

    async def _restore(self, path: str) -> None:
        await self._checkpoint.restore(
            self._user_path(path),
            storage_options=self._dir.storage_options,
            filesystem=self._dir.filesystem,
        )

    async def _choose_and_restore(self) -> str | None:
        """The newest checkpoint that verifies and restores here; the others are skipped."""
        skipped = await self._unpublished()
        latest = self._dir.latest
        candidates = [latest] if latest is not None else []
        candidates += [e.path for e in reversed(self._dir.entries) if e.path != latest]
        restored, passed_over = await restore_newest(
            candidates, verify=self._verify, restore=self._restore
        )
        self._broken.update(item.path for item in passed_over)
        skipped += [SkippedCheckpoint(self._user_path(i.path), i.reason) for i in passed_over]
        self.skipped = skipped
        for item in skipped:
            logger.warning("skipped checkpoint %s: %s", item.path, item.reason)
        self._dir.forget(self._broken, restored)
        return restored

    async def _restore_together(self, coordinator: Coordinator) -> str | None:
        """The primary chooses (and restores its own part); everyone restores that one.

        Every process ends with the same checkpoint or the same failure: the outcomes are
        gathered after the restores, so one process's failure fails all of them.
        """

        async def choose() -> tuple[str | None, list[str], list[SkippedCheckpoint]]:
            return await self._choose_and_restore(), sorted(self._broken), self.skipped

        restored, broken, skipped = await from_primary(
            coordinator, choose, name="manager-choose", what="choose a checkpoint"
        )
        failure: Exception | None = None
        if coordinator.rank != PRIMARY:
            self._broken.update(broken)
            self.skipped = list(skipped)
            self._dir.forget(self._broken, restored)
            if restored is not None:
                try:
                    await self._restore(restored)
                except Exception as exc:
                    failure = exc
        await all_or_none(
            coordinator, failure, name="manager-restored", what=f"restoring {restored!r}"
        )
        return restored

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
        if self._coordinator is not None and self._coordinator.world_size > 1:
            restored = await self._restore_together(self._coordinator)
        else:
            restored = await self._choose_and_restore()
        if restored is None:
            if self._init_fn is not None:
                result = self._init_fn()
                if inspect.isawaitable(result):
                    await result
            return None
        if self._interval is not None and self._step_counter is not None:
            self._last_step = _read_step(self._step_counter)
        return self._user_path(restored)
