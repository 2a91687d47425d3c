"""Object-based checkpoints (``tf.train.Checkpoint`` for Python trees) and saves that do not stall.

``Checkpoint(model=..., optimizer=..., step=...)`` names every leaf the way TensorFlow names the
variables of the same tree of ``tf.Module``s (see :mod:`streamckpt.objectgraph`), so TensorFlow
restores what it writes and it restores what TensorFlow writes.

Invariants:

* **Restore matches objects, not strings.** Like TensorFlow, restore walks the checkpoint's
  object graph and the Python tree together from the root, pairing children by local name. A
  value therefore reaches its object even when the checkpoint keyed it through another path
  (Keras keys model weights through the optimizer).
* **Restore is all or nothing.** Every shape, dtype and writability problem is found from the
  index before any data is read, and reported in one error; then nothing is written. TensorFlow
  raises at the first bad variable and leaves the others half restored.
* **A background save owns its bytes.** ``save_async`` returns only after every leaf has been
  copied once into a host buffer owned by the checkpoint; the caller may then change its arrays.
  The buffer is reused by the next save, which therefore waits for the previous one (or, with
  ``on_busy="raise"``, refuses to start).
* **No orphan thread.** The background event loop lives in one daemon thread per checkpoint,
  started on first use. ``close()`` (or leaving a ``with`` block) waits for the save in flight,
  stops the loop and joins the thread; at interpreter exit an ``atexit`` hook does the same for
  every loop still running and logs which saves it waits for.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import logging
import os
import sys
import threading
import weakref
from collections.abc import Awaitable, Callable, Generator, Iterable, Mapping, Sequence
from typing import Any, Literal, TypeVar, overload

import anyio
import anyio.from_thread
import anyio.to_thread
import numpy as np

from streamckpt import api
from streamckpt.errors import (
    CorruptCheckpointError,
    NamingError,
    ObjectMatchError,
    SaveInProgressError,
    StreamCkptError,
    UnsupportedError,
    ValueMismatchError,
)
from streamckpt.format.dtypes import DataType, from_numpy
from streamckpt.naming import (
    _Child,
    _is_skipped_value,
    _prepare_write,
    _replace,
    _Rules,
    is_leaf,
    to_numpy,
)
from streamckpt.objectgraph import (
    OBJECT_GRAPH_KEY,
    SAVE_COUNTER,
    VARIABLE_VALUE,
    TreeNode,
    build_object_graph,
    checkpoint_key,
    keys_to_nested,
    parse_object_graph,
    tree_nodes,
)
from streamckpt.pipeline.read import CheckpointReader, TensorInfo
from streamckpt.pipeline.save import SaveInfo
from streamckpt.proto.trackable_object_graph_pb2 import TrackableObjectGraph
from streamckpt.storage import PathLike
from streamckpt.storage.base import fresh_buffer

__all__ = [
    "Checkpoint",
    "OnBusy",
    "RestoreStatus",
    "SaveHandle",
    "SyncCheckpoint",
    "load_nested",
]

logger = logging.getLogger(__name__)

OnBusy = Literal["wait", "raise"]
T = TypeVar("T")

# Each snapshot tensor starts on a cache line, so views of the buffer are aligned for any dtype.
_ALIGNMENT = 64
_RULES = _Rules("/", frozenset())


# ---------------------------------------------------------------------------------------------
# Errors.


def _listing(count_label: str, names: Sequence[str]) -> str:
    return f"{len(names)} {count_label}: {', '.join(repr(n) for n in names)}"


# ---------------------------------------------------------------------------------------------
# Waiting on a concurrent future from async code without holding a thread.


def _resolve_waiter(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def _future_done(future: concurrent.futures.Future[Any]) -> None:
    """Return once ``future`` is done; cancelling the caller leaves ``future`` running."""
    if future.done():
        return
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # another backend (trio): park a worker thread instead
        await anyio.to_thread.run_sync(concurrent.futures.wait, [future], abandon_on_cancel=True)
        return
    waiter: asyncio.Future[None] = loop.create_future()

    def wake(_: concurrent.futures.Future[Any]) -> None:
        with contextlib.suppress(RuntimeError):  # the waiting loop has closed meanwhile
            loop.call_soon_threadsafe(_resolve_waiter, waiter)

    future.add_done_callback(wake)
    await waiter


# ---------------------------------------------------------------------------------------------
# The background event loop.


class _BackgroundLoop:
    """An event loop in a daemon thread, reached through an anyio blocking portal.

    The thread is a daemon so that interpreter exit does not hang on an idle loop; the
    ``atexit`` hook below is what makes exit wait for saves in flight. With ``nice`` (Linux,
    where niceness is per thread and inherited by the threads a thread starts) the loop and its
    worker threads run at that niceness, so that they yield the CPU to the training step.
    """

    def __init__(self, nice: int | None = None) -> None:
        self._nice = nice
        self._lock = threading.Lock()
        self._portal: anyio.from_thread.BlockingPortal | None = None
        self._thread: threading.Thread | None = None
        self._pending: dict[concurrent.futures.Future[Any], str] = {}

    def _ensure_started(self) -> anyio.from_thread.BlockingPortal:
        with self._lock:
            if self._portal is None:
                ready: concurrent.futures.Future[anyio.from_thread.BlockingPortal] = (
                    concurrent.futures.Future()
                )

                async def serve() -> None:
                    if self._nice is not None and sys.platform.startswith("linux"):
                        os.setpriority(os.PRIO_PROCESS, 0, self._nice)  # this thread only
                    async with anyio.from_thread.BlockingPortal() as portal:
                        ready.set_result(portal)
                        await portal.sleep_until_stopped()

                def main() -> None:
                    try:
                        anyio.run(serve)
                    except BaseException as exc:
                        if not ready.done():
                            ready.set_exception(exc)
                        raise
                    finally:
                        self._finished(threading.current_thread())

                thread = threading.Thread(target=main, name="streamckpt-checkpoint", daemon=True)
                thread.start()
                self._portal, self._thread = ready.result(), thread
                _register(self)
            return self._portal

    def _finished(self, thread: threading.Thread) -> None:
        """The loop's thread is ending: forget the loop unless a newer thread runs it."""
        with self._lock:
            if self._thread in (None, thread):
                _unregister(self)

    def submit(
        self, fn: Callable[..., Awaitable[T]], *args: Any, label: str
    ) -> concurrent.futures.Future[T]:
        """Start ``fn(*args)`` on the loop; ``label`` names it in the exit-time report."""
        future = self._ensure_started().start_task_soon(fn, *args)
        with self._lock:
            self._pending[future] = label
        future.add_done_callback(self._forget)
        return future

    def _forget(self, future: concurrent.futures.Future[Any]) -> None:
        with self._lock:
            self._pending.pop(future, None)

    def pending(self) -> list[str]:
        with self._lock:
            return list(self._pending.values())

    def close(self) -> None:
        """Wait for every task in flight, then stop the loop and join its thread."""
        with self._lock:
            portal, thread = self._portal, self._thread
            self._portal = self._thread = None
        if portal is not None:
            with contextlib.suppress(RuntimeError):  # already stopping (stop_soon)
                portal.call(portal.stop)
        if thread is not None:
            thread.join()  # its last act unregistered the loop

    def stop_soon(self) -> None:
        """Ask the loop to stop once its tasks are done, without waiting (garbage collection)."""
        with self._lock:
            portal = self._portal
        if portal is not None:
            with contextlib.suppress(RuntimeError):  # stopped, or called from the loop itself
                portal.start_task_soon(portal.stop)


