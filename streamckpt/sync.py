"""Blocking versions of the public API, for scripts and training loops.

Rule: every blocking function and class here is the twin of an async one, made from its
definition (:func:`streamckpt.bridge.blocking`, :func:`streamckpt.bridge.blocking_method`) or,
where it adds ``blocking=`` or a shortcut, checked against it by a test of every signature.
Calls run through the one bridge (:mod:`streamckpt.bridge`): in the calling thread when it
runs no event loop, else on the bridge's loop thread; an open checkpoint keeps that thread
while it is open.

One shortcut: :func:`load`, :func:`read_tensor` of whole tensors and :func:`list_tensors` of
a checkpoint on local disk run the format's decoders over plain file reads in the calling
thread (:mod:`streamckpt.pipeline.local_read`), with no event loop; everything else here, and the
bridge and anyio themselves, load on first use. A fresh process that reads one local tensor
pays for numpy and the format code alone (issue 15.1, pinned by test_cold_start).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, cast

from streamckpt.pipeline.local_read import list_local_tensors, local_path, read_whole

if TYPE_CHECKING:
    import numpy as np

    from streamckpt import api
    from streamckpt.bridge import blocking
    from streamckpt.checkpoint import SyncCheckpoint as Checkpoint
    from streamckpt.checkpoint import load_nested as _load_nested
    from streamckpt.manager import SyncCheckpointManager as CheckpointManager
    from streamckpt.manager import latest_checkpoint as _latest_checkpoint
    from streamckpt.pipeline import bytewise
    from streamckpt.pipeline.info import TensorInfo
    from streamckpt.pipeline.save import ProgressCallback
    from streamckpt.storage import PathLike
    from streamckpt.sync_reader import SyncCheckpointReader as SyncCheckpointReader
    from streamckpt.sync_reader import blocking_open

    save = blocking(api.save)
    open = blocking_open
    latest_checkpoint = blocking(_latest_checkpoint)
    load_nested = blocking(_load_nested)
    copy_checkpoint = blocking(bytewise.copy_checkpoint)
    verify_checkpoint = blocking(bytewise.verify_checkpoint)

__all__ = [
    "Checkpoint",
    "CheckpointManager",
    "SyncCheckpointReader",
    "copy_checkpoint",
    "latest_checkpoint",
    "list_tensors",
    "load",
    "load_nested",
    "open",
    "read_tensor",
    "run",
    "save",
    "verify_checkpoint",
]

P = ParamSpec("P")
T = TypeVar("T")


def run(fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run one coroutine function to completion from sync code (through the bridge)."""
    from streamckpt.bridge import default_bridge

    return default_bridge.run(fn, *args, **kwargs)


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
    """Blocking :func:`streamckpt.api.load`.

    Every tensor (or those in ``names``), each verified by its crc32c. A local checkpoint
    whose tensors are stored whole is read without an event loop (no ``progress``, ``stats``
    or ``max_inflight_bytes`` asked).
    """
    plain = progress is None and stats is None and max_inflight_bytes is None
    path = local_path(prefix, filesystem) if plain else None
    if path is not None:
        # its own module: a cold process reading one tensor does not import it
        from streamckpt.pipeline.local_load import load_whole

        wanted = None if names is None else list(names)
        loaded = load_whole(path, wanted)
        if loaded is not None:
            return loaded
        names = wanted
    value = _twin("load")(
        prefix,
        names=names,
        storage_options=storage_options,
        filesystem=filesystem,
        max_inflight_bytes=max_inflight_bytes,
        progress=progress,
        stats=stats,
    )
    return cast("dict[str, np.ndarray[Any, Any]]", value)


def read_tensor(
    prefix: PathLike,
    name: str | bytes,
    *,
    index: Any = None,
    storage_options: dict[str, Any] | None = None,
    filesystem: Any = None,
    stats: dict[str, float] | None = None,
) -> np.ndarray[Any, Any]:
    """Blocking :func:`streamckpt.api.read_tensor`.

    One tensor, fetching only the index pieces and byte ranges it needs. A whole tensor of a
    local checkpoint is read without an event loop (no ``index``, no ``stats`` asked).
    """
    path = local_path(prefix, filesystem) if index is None and stats is None else None
    if path is not None:
        value = read_whole(path, name)
        if value is not None:
            return value
    value = _twin("read_tensor")(
        prefix,
        name,
        index=index,
        storage_options=storage_options,
        filesystem=filesystem,
        stats=stats,
    )
    return cast("np.ndarray[Any, Any]", value)


def list_tensors(
    prefix: PathLike,
    *,
    storage_options: dict[str, Any] | None = None,
    filesystem: Any = None,
) -> dict[str, TensorInfo]:
    """Blocking :func:`streamckpt.api.list_tensors`.

    What the index says of every tensor, reading no data; a local checkpoint's index is read
    without an event loop.
    """
    path = local_path(prefix, filesystem)
    if path is not None:
        return list_local_tensors(path)
    infos = _twin("list_tensors")(prefix, storage_options=storage_options, filesystem=filesystem)
    return cast("dict[str, TensorInfo]", infos)


def _twin(name: str) -> Any:
    """The blocking twin of ``streamckpt.api.<name>`` (made on first use)."""
    from streamckpt import api
    from streamckpt.bridge import blocking

    return blocking(getattr(api, name))


def _from_api(name: str) -> Callable[[], Any]:
    return lambda: _twin(name)


def _checkpoint() -> Any:
    from streamckpt.checkpoint import SyncCheckpoint

    return SyncCheckpoint


def _checkpoint_manager() -> Any:
    from streamckpt.manager import SyncCheckpointManager

    return SyncCheckpointManager


def _latest_checkpoint_twin() -> Any:
    from streamckpt.bridge import blocking
    from streamckpt.manager import latest_checkpoint

    return blocking(latest_checkpoint)


def _load_nested_twin() -> Any:
    from streamckpt.bridge import blocking
    from streamckpt.checkpoint import load_nested

    return blocking(load_nested)


def _copy_checkpoint_twin() -> Any:
    from streamckpt.bridge import blocking
    from streamckpt.pipeline.bytewise import copy_checkpoint

    return blocking(copy_checkpoint)


def _verify_checkpoint_twin() -> Any:
    from streamckpt.bridge import blocking
    from streamckpt.pipeline.bytewise import verify_checkpoint

    return blocking(verify_checkpoint)


def _open_twin() -> Any:
    from streamckpt.sync_reader import blocking_open

    return blocking_open


def _reader_class() -> Any:
    from streamckpt.sync_reader import SyncCheckpointReader

    return SyncCheckpointReader


# Everything but the local shortcuts loads on first use: a script that only reads local
# tensors starts without the bridge, anyio, the async pipeline or the high level (issue 15.1,
# pinned by test_cold_start).
_LAZY: dict[str, Callable[[], Any]] = {
    "save": _from_api("save"),
    "open": _open_twin,
    "SyncCheckpointReader": _reader_class,
    "Checkpoint": _checkpoint,
    "CheckpointManager": _checkpoint_manager,
    "latest_checkpoint": _latest_checkpoint_twin,
    "load_nested": _load_nested_twin,
    "copy_checkpoint": _copy_checkpoint_twin,
    "verify_checkpoint": _verify_checkpoint_twin,
}


def __getattr__(name: str) -> Any:
    make = _LAZY.get(name)
    if make is None:
        raise AttributeError(f"module 'streamckpt.sync' has no attribute {name!r}")
    value = make()
    globals()[name] = value
    return value
