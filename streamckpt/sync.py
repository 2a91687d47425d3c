"""Blocking versions of the public API, for scripts and training loops.

Rule: every blocking function and class here is the twin of an async one, made from its
definition (:func:`streamckpt.bridge.blocking`, :func:`streamckpt.bridge.blocking_method`) or,
where it adds ``blocking=``, checked against it by a test of every signature. Calls run
through the one bridge (:mod:`streamckpt.bridge`): in the calling thread when it runs no event
loop, else on the bridge's loop thread; an open checkpoint keeps that thread while it is open.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import anyio.from_thread

from streamckpt import api
from streamckpt.bridge import BlockingTwin, blocking, blocking_method, default_bridge
from streamckpt.pipeline.read import CheckpointReader, TensorInfo

if TYPE_CHECKING:
    from streamckpt.checkpoint import SyncCheckpoint as Checkpoint
    from streamckpt.format.bundle import BundleHeader
    from streamckpt.manager import SyncCheckpointManager as CheckpointManager
    from streamckpt.storage import Store

__all__ = [
    "Checkpoint",
    "CheckpointManager",
    "SyncCheckpointReader",
    "copy_checkpoint",
    "latest_checkpoint",
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
    return default_bridge.run(fn, *args, **kwargs)


save = blocking(api.save)
load = blocking(api.load)
read_tensor = blocking(api.read_tensor)

if TYPE_CHECKING:
    from streamckpt.checkpoint import load_nested as _load_nested
    from streamckpt.manager import latest_checkpoint as _latest_checkpoint
    from streamckpt.pipeline import bytewise

    latest_checkpoint = blocking(_latest_checkpoint)
    load_nested = blocking(_load_nested)
    copy_checkpoint = blocking(bytewise.copy_checkpoint)
    verify_checkpoint = blocking(bytewise.verify_checkpoint)


def _checkpoint() -> Any:
    from streamckpt.checkpoint import SyncCheckpoint

    return SyncCheckpoint


def _checkpoint_manager() -> Any:
    from streamckpt.manager import SyncCheckpointManager

    return SyncCheckpointManager


def _latest_checkpoint_twin() -> Any:
    from streamckpt.manager import latest_checkpoint

    return blocking(latest_checkpoint)


def _load_nested_twin() -> Any:
    from streamckpt.checkpoint import load_nested

    return blocking(load_nested)


def _copy_checkpoint_twin() -> Any:
    from streamckpt.pipeline.bytewise import copy_checkpoint

    return blocking(copy_checkpoint)


def _verify_checkpoint_twin() -> Any:
    from streamckpt.pipeline.bytewise import verify_checkpoint

    return blocking(verify_checkpoint)


# The high level (checkpoint, manager) and the bytewise tools load on first use: a script
# that only reads tensors starts without them (issue 15.1, pinned by test_cold_start).
_LAZY: dict[str, Callable[[], Any]] = {
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


class SyncCheckpointReader(BlockingTwin):
    """An open checkpoint for sync code: :class:`CheckpointReader`'s blocking twin.

    Its coroutines run on the bridge's loop thread, which the ``with`` block of :func:`open`
    holds, so the reader's connections stay on one loop for its whole life.
    """

    __slots__ = ("_portal", "_reader")

    def __init__(self, portal: anyio.from_thread.BlockingPortal, reader: CheckpointReader):
        self._portal = portal
        self._reader = reader

    def _twin_target(self) -> CheckpointReader:
        return self._reader

    def _twin_run(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        return self._portal.call(functools.partial(fn, *args, **kwargs))

    @property
    def uri(self) -> str:
        return self._reader.uri

    @property
    def index_uri(self) -> str:
        return self._reader.index_uri

    @property
    def prefix_path(self) -> str:
        return self._reader.prefix_path

    @property
    def store(self) -> Store:
        return self._reader.store

    @property
    def entries(self) -> dict[str, TensorInfo]:
        return self._reader.entries

    @property
    def header(self) -> BundleHeader:
        return self._reader.header

    @property
    def stats(self) -> dict[str, float]:
        return self._reader.stats

    @functools.wraps(CheckpointReader.shard_path)
    def shard_path(self, shard_id: int) -> str:
        return self._reader.shard_path(shard_id)

    read_header = blocking_method(CheckpointReader.read_header)
    load_index = blocking_method(CheckpointReader.load_index)
    entry = blocking_method(CheckpointReader.entry)
    info = blocking_method(CheckpointReader.info)
    read = blocking_method(CheckpointReader.read)
    read_many = blocking_method(CheckpointReader.read_many)
    read_boxes = blocking_method(CheckpointReader.read_boxes)


def _blocking_open(
    fn: Callable[P, contextlib.AbstractAsyncContextManager[CheckpointReader]],
) -> Callable[P, contextlib.AbstractContextManager[SyncCheckpointReader]]:
    """The ``with`` twin of :func:`streamckpt.open`: same parameters."""

    @contextlib.contextmanager
    def twin(*args: P.args, **kwargs: P.kwargs) -> Iterator[SyncCheckpointReader]:
        with (
            default_bridge.lease() as portal,
            portal.wrap_async_context_manager(fn(*args, **kwargs)) as reader,
        ):
            yield SyncCheckpointReader(portal, reader)

    functools.update_wrapper(twin, fn)
    twin.__doc__ = f"Blocking :func:`streamckpt.open`, as a ``with`` block.\n\n{fn.__doc__}"
    return twin


open = _blocking_open(api.open)