_live_loops: set[_BackgroundLoop] = set()
_live_lock = threading.Lock()
_atexit_registered = False


def _register(loop: _BackgroundLoop) -> None:
    global _atexit_registered
    with _live_lock:
        _live_loops.add(loop)
        if not _atexit_registered:
            atexit.register(_close_loops_at_exit)
            _atexit_registered = True


def _unregister(loop: _BackgroundLoop) -> None:
    with _live_lock:
        _live_loops.discard(loop)


def _close_loops_at_exit() -> None:
    """Let every background save finish before the interpreter goes; say so on stderr."""
    with _live_lock:
        loops = list(_live_loops)
    for loop in loops:
        pending = loop.pending()
        if pending:
            logger.warning(
                "streamckpt: waiting at exit for %d checkpoint save(s) in flight: %s",
                len(pending),
                ", ".join(pending),
            )
        loop.close()


def _run_here(fn: Callable[[], Awaitable[T]]) -> T:
    """Run ``fn()`` to completion from sync code in this thread: :func:`streamckpt.sync.run`."""
    from streamckpt.sync import run  # (streamckpt.sync imports this module)

    return run(fn)


# ---------------------------------------------------------------------------------------------
# Background saves.


class SaveHandle:
    """A save running in the background; ``result()`` or ``await handle`` waits for it.

    Waiting re-raises whatever made the save fail. A failure is also logged when it happens,
    so that a save nobody waits for does not fail silently.
    """

    __slots__ = ("_future", "path")

    def __init__(self, path: str, future: concurrent.futures.Future[SaveInfo]) -> None:
        self.path = path
        self._future = future
        future.add_done_callback(self._log_failure)

    def _log_failure(self, future: concurrent.futures.Future[SaveInfo]) -> None:
        if not future.cancelled() and future.exception() is not None:
            logger.error(
                "background checkpoint save to %s failed: %r", self.path, future.exception()
            )

    def done(self) -> bool:
        """Whether the save has finished, successfully or not."""
        return self._future.done()

    def result(self, timeout: float | None = None) -> str:
        """Block until the save is committed and return its path (TimeoutError on timeout)."""
        self._future.result(timeout)
        return self.path

    def info(self) -> SaveInfo:
        """What the finished save wrote and how long it took; blocks until it has finished."""
        return self._future.result()

    async def wait(self) -> str:
        """Wait without blocking the event loop; cancelling the waiter does not stop the save."""
        await _future_done(self._future)
        return self.result()

    def __await__(self) -> Generator[Any, None, str]:
        return self.wait().__await__()

    def __repr__(self) -> str:
        state = "done" if self.done() else "running"
        return f"<SaveHandle {self.path!r} {state}>"


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGNMENT) * _ALIGNMENT


