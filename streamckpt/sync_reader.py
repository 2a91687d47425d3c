"""The blocking face of an open checkpoint: :func:`streamckpt.sync.open` and its reader.

Its own module so that :mod:`streamckpt.sync` loads the bridge, anyio and the async reader
only when a caller opens a checkpoint (a script that reads one local tensor never does).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import anyio.from_thread

from streamckpt import api
from streamckpt.bridge import BlockingTwin, blocking_method, default_bridge
from streamckpt.pipeline.info import TensorInfo
from streamckpt.pipeline.read import CheckpointReader

if TYPE_CHECKING:
    from streamckpt.format.bundle import BundleHeader
    from streamckpt.storage import Store

P = ParamSpec("P")
T = TypeVar("T")


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


blocking_open = _blocking_open(api.open)
