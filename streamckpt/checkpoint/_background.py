"""Background saves: the snapshot that lets the caller go on, the handle that reports.

A checkpoint's hold on the bridge that runs its saves lives here too (:class:`BridgeHold`).

Rules:

* **A background save owns its bytes.** It starts only after every leaf has been copied once
  into a host buffer owned by the checkpoint; the caller may then change its arrays. The
  buffer is reused by the next save (plain memory copies, without the page faults of fresh
  memory), which therefore waits for the previous one, or refuses to start.
* **Unless the caller lends them** (``copy=False``): host arrays are then streamed from where
  they are, and the caller promises not to change them until the save is done.
* **The copy runs at memory speed.** glibc copies blocks smaller than its non-temporal
  threshold (192 MiB on the benchmark VM) with cached stores, at about 60% of one large
  memcpy; so the leaves are cut into pieces that the calling thread and a few helpers copy
  side by side, each its own contiguous span of the buffer, all joined before ``take`` returns.
* **A failure is never silent.** It is logged when it happens, re-raised by whoever waits
  on the handle, and a save still running at interpreter exit is waited for (see
  :mod:`streamckpt.bridge`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import threading
from collections.abc import Generator, Mapping
from typing import Any, Literal

import anyio
import anyio.to_thread
import numpy as np

from streamckpt.bridge import Bridge, Job
from streamckpt.device import HostTransfer, is_device_array, start_transfer
from streamckpt.errors import StreamCkptError, UnsupportedError
from streamckpt.fileio import fresh_buffer
from streamckpt.format.dtypes import from_numpy
from streamckpt.pipeline.save import SaveInfo
from streamckpt.sharding import Slice
from streamckpt.tree import to_numpy

__all__ = [
    "BridgeHold",
    "OnBusy",
    "SaveHandle",
    "SnapshotBuffer",
    "wait_for_future",
    "wait_until_done",
]

logger = logging.getLogger("streamckpt.checkpoint")

OnBusy = Literal["wait", "raise"]

# Each snapshot tensor starts on a cache line, so views of the buffer are aligned for any dtype.
_ALIGNMENT = 64
# A copy piece: small enough to balance the threads, large enough that per-call cost vanishes.
_PIECE_BYTES = 4 << 20
# Below this a snapshot is copied by the calling thread alone: starting helpers costs more.
_PARALLEL_MIN_BYTES = 32 << 20
# Memory bandwidth, not cores, bounds a copy: a few threads reach it on common machines.
_MAX_COPY_THREADS = 4

_Pair = tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]


async def wait_for_future(future: concurrent.futures.Future[Any]) -> None:
    """Return once ``future`` is done; cancelling the caller leaves ``future`` running."""
    if future.done():
        return
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # another backend (trio): park a worker thread instead
        await anyio.to_thread.run_sync(concurrent.futures.wait, [future], abandon_on_cancel=True)
        return
    waiter: asyncio.Future[None] = loop.create_future()

    def resolve() -> None:
        if not waiter.done():
            waiter.set_result(None)

    def wake(_: concurrent.futures.Future[Any]) -> None:
        with contextlib.suppress(RuntimeError):  # the waiting loop has closed meanwhile
            loop.call_soon_threadsafe(resolve)

    future.add_done_callback(wake)
    await waiter


class SaveHandle:
    """A save running in the background; ``result()`` or ``await handle`` waits for it.

    Waiting re-raises whatever made the save fail. A failure is also logged when it happens,
    so that a save nobody waits for does not fail silently.
    """

    __slots__ = ("_job", "path")

    def __init__(self, path: str, job: Job) -> None:
        self.path = path
        self._job = job
        job.future.add_done_callback(self._log_failure)

    def _log_failure(self, future: concurrent.futures.Future[Any]) -> None:
        if not future.cancelled() and future.exception() is not None:
            logger.error(
                "background checkpoint save to %s failed: %r", self.path, future.exception()
            )

    def done(self) -> bool:
        """Whether the save has finished, successfully or not."""
        return self._job.done()

    def join(self, timeout: float | None = None) -> bool:
        """Block until the save has finished, without raising its error; False on timeout."""
        done, _ = concurrent.futures.wait([self._job.future], timeout)
        return bool(done)

    def result(self, timeout: float | None = None) -> str:
        """Block until the save is committed and return its path (TimeoutError on timeout)."""
        self._job.result(timeout)
        return self.path

    def info(self) -> SaveInfo:
        """What the finished save wrote and how long it took; blocks until it has finished."""
        info: SaveInfo = self._job.result()
        return info

    async def wait(self) -> str:
        """Wait without blocking the event loop; cancelling the waiter does not stop the save."""
        await wait_for_future(self._job.future)
        return self.result()

    def __await__(self) -> Generator[Any, None, str]:
        return self.wait().__await__()

    def __repr__(self) -> str:
        state = "done" if self.done() else "running"
        return f"<SaveHandle {self.path!r} {state}>"


async def wait_until_done(handle: SaveHandle) -> None:
    """Wait, without blocking the event loop or raising the save's error, until it ends."""
    await wait_for_future(handle._job.future)


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGNMENT) * _ALIGNMENT


def _pieces(target: np.ndarray[Any, Any], source: np.ndarray[Any, Any]) -> list[_Pair]:
    """``(destination, source)`` pairs that together copy ``source`` into ``target``.

    A C-contiguous source of the target's dtype is cut into byte ranges; anything else (a
    strided view, bytes to swap) stays whole, since only ``np.copyto`` of the whole knows
    its layout.
    """
    if source.dtype != target.dtype or not source.flags.c_contiguous:
        return [(target, source)]
    into = target.reshape(-1).view(np.uint8)
    out_of = source.reshape(-1).view(np.uint8)
    return [
        (into[start : start + _PIECE_BYTES], out_of[start : start + _PIECE_BYTES])
        for start in range(0, out_of.nbytes, _PIECE_BYTES)
    ]