def _string_snapshot(key: str, array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """An object array of ``bytes``: elements checked now and detached from mutable buffers."""
    copy = np.empty(array.shape, dtype=object)
    flat = copy.reshape(-1)
    for index, element in enumerate(array.reshape(-1)):
        if isinstance(element, str):
            flat[index] = element.encode()
        elif isinstance(element, bytes | bytearray | memoryview | np.bytes_):
            flat[index] = bytes(element)
        else:
            raise UnsupportedError(
                f"cannot save {type(element).__name__} as a string element", tensor=key
            )
    return copy


def _snapshot(
    values: Mapping[str, Any], buffer: np.ndarray[Any, Any] | None
) -> tuple[dict[str, np.ndarray[Any, Any]], np.ndarray[Any, Any] | None]:
    """Copy every leaf once into ``buffer`` (grown if too small); return views and the buffer.

    Reusing one buffer makes later snapshots plain memory copies, without the page faults of
    fresh memory. Object arrays (strings) are converted to ``bytes`` elements on their own.
    """
    layout: list[tuple[str, np.ndarray[Any, Any], np.dtype[Any], int]] = []
    snapshot: dict[str, np.ndarray[Any, Any]] = {}
    total = 0
    for key, leaf in values.items():
        array = to_numpy(leaf)
        try:
            from_numpy(array.dtype)
        except StreamCkptError as exc:
            raise exc.with_context(tensor=key) from None
        if array.dtype.hasobject:
            snapshot[key] = _string_snapshot(key, array)
            continue
        target = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
        layout.append((key, array, target, total))
        total += _aligned(array.nbytes)
    if buffer is None or buffer.nbytes < total:
        buffer = np.frombuffer(fresh_buffer(max(total, 1)), np.uint8)
    for key, array, target, offset in layout:
        view = buffer[offset : offset + array.nbytes].view(target).reshape(array.shape)
        np.copyto(view, array, casting="equiv")
        snapshot[key] = view
    return snapshot, buffer


# ---------------------------------------------------------------------------------------------
# Matching a Python tree with a checkpoint's object graph.


class _Counter:
    """Stands for ``save_counter`` in the Python tree during a restore."""


_COUNTER = _Counter()


def _python_graph(root: dict[str, Any], *, with_counter: bool) -> list[TreeNode]:
    """The Python tree as the graph a save of it would write (``save_counter`` stood for)."""
    top = [_Child(name, root[name], "item", name) for name in sorted(root)]
    top = [child for child in top if not _is_skipped_value(child.value)]
    if with_counter:
        top.append(_Child(SAVE_COUNTER, _COUNTER, "fixed", None))
    return tree_nodes(
        root, top, leaf=lambda value: value is _COUNTER or is_leaf(value), with_sites=True
    )


@dataclasses.dataclass(frozen=True, slots=True)
class _Match:
    """Which Python leaf takes which checkpoint key, and what is left over on either side."""

    bound: tuple[tuple[TreeNode, str], ...]
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]


def _match(nodes: Sequence[TreeNode], graph: TrackableObjectGraph) -> _Match:
    """Pair Python objects with checkpoint nodes from the root down, by local name.

    This is TensorFlow's matching: an object is found through any path the checkpoint records,
    the first pairing of an object or a node wins, and only leaves (variables) count as
    missing. Unexpected are the attributes of checkpoint nodes no leaf took, slot variables
    and orphans among them.
    """
    children_by_node = []
    for proto in graph.nodes:
        by_name: dict[str, int] = {}
        for ref in proto.children:
            by_name.setdefault(ref.local_name, ref.node_id)
        children_by_node.append(by_name)
    node_of: dict[int, int] = {0: 0}
    taken = {0}
    queue = collections.deque([0])
    while queue:
        py_id = queue.popleft()
        for local_name, child_id in nodes[py_id].children:
            ckpt_id = children_by_node[node_of[py_id]].get(local_name)
            if child_id in node_of or ckpt_id is None or ckpt_id in taken:
                continue
            node_of[child_id] = ckpt_id
            taken.add(ckpt_id)
            queue.append(child_id)

    bound: list[tuple[TreeNode, str]] = []
    missing: list[str] = []
    used: set[tuple[int, str]] = set()
    for py_id, node in enumerate(nodes):
        if not node.is_leaf:
            continue
        ckpt_id = node_of.get(py_id)
        attrs = graph.nodes[ckpt_id].attributes if ckpt_id is not None else ()
        attr = next((a for a in attrs if a.name == VARIABLE_VALUE), None)
        if attr is None or ckpt_id is None:
            missing.append(checkpoint_key(node.path))
        else:
            bound.append((node, attr.checkpoint_key))
            used.add((ckpt_id, attr.checkpoint_key))
    unexpected = [
        attr.checkpoint_key
        for ckpt_id, proto in enumerate(graph.nodes)
        for attr in proto.attributes
        if (ckpt_id, attr.checkpoint_key) not in used
    ]
    return _Match(tuple(bound), tuple(missing), tuple(unexpected))


