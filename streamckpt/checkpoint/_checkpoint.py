"""``Checkpoint``: ``tf.train.Checkpoint`` for Python trees, with saves that do not stall.

``Checkpoint(model=..., optimizer=..., step=...)`` names every leaf the way TensorFlow names the
variables of the same tree of ``tf.Module``s (see :mod:`streamckpt.objectgraph`), so TensorFlow
restores what it writes and it restores what TensorFlow writes.

Rules:

* **One save at a time.** A save waits for the background save in flight (or raises
  :class:`SaveInProgressError`, as ``on_busy`` says): the snapshot buffer is reused, and
  ``save_counter`` counts saves in the order they were asked for.
* **Background saves run on a bridge** (:mod:`streamckpt.bridge`), held from the first
  background save until :meth:`Checkpoint.close` (or garbage collection); the interpreter
  does not exit while one is in flight.
* The manager and the blocking face use only this class's public methods.
"""

from __future__ import annotations

import functools
import os
import threading
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from streamckpt import api
from streamckpt.bridge import shared_bridge
from streamckpt.checkpoint._background import (
    BridgeHold,
    OnBusy,
    SaveHandle,
    SnapshotBuffer,
    wait_until_done,
)
from streamckpt.checkpoint._restore import Replicated, RestoreStatus, restore_tree
from streamckpt.distributed import Coordinator
from streamckpt.errors import NamingError, SaveInProgressError
from streamckpt.objectgraph import OBJECT_GRAPH_KEY, SAVE_COUNTER, build_object_graph
from streamckpt.pipeline.save import SaveInfo
from streamckpt.storage import PathLike, background_options

__all__ = ["AfterCommit", "Checkpoint"]

AfterCommit = Callable[[str], Awaitable[None]]
"""Runs on the background loop once a background save is committed, with its path."""