def _copy(pairs: list[_Pair]) -> None:
    for into, out_of in pairs:
        np.copyto(into, out_of, casting="equiv")


def _usable_cores() -> int:
    """The cores this process may run on (a container's CPU set, not the host's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _copy_side_by_side(pairs: list[_Pair], nbytes: int) -> None:
    """Copy every pair, the calling thread and its helpers each taking a contiguous run.

    ``np.copyto`` lets go of the GIL, so the threads copy at once; the helpers are joined
    before this returns, also when a copy fails.
    """
    threads = min(_MAX_COPY_THREADS, _usable_cores())
    if threads < 2 or nbytes < _PARALLEL_MIN_BYTES:
        _copy(pairs)
        return
    share = -(-nbytes // threads)
    runs: list[list[_Pair]] = [[]]
    taken = 0
    for pair in pairs:
        if taken >= share * len(runs) and len(runs) < threads:
            runs.append([])
        runs[-1].append(pair)
        taken += pair[1].nbytes
    if len(runs) == 1:
        _copy(pairs)
        return
    with concurrent.futures.ThreadPoolExecutor(
        len(runs) - 1, thread_name_prefix="streamckpt-snapshot"
    ) as helpers:
        helping = [helpers.submit(_copy, run) for run in runs[1:]]
        _copy(runs[0])
        for done in helping:
            done.result()


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


class BridgeHold:
    """A checkpoint's hold on its bridge; released by close() or by garbage collection."""

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        self.held = False
        self.lock = threading.Lock()

    def hold(self) -> None:
        with self.lock:
            if not self.held:
                self.bridge.hold()
                self.held = True

    def release(self) -> None:
        with self.lock:
            if self.held:
                self.held = False
                self.bridge.release()


class SnapshotBuffer:
    """Host memory that a checkpoint's background saves copy their leaves into, reused."""

    def __init__(self) -> None:
        self._buffer: np.ndarray[Any, Any] | None = None

    @property
    def nbytes(self) -> int:
        return 0 if self._buffer is None else self._buffer.nbytes

    def free(self) -> None:
        self._buffer = None

    def take(self, values: Mapping[str, Any], *, copy: bool = True) -> dict[str, Any]:
        """Copy every leaf once into the buffer (grown if too small); return views of it.

        With ``copy=False`` host arrays are returned as they are, uncopied, and the buffer is
        left alone: the caller has promised not to change them while the save reads them.

        A device array (CUDA tensor, jax array) is not copied here: its transfer to host
        memory of its own is started (:mod:`streamckpt.device`) and the save waits for it
        when it streams that tensor, so the snapshot returns once the copies are enqueued.
        On jax's CPU backend that "transfer" is a read-only view of the array's own memory:
        jax arrays are immutable, so no copy is needed.

        Object arrays (strings) are converted to ``bytes`` elements on their own. Nothing is
        copied until every leaf is known to be savable, so a bad leaf costs no copy.
        """
        layout: list[tuple[str, np.ndarray[Any, Any], np.dtype[Any], int]] = []
        snapshot: dict[str, Any] = {}
        total = 0
        for key, leaf in values.items():
            if is_device_array(leaf) or isinstance(leaf, HostTransfer):
                # its own host memory (pinned), filled by a copy enqueued now: the snapshot
                started = leaf if isinstance(leaf, HostTransfer) else start_transfer(leaf)
                snapshot[key] = started
                continue
            try:
                array = to_numpy(leaf)
                from_numpy(array.dtype)
            except StreamCkptError as exc:
                raise exc.with_context(tensor=key) from None
            if array.dtype.hasobject:
                snapshot[key] = _string_snapshot(key, array)
                continue
            if not copy:
                snapshot[key] = array
                continue
            target = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
            layout.append((key, array, target, total))
            total += _aligned(array.nbytes)
        if not layout:
            return snapshot
        buffer = self._buffer
        if buffer is None or buffer.nbytes < total:
            self._buffer = None  # the old mapping goes before the new one is faulted in
            buffer = self._buffer = np.frombuffer(fresh_buffer(max(total, 1)), np.uint8)
        pairs: list[_Pair] = []
        for key, array, target, offset in layout:
            view = buffer[offset : offset + array.nbytes].view(target).reshape(array.shape)
            pairs.extend(_pieces(view, array))
            snapshot[key] = view
        _copy_side_by_side(pairs, total)
        return snapshot

    def take_pieces(self, values: Mapping[str, Any], *, copy: bool = True) -> dict[str, Any]:
        """:meth:`take`, where sharded leaves stay pieces: each piece's value taken, its box kept.

        For saves of many processes, whose planner needs each piece's place in its tensor.
        """
        from streamckpt.distributed.local import pieces_of  # only saves together pay for it

        flat: dict[str, Any] = {}
        boxes: dict[str, list[tuple[tuple[int, ...], tuple[int, ...]]]] = {}
        for name, value in values.items():
            pieces = pieces_of(value)
            if pieces is None:
                flat[name] = value
                continue
            boxes[name] = [(piece.full_shape, piece.offset) for piece in pieces]
            for i, piece in enumerate(pieces):
                flat[f"{name}\x00{i}"] = piece.value
        copied = self.take(flat, copy=copy)
        snapshot: dict[str, Any] = {name: copied[name] for name in values if name not in boxes}
        for name, shapes in boxes.items():
            snapshot[name] = [
                Slice(copied[f"{name}\x00{i}"], full_shape=full_shape, offset=offset)
                for i, (full_shape, offset) in enumerate(shapes)
            ]
        return snapshot