def _leaf_problem(node: TreeNode, info: TensorInfo) -> str | None:
    """Why the stored value cannot go into this leaf, or None if it can."""
    if node.value is _COUNTER:
        if info.shape != () or info.dtype.kind not in "iu":
            return f"save_counter must be an integer scalar, found {info.dtype}{list(info.shape)}"
        return None
    target = to_numpy(node.value)
    if tuple(target.shape) != info.shape:
        return f"shape {list(info.shape)} in the checkpoint, {list(target.shape)} in the tree"
    strings = (info.dtype.kind == "O", target.dtype.kind == "O")
    if strings[0] != strings[1] or not np.can_cast(info.dtype, target.dtype, casting="safe"):
        return f"dtype {info.dtype} in the checkpoint does not cast safely to {target.dtype}"
    in_place = isinstance(node.value, np.ndarray) and node.value.flags.writeable
    fixed = [site for site in node.sites if site.child is None or site.child.slot_kind == "fixed"]
    if not in_place and fixed:
        return (
            f"the leaf is not a writable numpy array and sits in an immutable "
            f"{type(fixed[0].container).__name__}"
        )
    return None


def _write_leaf(node: TreeNode, value: np.ndarray[Any, Any]) -> None:
    writes = [(site, _prepare_write(site, value, _RULES)) for site in node.sites]
    for site, (in_place, prepared) in writes:
        if in_place:
            site.leaf[...] = prepared
            return  # one object, filled once, whichever path reached it
        _replace(site, prepared)


class RestoreStatus:
    """What a restore matched, with ``tf.train.Checkpoint``'s assertions over it.

    ``restored`` are the checkpoint keys written into the tree, ``missing`` the keys the
    tree's leaves would be saved under that the checkpoint lacks, ``unexpected`` the checkpoint
    keys nothing took. As in TensorFlow, a status dropped with unexpected values and without
    :meth:`expect_partial` logs them as a warning.
    """

    def __init__(
        self,
        uri: str,
        restored: Sequence[str],
        missing: Sequence[str],
        unexpected: Sequence[str],
    ) -> None:
        self.uri = uri
        self.restored = tuple(restored)
        self.missing = tuple(missing)
        self.unexpected = tuple(unexpected)
        self._quiet = [False]  # shared with the finalizer, which must not hold self
        if self.unexpected:
            weakref.finalize(self, _warn_unused, uri, self.unexpected, self._quiet)

    def _fail(self, missing: Sequence[str], unexpected: Sequence[str]) -> None:
        parts = []
        if missing:
            parts.append(_listing("Python values got no value from the checkpoint", missing))
        if unexpected:
            parts.append(_listing("checkpoint values were not used", unexpected))
        error = ObjectMatchError(
            "the checkpoint and the objects do not match: " + "; ".join(parts),
            missing=missing,
            unexpected=unexpected,
        )
        raise error.with_context(uri=self.uri)

    def assert_consumed(self) -> RestoreStatus:
        """Every Python leaf got a value and every value in the checkpoint was used."""
        if self.missing or self.unexpected:
            self._fail(self.missing, self.unexpected)
        return self

    def assert_existing_objects_matched(self) -> RestoreStatus:
        """Every Python leaf got a value; values the tree has no place for are fine."""
        if self.missing:
            self._fail(self.missing, ())
        return self

    def assert_nontrivial_match(self) -> RestoreStatus:
        """At least one value was restored (``save_counter`` counts, as in TensorFlow)."""
        if not self.restored:
            self._fail(self.missing, self.unexpected)
        return self

    def expect_partial(self) -> RestoreStatus:
        """Silence the warning about unused checkpoint values."""
        self._quiet[0] = True
        return self

    def __repr__(self) -> str:
        return (
            f"<RestoreStatus {self.uri!r}: {len(self.restored)} restored, "
            f"{len(self.missing)} missing, {len(self.unexpected)} unexpected>"
        )