# Names a child may not take: the methods and settings of Checkpoint and its blocking face.
RESERVED_NAMES = frozenset(
    {
        SAVE_COUNTER,
        "on_busy",
        "background_nice",
        "checkpoint",
        "save",
        "write",
        "save_async",
        "write_async",
        "restore",
        "read",
        "wait_for_save",
        "close",
    }
)


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
        for name in children:
            if name in RESERVED_NAMES:
                raise NamingError(f"{name!r} is reserved by Checkpoint and cannot be a child")
        object.__setattr__(self, "_children", dict(children))
        self._on_busy: OnBusy = on_busy
        self._save_counter = 0
        self._hold = BridgeHold(shared_bridge(background_nice))
        self._start_lock = threading.Lock()
        self._in_flight: SaveHandle | None = None
        self._snapshots = SnapshotBuffer()
        # A checkpoint dropped without close() lets its bridge go once its saves are done.
        weakref.finalize(self, self._hold.release).atexit = False

    # -- children as attributes ---------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        children = self.__dict__.get("_children", {})
        if name in children:
            return children[name]
        raise AttributeError(f"{type(self).__name__} has no child or attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        elif name in RESERVED_NAMES:
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

    @property
    def on_busy(self) -> OnBusy:
        """What a save does while a background save is in flight: ``wait`` or ``raise``."""
        return self._on_busy

    # -- saving -------------------------------------------------------------------------

    def _tensors(self, counter: int | None) -> dict[str, Any]:
        values, graph = build_object_graph(self._children, save_counter=counter)
        return {**values, OBJECT_GRAPH_KEY: graph}

    async def save(
        self,
        file_prefix: PathLike,
        *,
        checkpoint_number: int | None = None,
        num_shards: int | None = None,
        overwrite: bool = False,
        storage_options: dict[str, Any] | None = None,
        filesystem: Any = None,
        on_busy: OnBusy | None = None,
        after_commit: AfterCommit | None = None,
        coordinator: Coordinator | None = None,
    ) -> str:
        """Write ``<file_prefix>-<N>`` with ``save_counter`` N, counted up first; return it.

        With ``checkpoint_number`` the name ends in that number instead (a training step, as
        TensorFlow's manager names its checkpoints); ``save_counter`` still counts up and is
        saved. The leaves are streamed from where they are, so they must not change until this
        returns; :meth:`save_async` snapshots them instead. A background save in flight is
        waited for first, or raises :class:`SaveInProgressError`, as ``on_busy`` (default: the
        checkpoint's) says. ``after_commit(path)`` runs once the save is committed.
        """
        await self._after_background(on_busy)
        number = self._save_counter + 1
        tensors = self._tensors(number)
        self._save_counter = number
        path = (
            f"{os.fspath(file_prefix)}-{number if checkpoint_number is None else checkpoint_number}"
        )
        await api.save(
            path,
            tensors,
            num_shards=num_shards,
            overwrite=overwrite,
            storage_options=storage_options,
            filesystem=filesystem,
            coordinator=coordinator,
        )
        if after_commit is not None:
            await after_commit(path)
        return path

    async def write(
        self,
        file_prefix: PathLike,
        *,
        num_shards: int | None = None,
        overwrite: bool = False,
        storage_options: dict[str, Any] | None = None,
        filesystem: Any = None,
        on_busy: OnBusy | None = None,
        after_commit: AfterCommit | None = None,
        coordinator: Coordinator | None = None,
    ) -> str:
        """Write exactly ``file_prefix``, without ``save_counter``; return it.

        ``on_busy``, ``after_commit`` and ``coordinator`` are :meth:`save`'s.
        """
        await self._after_background(on_busy)
        path = os.fspath(file_prefix)
        await api.save(
            path,
            self._tensors(None),
            num_shards=num_shards,
            overwrite=overwrite,
            storage_options=storage_options,
            filesystem=filesystem,
            coordinator=coordinator,
        )
        if after_commit is not None:
            await after_commit(path)
        return path

    async def _after_background(self, on_busy: OnBusy | None) -> None:
        in_flight = self._in_flight
        if in_flight is not None and not in_flight.done():
            if (on_busy or self._on_busy) == "raise":
                raise SaveInProgressError(
                    f"a background save to {in_flight.path!r} is still running"
                )
            await wait_until_done(in_flight)

    def save_async(
        self,
        file_prefix: PathLike,
        *,
        checkpoint_number: int | None = None,
        num_shards: int | None = None,
        overwrite: bool = False,
        storage_options: dict[str, Any] | None = None,
        filesystem: Any = None,
        on_busy: OnBusy | None = None,
        after_commit: AfterCommit | None = None,
        coordinator: Coordinator | None = None,
        copy: bool = True,
    ) -> SaveHandle:
        """Snapshot the leaves, then :meth:`save` in the background; return a handle at once.

        Returns when every leaf has been copied to host memory, so the caller may change its
        arrays right away. The copy goes into a buffer the checkpoint keeps for the next save
        (host memory the size of all leaves, until :meth:`close`): fresh memory would cost
        page faults that make the copy several times slower. ``after_commit(path)``, if
        given, runs on the background loop once the save is committed; its failure is the
        handle's.

        A plain function, callable from sync and async code alike. While a previous
        background save runs, it first waits for it (blocking, in async code too: ``await``
        the previous handle to avoid that) or raises :class:`SaveInProgressError`, as
        ``on_busy`` (default: the checkpoint's) says. With a ``coordinator`` it returns once
        this process's snapshot is taken; the save's collectives run in the background.

        ``copy=False`` skips the copy of host arrays (numpy, CPU torch tensors): the save
        holds them and streams from them, so it returns almost at once and needs no buffer.
        The caller promises not to change them until the handle is done (wait with
        ``result()`` or :meth:`wait_for_save` first): a change made earlier may be saved, in
        part or whole, and nothing detects it. The next save waits for this one before it
        starts (or raises, as ``on_busy`` says). jax arrays are not copied either way: they
        are immutable, and on the host a view of their own memory is saved.
        """
        return self._start(
            file_prefix,
            counted=True,
            checkpoint_number=checkpoint_number,
            num_shards=num_shards,
            overwrite=overwrite,
            storage_options=storage_options,
            filesystem=filesystem,
            on_busy=on_busy,
            after_commit=after_commit,
            coordinator=coordinator,
            copy=copy,
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
        after_commit: AfterCommit | None = None,
        coordinator: Coordinator | None = None,
        copy: bool = True,
    ) -> SaveHandle:
        """:meth:`write` in the background, with :meth:`save_async`'s snapshot and policy."""
        return self._start(
            file_prefix,
            counted=False,
            checkpoint_number=None,
            num_shards=num_shards,
            overwrite=overwrite,
            storage_options=storage_options,
            filesystem=filesystem,
            on_busy=on_busy,
            after_commit=after_commit,
            coordinator=coordinator,
            copy=copy,
        )

    def _start(
        self,
        file_prefix: PathLike,
        *,
        counted: bool,
        checkpoint_number: int | None,
        on_busy: OnBusy | None,
        after_commit: AfterCommit | None,
        copy: bool,
        **options: Any,
    ) -> SaveHandle:
        """Snapshot now; on the bridge, save and then run ``after_commit``."""
        with self._start_lock:
            self.wait_for_save(on_busy=on_busy)
            number = self._save_counter + 1 if counted else None
            tensors = self._tensors(number)
            if options.get("coordinator") is not None:
                snapshot = self._snapshots.take_pieces(tensors, copy=copy)
            else:
                snapshot = self._snapshots.take(tensors, copy=copy)
            base = os.fspath(file_prefix)
            suffix = number if checkpoint_number is None else checkpoint_number
            path = base if number is None else f"{base}-{suffix}"
            options["storage_options"] = background_options(
                path, options.get("storage_options"), options.get("filesystem")
            )
            save = functools.partial(api.save, path, snapshot, **options)

            async def job() -> SaveInfo:
                info = await save()
                if after_commit is not None:
                    await after_commit(path)
                return info

            self._hold.hold()
            handle = SaveHandle(path, self._hold.bridge.start(job, label=path))
            if number is not None:
                self._save_counter = number
            self._in_flight = handle
        return handle

    def wait_for_save(self, *, on_busy: OnBusy | None = None) -> None:
        """Block until the background save in flight, if any, has finished.

        With ``on_busy="raise"`` (default: the checkpoint's ``on_busy``) a save in flight
        raises :class:`SaveInProgressError` instead. The save's own error stays on its handle.
        """
        previous = self._in_flight
        if previous is not None and not previous.done():
            if (on_busy or self._on_busy) == "raise":
                raise SaveInProgressError(
                    f"a background save to {previous.path!r} is still running"
                )
            previous.join()

    # -- restoring ----------------------------------------------------------------------

    async def restore(
        self,
        save_path: PathLike,
        *,
        storage_options: dict[str, Any] | None = None,
        filesystem: Any = None,
        coordinator: Coordinator | None = None,
        replicated: Replicated = "read",
    ) -> RestoreStatus:
        """Fill the tree with the values of a checkpoint written by :meth:`save`.

        Writable numpy arrays and torch tensors are filled in place; other leaves are
        replaced in their dict, list, dataclass or object by a value of their own kind (a
        Python number stays one), or by a numpy array. ``save_counter`` is restored too and,
        as in TensorFlow, counts as missing when the checkpoint lacks it (use :meth:`read`
        for :meth:`write`'s checkpoints).

        Before anything is written, every value is checked against its leaf: the shape must be
        equal and the dtype must cast safely (float32 into float64 is fine, float64 into
        float32 is not; TensorFlow wants equal dtypes). Any problem raises one
        :class:`ValueMismatchError` naming every bad value, and leaves the tree untouched.

        Resharding: a :class:`streamckpt.Slice`, torch ``DTensor`` or sharded ``jax.Array``
        leaf gets only its own box of the stored tensor, whatever pieces the checkpoint holds
        and however many processes wrote it; only those bytes are fetched (a ``jax.Array``
        is replaced by a new one of its sharding). Whole leaves are read by every process,
        or, with ``replicated="broadcast"`` and a ``coordinator``, read once by the primary
        and sent to the others (every process then restores together).
        """
        return await self._restore(
            save_path, True, storage_options, filesystem, coordinator, replicated
        )

    async def read(
        self,
        save_path: PathLike,
        *,
        storage_options: dict[str, Any] | None = None,
        filesystem: Any = None,
        coordinator: Coordinator | None = None,
        replicated: Replicated = "read",
    ) -> RestoreStatus:
        """:meth:`restore` for checkpoints from :meth:`write`: ``save_counter`` is optional."""
        return await self._restore(
            save_path, False, storage_options, filesystem, coordinator, replicated
        )

    async def _restore(
        self,
        save_path: PathLike,
        expect_counter: bool,
        storage_options: dict[str, Any] | None,
        filesystem: Any,
        coordinator: Coordinator | None,
        replicated: Replicated,
    ) -> RestoreStatus:
        in_flight = self._in_flight
        if in_flight is not None:
            await wait_until_done(in_flight)  # a save_async of this very path, perhaps
        async with api.open(
            save_path, storage_options=storage_options, filesystem=filesystem
        ) as reader:
            status, counter = await restore_tree(
                reader,
                self._children,
                expect_counter=expect_counter,
                coordinator=coordinator,
                replicated=replicated,
            )
        if counter is not None:
            self._save_counter = counter
        return status

    # -- lifetime -----------------------------------------------------------------------

    def close(self) -> None:
        """Wait for the background save in flight, let the bridge go, free the buffer.

        The checkpoint stays usable; a later background save takes the bridge again.
        """
        with self._start_lock:  # a save_async racing with close() starts after it
            in_flight = self._in_flight
            if in_flight is not None:
                in_flight.join()
            self._hold.release()
            self._hold.bridge.join(timeout=60)
            self._snapshots.free()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> Checkpoint:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        in_flight = self._in_flight
        if in_flight is not None:
            # Wait here without blocking the event loop; close() then has nothing to wait for.
            with anyio.CancelScope(shield=True):
                await wait_until_done(in_flight)
        self.close()
