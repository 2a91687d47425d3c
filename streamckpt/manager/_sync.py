"""The blocking face of :class:`CheckpointManager`, for sync training loops.

Rule: every async method has its twin here with the same parameters (``save`` adds
``blocking``), made from the async definition where nothing is added; a test compares them.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal, SupportsFloat, SupportsInt, overload

from streamckpt.bridge import BlockingTwin, blocking_method
from streamckpt.checkpoint import SaveHandle, SyncCheckpoint
from streamckpt.distributed import Coordinator
from streamckpt.manager._files import SkippedCheckpoint
from streamckpt.manager._manager import CheckpointManager, ManagedCheckpoint
from streamckpt.storage import PathLike

__all__ = ["SyncCheckpointManager"]


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
        coordinator: Coordinator | None = None,
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
            coordinator=coordinator,
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
        copy: bool = True,
    ) -> SaveHandle | None:
        """:meth:`CheckpointManager.save_async`."""
        return self.manager.save_async(step, metrics, force=force, copy=copy)
