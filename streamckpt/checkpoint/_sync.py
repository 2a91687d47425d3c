"""The blocking face of :class:`Checkpoint`, for sync training loops.

Rule: every method here is the twin of the async class's method of the same name, with the
same parameters, plus ``blocking`` / ``on_busy`` / ``after_commit`` on the saves; the twins are
made from the async definitions (:func:`streamckpt.bridge.blocking_method`) where nothing is
added, and a test compares every signature.
"""

from __future__ import annotations

import functools
from typing import Any, Literal, overload

from streamckpt.bridge import BlockingTwin, blocking_method
from streamckpt.checkpoint._background import OnBusy, SaveHandle
from streamckpt.checkpoint._checkpoint import AfterCommit, Checkpoint
from streamckpt.distributed import Coordinator
from streamckpt.storage import PathLike

__all__ = ["SyncCheckpoint"]


class SyncCheckpoint(BlockingTwin):
    """:class:`Checkpoint` for sync code: blocking calls, saves in the background on request.

    ``save(prefix)`` blocks until the checkpoint is committed, streaming the leaves from where
    they are in the calling thread (after any background save in flight, as ``on_busy``
    says); ``save(prefix, blocking=False)`` returns a :class:`SaveHandle` as soon as the leaves
    are snapshotted; ``save_async(prefix, copy=False)`` lends the leaves instead of copying
    them (see :meth:`Checkpoint.save_async`). Restores run in the calling thread too. Children
    are attributes, as on :class:`Checkpoint`.
    """

    __slots__ = ("__weakref__", "_checkpoint")

    def __init__(
        self, *, on_busy: OnBusy = "wait", background_nice: int | None = None, **children: Any
    ) -> None:
        checkpoint = Checkpoint(on_busy=on_busy, background_nice=background_nice, **children)
        object.__setattr__(self, "_checkpoint", checkpoint)

    def _twin_target(self) -> Checkpoint:
        return self.checkpoint

    @property
    def checkpoint(self) -> Checkpoint:
        """The async checkpoint underneath, sharing children and ``save_counter``."""
        checkpoint: Checkpoint = object.__getattribute__(self, "_checkpoint")
        return checkpoint

    @property
    def save_counter(self) -> int:
        return self.checkpoint.save_counter

    @property
    def on_busy(self) -> OnBusy:
        return self.checkpoint.on_busy

    def __getattr__(self, name: str) -> Any:  # the children
        return getattr(self.checkpoint, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.checkpoint, name, value)

    def __delattr__(self, name: str) -> None:
        delattr(self.checkpoint, name)

    # -- saving -------------------------------------------------------------------------

    @overload
    def save(
        self,
        file_prefix: PathLike,
        *,
        blocking: Literal[True] = ...,
        checkpoint_number: int | None = ...,
        num_shards: int | None = ...,
        overwrite: bool = ...,
        storage_options: dict[str, Any] | None = ...,
        filesystem: Any = ...,
        on_busy: OnBusy | None = ...,
        after_commit: AfterCommit | None = ...,
        coordinator: Coordinator | None = ...,
    ) -> str: ...
    @overload
    def save(
        self,
        file_prefix: PathLike,
        *,
        blocking: Literal[False],
        checkpoint_number: int | None = ...,
        num_shards: int | None = ...,
        overwrite: bool = ...,
        storage_options: dict[str, Any] | None = ...,
        filesystem: Any = ...,
        on_busy: OnBusy | None = ...,
        after_commit: AfterCommit | None = ...,
        coordinator: Coordinator | None = ...,
    ) -> SaveHandle: ...
    def save(
        self,
        file_prefix: PathLike,
        *,
        blocking: bool = True,
        checkpoint_number: int | None = None,
        num_shards: int | None = None,
        overwrite: bool = False,
        storage_options: dict[str, Any] | None = None,
        filesystem: Any = None,
        on_busy: OnBusy | None = None,
        after_commit: AfterCommit | None = None,
        coordinator: Coordinator | None = None,
    ) -> str | SaveHandle:
        """Blocking :meth:`Checkpoint.save`; ``blocking=False`` is :meth:`save_async`."""
        return self._store(
            True,
            file_prefix,
            blocking=blocking,
            on_busy=on_busy,
            after_commit=after_commit,
            checkpoint_number=checkpoint_number,
            num_shards=num_shards,
            overwrite=overwrite,
            storage_options=storage_options,
            filesystem=filesystem,
            coordinator=coordinator,
        )

    @overload
    def write(
        self,
        file_prefix: PathLike,
        *,
        blocking: Literal[True] = ...,
        num_shards: int | None = ...,
        overwrite: bool = ...,
        storage_options: dict[str, Any] | None = ...,
        filesystem: Any = ...,
        on_busy: OnBusy | None = ...,
        after_commit: AfterCommit | None = ...,
        coordinator: Coordinator | None = ...,
    ) -> str: ...
    @overload
    def write(
        self,
        file_prefix: PathLike,
        *,
        blocking: Literal[False],
        num_shards: int | None = ...,
        overwrite: bool = ...,
        storage_options: dict[str, Any] | None = ...,
        filesystem: Any = ...,
        on_busy: OnBusy | None = ...,
        after_commit: AfterCommit | None = ...,
        coordinator: Coordinator | None = ...,
    ) -> SaveHandle: ...
    def write(
        self,
        file_prefix: PathLike,
        *,
        blocking: bool = True,
        num_shards: int | None = None,
        overwrite: bool = False,
        storage_options: dict[str, Any] | None = None,
        filesystem: Any = None,
        on_busy: OnBusy | None = None,
        after_commit: AfterCommit | None = None,
        coordinator: Coordinator | None = None,
    ) -> str | SaveHandle:
        """Blocking :meth:`Checkpoint.write`; ``blocking=False`` is :meth:`write_async`."""
        return self._store(
            False,
            file_prefix,
            blocking=blocking,
            on_busy=on_busy,
            after_commit=after_commit,
            num_shards=num_shards,
            overwrite=overwrite,
            storage_options=storage_options,
            filesystem=filesystem,
            coordinator=coordinator,
        )

    def _store(
        self,
        counted: bool,
        file_prefix: PathLike,
        *,
        blocking: bool,
        on_busy: OnBusy | None,
        after_commit: AfterCommit | None,
        **options: Any,
    ) -> str | SaveHandle:
        """``save`` (``counted``) or ``write``: in the background, or here and now.

        A blocking save needs no snapshot: the caller waits, so its leaves cannot change.
        """
        checkpoint = self.checkpoint
        options.update(on_busy=on_busy, after_commit=after_commit)
        if not blocking:
            start = checkpoint.save_async if counted else checkpoint.write_async
            return start(file_prefix, **options)
        # Waiting here, not on the loop, keeps the wait out of the coroutine.
        checkpoint.wait_for_save(on_busy=on_busy)
        run = checkpoint.save if counted else checkpoint.write
        path: str = self._twin_run(run, file_prefix, **options)
        return path

    @functools.wraps(Checkpoint.save_async)
    def save_async(self, *args: Any, **kwargs: Any) -> SaveHandle:
        return self.checkpoint.save_async(*args, **kwargs)

    @functools.wraps(Checkpoint.write_async)
    def write_async(self, *args: Any, **kwargs: Any) -> SaveHandle:
        return self.checkpoint.write_async(*args, **kwargs)

    @functools.wraps(Checkpoint.wait_for_save)
    def wait_for_save(self, *args: Any, **kwargs: Any) -> None:
        self.checkpoint.wait_for_save(*args, **kwargs)

    # -- restoring and lifetime -----------------------------------------------------------

    restore = blocking_method(Checkpoint.restore)
    read = blocking_method(Checkpoint.read)

    def close(self) -> None:
        """Wait for the background save in flight and let the background loop go."""
        self.checkpoint.close()

    def __enter__(self) -> SyncCheckpoint:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