def _warn_unused(uri: str, unexpected: tuple[str, ...], quiet: list[bool]) -> None:
    if not quiet[0]:
        logger.warning(
            "restore of %s left %d checkpoint value(s) unused (call expect_partial() on the "
            "status to silence this): %s",
            uri,
            len(unexpected),
            ", ".join(unexpected),
        )


async def _read_object_graph(reader: CheckpointReader) -> bytes:
    info = reader.entries.get(OBJECT_GRAPH_KEY)
    if info is None:
        raise UnsupportedError(
            f"no {OBJECT_GRAPH_KEY} in the checkpoint: it is name-based (TF1 Saver); read it "
            "with streamckpt.load",
            uri=reader.uri,
        )
    if info.tf_dtype != DataType.DT_STRING or info.shape != ():
        raise CorruptCheckpointError(
            "the object graph is not a string scalar", uri=reader.uri, tensor=OBJECT_GRAPH_KEY
        )
    stored = (await reader.read(OBJECT_GRAPH_KEY))[()]
    return bytes(stored)


def _check_keys_present(reader: CheckpointReader, keys: Iterable[str]) -> None:
    absent = [key for key in keys if key not in reader.entries]
    if absent:
        raise CorruptCheckpointError(
            "the object graph names keys the bundle lacks: " + ", ".join(map(repr, absent)),
            uri=reader.uri,
        )


async def load_nested(
    save_path: PathLike,
    *,
    storage_options: dict[str, Any] | None = None,
    filesystem: Any = None,
) -> dict[str, Any]:
    """Every value of an object-based checkpoint, as nested dicts keyed by object path.

    No Python objects are needed: this reads any ``tf.train.Checkpoint`` (Keras models and
    optimizers included). Optimizer slots sit under
    ``<optimizer>[".OPTIMIZER_SLOT"][<variable path>][<slot name>]``; see
    :func:`streamckpt.objectgraph.keys_to_nested` for the layout.
    """
    async with api.open(
        save_path, storage_options=storage_options, filesystem=filesystem
    ) as reader:
        graph = parse_object_graph(await _read_object_graph(reader))
        keys = sorted(graph.checkpoint_keys)
        _check_keys_present(reader, keys)
        values = await reader.read_many(keys)
    return keys_to_nested(graph, values)


# ---------------------------------------------------------------------------------------------
# The checkpoint.


@functools.cache
def _reserved_names() -> frozenset[str]:
    public = {n for cls in (Checkpoint, SyncCheckpoint) for n in dir(cls) if not n.startswith("_")}
    return frozenset({SAVE_COUNTER, "on_busy", "background_nice", *public})


