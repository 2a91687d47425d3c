"""Blocking versions of the public API, for scripts and training loops.

Each call runs the async implementation on an event loop: ``anyio.run`` when the calling
thread has none, otherwise (a notebook, an async framework calling sync code) a short-lived
loop in a worker thread through an anyio blocking portal. The signatures are the async ones.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import functools
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, ParamSpec, TypeVar

import anyio
import anyio.from_thread
import numpy as np

from streamckpt import api
from streamckpt import checkpoint as _checkpoint
from streamckpt import manager as _manager
from streamckpt.pipeline.read import CheckpointReader, TensorInfo
from streamckpt.pipeline.save import DEFAULT_CHUNK_BYTES, ProgressCallback, SaveInfo, Tensors
from streamckpt.storage import PathLike

__all__ = [
    "Checkpoint",
    "CheckpointManager",
    "SyncCheckpointReader",
    "latest_checkpoint",
    "load",
    "load_nested",
    "open",
    "read_tensor",
    "run",
    "save",
]

P = ParamSpec("P")
T = TypeVar("T")


def _in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def run(fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run one coroutine function to completion from sync code."""
    call = functools.partial(fn, *args, **kwargs)
    if not _in_event_loop():
        # The loop's main task returns nothing: Python 3.11's asyncio.Runner formats that task,
        # its result included, twice as it restores the SIGINT handler. For a loaded dict of
        # 20,000 arrays that took about 10 ms of a 0.28 s load.
        results: list[T] = []

        async def main() -> None:
            results.append(await call())

        anyio.run(main)
        return results[0]
    with anyio.from_thread.start_blocking_portal() as portal:
        return portal.call(call)


def save(
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
) -> SaveInfo:
    """Blocking :func:`streamckpt.save`."""
    return run(
        api.save,
        prefix,
        tensors,
        num_shards=num_shards,
        overwrite=overwrite,
        storage_options=storage_options,
        filesystem=filesystem,
        chunk_bytes=chunk_bytes,
        max_inflight_bytes=max_inflight_bytes,
        progress=progress,
    )


def load(
    prefix: PathLike,
    *,
    names: Iterable[str | bytes] | None = None,
    storage_options: dict[str, Any] | None = None,
    filesystem: Any = None,
    max_inflight_bytes: int | None = None,
    progress: ProgressCallback | None = None,
    stats: dict[str, float] | None = None,
) -> dict[str, np.ndarray[Any, Any]]:
    """Blocking :func:`streamckpt.load`."""
    return run(
        api.load,
        prefix,
        names=names,
        storage_options=storage_options,
        filesystem=filesystem,
        max_inflight_bytes=max_inflight_bytes,
        progress=progress,
        stats=stats,
    )


def read_tensor(
    prefix: PathLike,
    name: str | bytes,
    *,
    index: Any = None,
    storage_options: dict[str, Any] | None = None,
    filesystem: Any = None,
    stats: dict[str, float] | None = None,
) -> np.ndarray[Any, Any]:
    """Blocking :func:`streamckpt.read_tensor`."""
    return run(
        api.read_tensor,
        prefix,
        name,
        index=index,
        storage_options=storage_options,
        filesystem=filesystem,
        stats=stats,
    )


class SyncCheckpointReader:
    """An open checkpoint for sync code; its loop lives in a portal thread until closed."""

    def __init__(self, portal: anyio.from_thread.BlockingPortal, reader: CheckpointReader):
        self._portal = portal
        self._reader = reader

    @property
    def uri(self) -> str:
        return self._reader.uri

    @property
    def entries(self) -> dict[str, TensorInfo]:
        return self._reader.entries

    def info(self, name: str | bytes) -> TensorInfo:
        return self._portal.call(self._reader.info, name)

    def read(self, name: str | bytes, index: Any = None) -> np.ndarray[Any, Any]:
        return self._portal.call(functools.partial(self._reader.read, name, index=index))

    def read_many(self, names: Iterable[str | bytes]) -> dict[str, np.ndarray[Any, Any]]:
        return self._portal.call(self._reader.read_many, builtins.list(names))


@contextlib.contextmanager
def open(
    prefix: PathLike,
    *,
    load_index: bool = True,
    storage_options: dict[str, Any] | None = None,
    filesystem: Any = None,
) -> Iterator[SyncCheckpointReader]:
    """Blocking :func:`streamckpt.open`, as a ``with`` block."""
    with anyio.from_thread.start_blocking_portal() as portal:
        manager = api.open(
            prefix, load_index=load_index, storage_options=storage_options, filesystem=filesystem
        )
        reader = portal.call(manager.__aenter__)
        try:
            yield SyncCheckpointReader(portal, reader)
        finally:
            portal.call(manager.__aexit__, None, None, None)


# The high level's blocking faces live beside their async classes; exported here by name.
Checkpoint = _checkpoint.SyncCheckpoint
CheckpointManager = _manager.SyncCheckpointManager


def latest_checkpoint(
    directory: PathLike,
    *,
    storage_options: dict[str, Any] | None = None,
    filesystem: Any = None,
) -> str | None:
    """Blocking :func:`streamckpt.latest_checkpoint`: one read of the state file."""
    return run(
        _manager.latest_checkpoint,
        directory,
        storage_options=storage_options,
        filesystem=filesystem,
    )


def load_nested(
    save_path: PathLike,
    *,
    storage_options: dict[str, Any] | None = None,
    filesystem: Any = None,
) -> dict[str, Any]:
    """Blocking :func:`streamckpt.load_nested`: an object-based checkpoint as nested dicts."""
    return run(
        _checkpoint.load_nested,
        save_path,
        storage_options=storage_options,
        filesystem=filesystem,
    )
