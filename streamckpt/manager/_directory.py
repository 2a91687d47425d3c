"""The manager's directory as the manager last read or wrote it: its files and its view.

:class:`ManagedDirectory` owns the three files a managed directory holds besides its
checkpoints (the state file, the metrics sidecar, the list of checkpoints being deleted; see
:mod:`streamckpt.manager._files`) and the view built from them: the listed checkpoints, the
latest one, the last preserved timestamp. It reads and writes them and deletes checkpoints;
it decides nothing. What to keep, when to save and what to restore are the manager's
(:mod:`streamckpt.manager._manager`), which changes the view only through what this class
publishes, so that the files and the view cannot drift apart.

Rules: each file is written atomically; a checkpoint is deleted only inside the directory,
index first (``_files``); a path in the state file is the store's (relative to the directory
or absolute), a path handed to the user is joined back (``user_path``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, Literal

from streamckpt.errors import CorruptCheckpointError
from streamckpt.format.state import (
    CheckpointState,
    decode_metrics,
    decode_state,
    encode_metrics,
    encode_state,
)
from streamckpt.manager._files import (
    DELETING_FILENAME,
    METRICS_FILENAME,
    STATE_FILENAME,
    decode_deleting,
    delete_checkpoints,
    encode_deleting,
    find_unpublished,
    read_optional,
)
from streamckpt.retention import ManagedEntry, is_absolute, is_contained, join_user
from streamckpt.storage import PathLike, resolve

logger = logging.getLogger("streamckpt.manager")

#: ``(best_metric, mode, keep_best)`` as the metrics sidecar records it, or None
Best = tuple[str, Literal["min", "max"], int] | None


class ManagedDirectory:
    """One managed directory's files, and the view of its checkpoints read from them."""

    def __init__(
        self,
        directory: PathLike,
        *,
        storage_options: dict[str, Any] | None = None,
        filesystem: Any = None,
    ) -> None:
        self.directory = os.fspath(directory)
        self.storage_options = storage_options
        self.filesystem = filesystem
        self.store, self.dir_path = resolve(
            self.directory, storage_options=storage_options, filesystem=filesystem
        )
        self._urls = filesystem is not None or "://" in self.directory
        self.state_path = self.store.join(self.dir_path, STATE_FILENAME)
        self.metrics_path = self.store.join(self.dir_path, METRICS_FILENAME)
        self.deleting_path = self.store.join(self.dir_path, DELETING_FILENAME)
        #: whether the files were read (by :meth:`reload`)
        self.loaded = False
        #: the listed checkpoints, oldest first (preserved-by-hours ones are not listed)
        self.entries: list[ManagedEntry] = []
        self.latest: str | None = None
        self.last_preserved = 0.0
        #: checkpoints an earlier sweep dropped from the state file and did not finish deleting
        self.deleting: list[str] = []
        self._has_sidecar = False
        self._swept_leftovers = False

    # -- paths ------------------------------------------------------------------------------

    def user_path(self, path: str) -> str:
        return join_user(self.directory, path, urls=self._urls)

    def store_path(self, path: str) -> str:
        if "://" in path:
            options = {"storage_options": self.storage_options, "filesystem": self.filesystem}
            _, store_path = resolve(path, **options)
            return store_path
        if is_absolute(path):
            return path
        return self.store.join(self.dir_path, path)

    def contained(self, path: str) -> bool:
        """Whether a state-file path names a checkpoint in this directory."""
        return is_contained(self.dir_path, self.store_path(path))

    # -- the files --------------------------------------------------------------------------

    async def reload(self, clock: Callable[[], float]) -> None:
        """Rebuild the view from the state file and the metrics sidecar, as TF's constructor.

        Listed checkpoints newer than ``last_preserved_timestamp`` form the active set (with no
        timestamps in the file, none do); timestamps from the future are clamped to now.
        """
        state_bytes = await read_optional(self.store, self.state_path)
        metrics_bytes = await read_optional(self.store, self.metrics_path)
        deleting_bytes = await read_optional(self.store, self.deleting_path)
        try:
            self.deleting = [] if deleting_bytes is None else decode_deleting(deleting_bytes)
        except CorruptCheckpointError as exc:
            logger.warning("ignoring %s: %s", self.store.uri(self.deleting_path), exc)
            self.deleting = []
        try:
            state = None if state_bytes is None else decode_state(state_bytes)
        except CorruptCheckpointError as exc:
            raise exc.with_context(uri=self.store.uri(self.state_path)) from None
        try:
            metrics = {} if metrics_bytes is None else decode_metrics(metrics_bytes)
        except CorruptCheckpointError as exc:
            raise exc.with_context(uri=self.store.uri(self.metrics_path)) from None
        now = clock()
        self._has_sidecar = metrics_bytes is not None
        self.entries = []
        if state is None:
            self.latest = None
            self.last_preserved = now - 1.0
        else:
            self.latest = state.model_checkpoint_path
            self.last_preserved = min(state.last_preserved_timestamp, now)
            paths = state.all_model_checkpoint_paths
            stamps = state.all_model_checkpoint_timestamps or (self.last_preserved,) * len(paths)
            for path, stamp in zip(paths, stamps, strict=False):  # TF's zip, too
                stamp = min(stamp, now)
                if stamp > self.last_preserved:
                    self.entries = [e for e in self.entries if e.path != path]
                    self.entries.append(ManagedEntry(path, stamp, metrics.get(path)))
        self.loaded = True

    async def publish(
        self,
        entries: Sequence[ManagedEntry],
        *,
        metrics_of: Sequence[ManagedEntry],
        last_preserved_timestamp: float,
        best: Best,
    ) -> None:
        """Write the sidecar (if metrics are in play), then the state file; each atomically.

        The view becomes what was written: ``entries``, the last of them the latest.
        """
        metrics_by_path = {e.path: e.metrics for e in metrics_of if e.metrics is not None}
        if metrics_by_path or self._has_sidecar:
            await self.store.write_atomic(
                self.metrics_path, encode_metrics(metrics_by_path, best=best), exclusive=False
            )
            self._has_sidecar = True
        state = CheckpointState(
            model_checkpoint_path=entries[-1].path,
            all_model_checkpoint_paths=tuple(e.path for e in entries),
            all_model_checkpoint_timestamps=tuple(e.timestamp for e in entries),
            last_preserved_timestamp=last_preserved_timestamp,
        )
        await self.store.write_atomic(self.state_path, encode_state(state), exclusive=False)
        self.adopt(entries, last_preserved_timestamp)

    def adopt(self, entries: Sequence[ManagedEntry], last_preserved_timestamp: float) -> None:
        """Take ``entries`` as the view without writing them (what another process published)."""
        self.entries = list(entries)
        self.latest = entries[-1].path if entries else None
        self.last_preserved = last_preserved_timestamp

    async def mark_deleting(self, doomed: Sequence[str]) -> None:
        """Record what is about to be deleted, before the state file stops naming it."""
        self.deleting = list(doomed)
        if doomed:
            await self.store.write_atomic(
                self.deleting_path, encode_deleting(doomed), exclusive=False
            )

    async def finish_deleting(self) -> None:
        """Delete what :meth:`mark_deleting` recorded, then the record itself."""
        if not self.deleting:
            return
        await self.delete(self.deleting)
        await self.store.delete([self.deleting_path])
        self.deleting = []

    async def delete(self, paths: Sequence[str]) -> None:
        """Remove checkpoints' files, index first; never outside this directory."""
        outside = [p for p in paths if not self.contained(p)]
        if outside:
            logger.warning(
                "not deleting %s: outside the manager's directory %s", outside, self.directory
            )
        await delete_checkpoints(
            self.store, [self.store_path(p) for p in paths if p not in outside]
        )

    # -- checkpoints the state file does not name -------------------------------------------

    async def leftovers(self, name: str, *, known: set[str]) -> list[str]:
        """Checkpoints newer than the published latest that no state file ever named.

        They are what saves that crashed or failed before their publication left (shards
        without an index, or a whole checkpoint the caller was told had failed). Looked for
        once per directory object (one listing); preserved checkpoints are older and never
        match.
        """
        if self._swept_leftovers:
            return []
        self._swept_leftovers = True
        found = await find_unpublished(
            self.store,
            self.dir_path,
            name,
            known=known | {e.path for e in self.entries},
            latest=self.latest,
        )
        return [p for p, _ in found]

    async def unpublished(self, name: str) -> list[tuple[str, str]]:
        """Checkpoints ``name-N`` newer than the latest that the state file does not name.

        Each comes with why it is not restorable.
        """
        known = {e.path for e in self.entries} | {self.latest or ""}
        return await find_unpublished(
            self.store, self.dir_path, name, known=known, latest=self.latest
        )

    def forget(self, broken: set[str], latest: str | None) -> None:
        """Drop ``broken`` checkpoints from the view; take ``latest`` as the latest.

        What a restore found: the files stay, and the state file is not rewritten.
        """
        self.entries = [e for e in self.entries if e.path not in broken]
        self.latest = latest