class Checkpoint:
    """``tf.train.Checkpoint`` for nested Python trees of arrays.

    Children are nested dicts, lists, tuples, namedtuples, dataclasses and plain objects whose
    leaves are numpy arrays and scalars, Python numbers and strings, or anything with
    ``__array__`` or DLPack (torch, jax). They are read and set as attributes
    (``ckpt.model``); new ones can be added that way too. ``save_counter`` and the names of
    this class's methods are reserved. ``on_busy`` sets what a background save does while
    another one is in flight: ``"wait"`` for it, or ``"raise"`` :class:`SaveInProgressError`.
    ``background_nice`` (0 to 19; Linux only, ignored elsewhere) lowers the CPU priority of the
    background save's threads. The default, normal priority, is usually best: a save competing
    as an equal takes its few tenths of a CPU-second per GiB and is durable soon. At 19, on a
    machine whose cores the training step keeps busy, a save only gets the step's idle moments
    and may not finish before the next one, which then waits for it. Storage clients with
    threads of their own, such as gcsfs's, are not affected.

    Differences from TensorFlow: saving onto an existing checkpoint raises
    ``CheckpointExistsError`` unless ``overwrite=True`` (TensorFlow overwrites), no
    ``checkpoint`` state file is written (that is the manager's job), and restore checks
    every value before writing any (see :meth:`restore`).
    """

    def __init__(
        self, *, on_busy: OnBusy = "wait", background_nice: int | None = None, **children: Any
    ) -> None:
        if not isinstance(on_busy, str) or on_busy not in ("wait", "raise"):
            raise ValueError(f"on_busy must be 'wait' or 'raise', not {on_busy!r}")
        if background_nice is not None and not 0 <= background_nice <= 19:
            raise ValueError(f"background_nice must be in 0..19, not {background_nice!r}")
        reserved = _reserved_names()
        for name in children:
            if name in reserved:
                raise NamingError(f"{name!r} is reserved by Checkpoint and cannot be a child")
        object.__setattr__(self, "_children", dict(children))
        self._on_busy: OnBusy = on_busy
        self._save_counter = 0
        self._loop = _BackgroundLoop(background_nice)
        self._start_lock = threading.Lock()
        self._in_flight: SaveHandle | None = None
        self._buffer: np.ndarray[Any, Any] | None = None
        # A checkpoint dropped without close() still stops its loop, once its saves are done.
        weakref.finalize(self, self._loop.stop_soon).atexit = False

    # -- children as attributes ---------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        children = self.__dict__.get("_children", {})
        if name in children:
            return children[name]
        raise AttributeError(f"{type(self).__name__} has no child or attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        elif name in _reserved_names():
            raise AttributeError(f"{name!r} is reserved by Checkpoint")
        else:
            self._children[name] = value

    def __delattr__(self, name: str) -> None:
        if name in self._children:
            del self._children[name]
        else:
            object.__delattr__(self, name)

    @property
    def save_counter(self) -> int:
        """How many times :meth:`save` numbered a checkpoint; restored with the checkpoint."""
        return self._save_counter

    # -- saving -------------------------------------------------------------------------

    def _tensors(self, counter: int | None) -> dict[str, Any]:
        values, graph = build_object_graph(self._children, save_counter=counter)
        return {**values, OBJECT_GRAPH_KEY: graph}

    async def save(
        self,
        file_prefix: PathLike,
        *,
        num_shards: int | None = None,
        overwrite: bool = False,
        storage_options: dict[str, Any] | None = None,
        filesystem: Any = None,
    ) -> str:
        """Write ``<file_prefix>-<N>`` with ``save_counter`` N, counted up first; return it.

        The leaves are streamed from where they are, so they must not change until this
        returns; :meth:`save_async` snapshots them instead.
        """
        number = self._save_counter + 1
        tensors = self._tensors(number)
        self._save_counter = number
        path = f"{os.fspath(file_prefix)}-{number}"
        await api.save(
            path,
            tensors,
            num_shards=num_shards,
            overwrite=overwrite,
            storage_options=storage_options,
            filesystem=filesystem,
        )
        return path

    async def write(
        self,
        file_prefix: PathLike,
        *,
        num_shards: int | None = None,
        overwrite: bool = False,
        storage_options: dict[str, Any] | None = None,
        filesystem: Any = None,
    ) -> str:
        """Write exactly ``file_prefix``, without ``save_counter``; return it."""
        path = os.fspath(file_prefix)
        await api.save(
            path,
            self._tensors(None),
            num_shards=num_shards,
            overwrite=overwrite,
            storage_options=storage_options,
            filesystem=filesystem,
        )
        return path

    def save_async(
        self,
        file_prefix: PathLike,
        *,
        num_shards: int | None = None,
        overwrite: bool = False,
        storage_options: dict[str, Any] | None = None,
        filesystem: Any = None,
        on_busy: OnBusy | None = None,
    ) -> SaveHandle:
        """Snapshot the leaves, then :meth:`save` in the background; return a handle at once.

        Returns when every leaf has been copied to host memory, so the caller may change its
        arrays right away. The copy goes into a buffer the checkpoint keeps for the next save
        (host memory the size of all leaves, until :meth:`close`): fresh memory would cost
        page faults that make the copy several times slower.

        A plain function, callable from sync and async code alike. While a previous
        background save runs, it first waits for it (blocking, in async code too: ``await``
        the previous handle to avoid that) or raises :class:`SaveInProgressError`, as
        ``on_busy`` (default: the checkpoint's) says.
        """
        return self._start(
            file_prefix,
            counted=True,
            num_shards=num_shards,
            overwrite=overwrite,
            storage_options=storage_options,
            filesystem=filesystem,
            on_busy=on_busy,
        )

    def write_async(
        self,
        file_prefix: PathLike,
        *,
        num_shards: int | None = None,
        overwrite: bool = False,
        storage_options: dict[str, Any] | None = None,
        filesystem: Any = None,
        on_busy: OnBusy | None = None,
    ) -> SaveHandle:
        """:meth:`write` in the background, with :meth:`save_async`'s snapshot and policy."""
        return self._start(
            file_prefix,
            counted=False,
            num_shards=num_shards,
            overwrite=overwrite,
            storage_options=storage_options,
            filesystem=filesystem,
            on_busy=on_busy,
        )

    def _start(
        self,
        file_prefix: PathLike,
        *,
        counted: bool,
        num_shards: int | None,
        overwrite: bool,
        storage_options: dict[str, Any] | None,
        filesystem: Any,
        on_busy: OnBusy | None,
        before: Callable[[], Awaitable[None]] | None = None,
        then: Callable[[], Awaitable[None]] | None = None,
    ) -> SaveHandle:
        """Snapshot now; on the background loop run ``before()``, the save, then ``then()``."""
        with self._start_lock:
            self._wait_for_previous(on_busy)
            number = self._save_counter + 1 if counted else None
            snapshot, self._buffer = _snapshot(self._tensors(number), self._buffer)
            base = os.fspath(file_prefix)
            path = base if number is None else f"{base}-{number}"
            save = functools.partial(
                api.save,
                num_shards=num_shards,
                overwrite=overwrite,
                storage_options=storage_options,
                filesystem=filesystem,
            )

            async def job() -> SaveInfo:
                if before is not None:
                    await before()
                info = await save(path, snapshot)
                if then is not None:
                    await then()
                return info

            future = self._loop.submit(job, label=path)
            if number is not None:
                self._save_counter = number
            handle = SaveHandle(path, future)
            self._in_flight = handle
        return handle

    def _wait_for_previous(self, on_busy: OnBusy | None) -> None:
        """Under ``_start_lock``: wait for the background save in flight, or raise."""
        previous = self._in_flight
        if previous is not None and not previous.done():
            if (on_busy or self._on_busy) == "raise":
                raise SaveInProgressError(
                    f"a background save to {previous.path!r} is still running"
                )
            concurrent.futures.wait([previous._future])  # its errors are its own

    def _in_caller(self, save: Callable[[], Awaitable[str]], on_busy: OnBusy | None) -> str:
        """Run a blocking save in the calling thread, in turn with the background saves.

        No snapshot is needed: the caller waits, so its leaves cannot change meanwhile. The
        lock stays held, so a ``save_async`` from another thread waits for this save.
        """
        with self._start_lock:
            self._wait_for_previous(on_busy)
            return _run_here(save)

    # -- restoring ----------------------------------------------------------------------

    async def restore(
        self,
        save_path: PathLike,
        *,
        storage_options: dict[str, Any] | None = None,
        filesystem: Any = None,
    ) -> RestoreStatus:
        """Fill the tree with the values of a checkpoint written by :meth:`save`.

        Writable numpy arrays are filled in place; other leaves are replaced in their dict,
        list, dataclass or object by a value of their own kind (a Python number stays one),
        or by a numpy array. ``save_counter`` is restored too and, as in TensorFlow, counts as
        missing when the checkpoint lacks it (use :meth:`read` for :meth:`write`'s
        checkpoints).

        Before anything is written, every value is checked against its leaf: the shape must be
        equal and the dtype must cast safely (float32 into float64 is fine, float64 into
        float32 is not; TensorFlow wants equal dtypes). Any problem raises one
        :class:`ValueMismatchError` naming every bad value, and leaves the tree untouched.
        """
        return await self._restore(save_path, True, storage_options, filesystem)

    async def read(
        self,
        save_path: PathLike,
        *,
        storage_options: dict[str, Any] | None = None,
        filesystem: Any = None,
    ) -> RestoreStatus:
        """:meth:`restore` for checkpoints from :meth:`write`: ``save_counter`` is optional."""
        return await self._restore(save_path, False, storage_options, filesystem)

    async def _restore(
        self,
        save_path: PathLike,
        expect_counter: bool,
        storage_options: dict[str, Any] | None,
        filesystem: Any,
    ) -> RestoreStatus:
        in_flight = self._in_flight
        if in_flight is not None:
            await _future_done(in_flight._future)  # a save_async of this very path, perhaps
        async with api.open(
            save_path, storage_options=storage_options, filesystem=filesystem
        ) as reader:
            graph_bytes = await _read_object_graph(reader)
            parse_object_graph(graph_bytes)  # checks references, escapes and duplicate keys
            proto = TrackableObjectGraph()
            proto.ParseFromString(graph_bytes)
            root_names = {ref.local_name for ref in proto.nodes[0].children}
            with_counter = expect_counter or SAVE_COUNTER in root_names
            nodes = _python_graph(self._children, with_counter=with_counter)
            match = _match(nodes, proto)
            _check_keys_present(reader, (key for _, key in match.bound))
            problems = [
                (key, problem)
                for node, key in sorted(match.bound, key=lambda pair: pair[1])
                if (problem := _leaf_problem(node, reader.entries[key])) is not None
            ]
            if problems:
                raise ValueMismatchError(
                    f"{len(problems)} checkpoint values do not fit their leaves (nothing was "
                    "restored): " + "; ".join(f"{key!r}: {why}" for key, why in problems),
                    mismatched=[key for key, _ in problems],
                    uri=reader.uri,
                )
            values = await reader.read_many([key for _, key in match.bound])
            uri = reader.uri
        for node, key in match.bound:
            if node.value is _COUNTER:
                self._save_counter = int(values[key][()])
            else:
                _write_leaf(node, values[key])
        return RestoreStatus(uri, [key for _, key in match.bound], match.missing, match.unexpected)

    # -- lifetime -----------------------------------------------------------------------

    def close(self) -> None:
        """Wait for the background save in flight, stop the background loop, free the buffer.

        The checkpoint stays usable; a later background save starts a new loop.
        """
        with self._start_lock:  # a save_async racing with close() starts after it
            self._loop.close()
            self._buffer = None

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> Checkpoint:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        in_flight = self._in_flight
        if in_flight is not None:
            # Wait here without blocking the event loop; close() then only stops an idle loop.
            with anyio.CancelScope(shield=True):
                await _future_done(in_flight._future)
        self.close()


# ---------------------------------------------------------------------------------------------
# The blocking face.


class SyncCheckpoint:
    """:class:`Checkpoint` for sync code: blocking calls, saves in the background on request.

    ``save(prefix)`` blocks until the checkpoint is committed, streaming the leaves from where
    they are in the calling thread (after any background save in flight, as ``on_busy``
    says); ``save(prefix, blocking=False)`` returns a :class:`SaveHandle` as soon as the leaves
    are snapshotted. Restores run in the calling thread too. Children are attributes, as on
    :class:`Checkpoint`.
    """

    def __init__(
        self, *, on_busy: OnBusy = "wait", background_nice: int | None = None, **children: Any
    ) -> None:
        checkpoint = Checkpoint(on_busy=on_busy, background_nice=background_nice, **children)
        object.__setattr__(self, "_checkpoint", checkpoint)

    @property
    def checkpoint(self) -> Checkpoint:
        """The async checkpoint underneath, sharing children and ``save_counter``."""
        checkpoint: Checkpoint = self._checkpoint
        return checkpoint

    @property
    def save_counter(self) -> int:
        return self.checkpoint.save_counter

    def __getattr__(self, name: str) -> Any:
        checkpoint = self.__dict__.get("_checkpoint")
        if checkpoint is None:
            raise AttributeError(name)
        return getattr(checkpoint, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.checkpoint, name, value)

    def __delattr__(self, name: str) -> None:
        delattr(self.checkpoint, name)

    @overload
    def save(
        self,
        file_prefix: PathLike,
        *,
        blocking: Literal[True] = ...,
        num_shards: int | None = ...,
        overwrite: bool = ...,
        storage_options: dict[str, Any] | None = ...,
        filesystem: Any = ...,
        on_busy: OnBusy | None = ...,
    ) -> str: ...
    @overload
    def save(
        self,
        file_prefix: PathLike,
        *,
        blocking: Literal[False],
        num_shards: int | None = ...,
        overwrite: bool = ...,
        storage_options: dict[str, Any] | None = ...,
        filesystem: Any = ...,
        on_busy: OnBusy | None = ...,
    ) -> SaveHandle: ...
    def save(
        self,
        file_prefix: PathLike,
        *,
        blocking: bool = True,
        num_shards: int | None = None,
        overwrite: bool = False,
        storage_options: dict[str, Any] | None = None,
        filesystem: Any = None,
        on_busy: OnBusy | None = None,
    ) -> str | SaveHandle:
        """Blocking :meth:`Checkpoint.save`; ``blocking=False`` returns the handle."""
        return self._store(
            True,
            file_prefix,
            blocking=blocking,
            on_busy=on_busy,
            num_shards=num_shards,
            overwrite=overwrite,
            storage_options=storage_options,
            filesystem=filesystem,
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
    ) -> str | SaveHandle:
        """Blocking :meth:`Checkpoint.write`; ``blocking=False`` returns the handle."""
        return self._store(
            False,
            file_prefix,
            blocking=blocking,
            on_busy=on_busy,
            num_shards=num_shards,
            overwrite=overwrite,
            storage_options=storage_options,
            filesystem=filesystem,
        )

    def _store(
        self,
        counted: bool,
        file_prefix: PathLike,
        *,
        blocking: bool,
        on_busy: OnBusy | None,
        **options: Any,
    ) -> str | SaveHandle:
        """``save`` (``counted``) or ``write``: in the background, or here and now."""
        checkpoint = self.checkpoint
        if not blocking:
            start = checkpoint.save_async if counted else checkpoint.write_async
            return start(file_prefix, on_busy=on_busy, **options)
        run = checkpoint.save if counted else checkpoint.write
        return checkpoint._in_caller(functools.partial(run, file_prefix, **options), on_busy)

    def restore(
        self,
        save_path: PathLike,
        *,
        storage_options: dict[str, Any] | None = None,
        filesystem: Any = None,
    ) -> RestoreStatus:
        """Blocking :meth:`Checkpoint.restore`."""
        restore = functools.partial(
            self.checkpoint.restore,
            save_path,
            storage_options=storage_options,
            filesystem=filesystem,
        )
        return _run_here(restore)

    def read(
        self,
        save_path: PathLike,
        *,
        storage_options: dict[str, Any] | None = None,
        filesystem: Any = None,
    ) -> RestoreStatus:
        """Blocking :meth:`Checkpoint.read`."""
        read = functools.partial(
            self.checkpoint.read, save_path, storage_options=storage_options, filesystem=filesystem
        )
        return _run_here(read)

    def close(self) -> None:
        """Wait for the background save in flight and stop the background loop."""
        self.checkpoint.close()

    def __enter__(self) -> SyncCheckpoint:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
