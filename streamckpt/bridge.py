"""The one bridge from sync code to streamckpt's async core.

Every coroutine that sync code runs goes through a :class:`Bridge`: the blocking functions of
:mod:`streamckpt.sync`, an open :func:`streamckpt.sync.open`, background saves of a
``Checkpoint`` and the manager's work. The rules it keeps:

* **A blocking call runs in the calling thread** (``anyio.run``) when that thread runs no
  event loop: no thread hop, and Ctrl-C cancels the call as it cancels any anyio program.
  From a thread that runs a loop (a notebook, a progress callback, code called back from a
  background save) it runs on the bridge's loop thread instead, never on the caller's loop.
* **Work that outlives the call runs on the bridge's loop thread**: one event loop in one
  daemon thread, reached through an anyio blocking portal, started on first use. The thread
  lives while anything holds the bridge (a :meth:`lease`: an open sync reader, a checkpoint
  until its ``close()``) or a job runs on it, and ends once neither does. With ``nice`` the
  thread, and the worker threads it starts, run at that niceness (Linux, where niceness is per
  thread and inherited).
* **No background job is lost at exit.** A job started with :meth:`start` that is still
  running when the interpreter shuts down (end of script, ``sys.exit()``) is waited for, with
  a line on stderr naming it; if it then has failed and nobody looked at its result, its error
  is printed and the process exits with status 1. This is the one exit hook, and it is
  registered where ``concurrent.futures`` registers its own (``threading._register_atexit``):
  it runs before the interpreter stops thread pools and non-daemon threads, so a save still
  has every thread it needs; ``atexit`` would run after that, too late. A signal's default
  action (SIGTERM, SIGKILL) still ends the process at once; the commit rule of saves makes
  what is on disk a whole checkpoint or none.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import concurrent.futures.thread  # registers its exit hook before ours, so ours runs first
import contextlib
import functools
import logging
import os
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Concatenate, ParamSpec, TypeVar

import anyio
import anyio.from_thread

__all__ = [
    "BlockingTwin",
    "Bridge",
    "Job",
    "blocking",
    "blocking_method",
    "default_bridge",
    "in_event_loop",
    "shared_bridge",
]

logger = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

_THREAD_NAME = "streamckpt-bridge"


def in_event_loop() -> bool:
    """Whether the calling thread is running an event loop (so it must not block in one)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class Job:
    """A coroutine running on a bridge's loop thread; ``result()`` waits for it.

    Whoever calls :meth:`result` (or :meth:`exception`) has seen the outcome; a job that failed
    unseen is reported at exit and makes the exit status 1.
    """

    __slots__ = ("_future", "_seen", "label")

    def __init__(self, label: str, future: concurrent.futures.Future[Any]) -> None:
        self.label = label
        self._future = future
        self._seen = False

    @property
    def future(self) -> concurrent.futures.Future[Any]:
        """The underlying future, for ``concurrent.futures.wait`` and done callbacks."""
        return self._future

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> Any:
        """The job's value; re-raises its error. ``TimeoutError`` leaves the job running."""
        try:
            value = self._future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise
        except BaseException:
            self._seen = True
            raise
        self._seen = True
        return value

    def exception(self, timeout: float | None = None) -> BaseException | None:
        error = self._future.exception(timeout)
        self._seen = True
        return error

    def unseen_failure(self) -> BaseException | None:
        """The error of a finished job nobody looked at, else None."""
        if self._seen or not self._future.done() or self._future.cancelled():
            return None
        return self._future.exception()


class Bridge:
    """An event loop in one daemon thread for sync code: see the module's rules."""

    def __init__(self, *, nice: int | None = None) -> None:
        if nice is not None and not 0 <= nice <= 19:
            raise ValueError(f"nice must be in 0..19, not {nice!r}")
        self.nice = nice
        self._lock = threading.Lock()
        self._portal: anyio.from_thread.BlockingPortal | None = None
        self._thread: threading.Thread | None = None
        self._stopping: threading.Thread | None = None  # the last thread asked to stop
        self._leases = 0
        self._jobs: set[Job] = set()
        self._failed: set[Job] = set()  # finished with an error: the exit checks them too

    # -- blocking calls ---------------------------------------------------------------------

    def run(self, fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn(*args, **kwargs)`` to completion and return its value."""
        call = functools.partial(fn, *args, **kwargs)
        if _on_a_bridge_thread():
            # Blocking our own loop is what the caller asked for; a loop of its own avoids the
            # deadlock of waiting on the loop we are running.
            with anyio.from_thread.start_blocking_portal() as portal:
                return _call_cancelling(portal, call)
        if in_event_loop():
            with self.lease() as portal:
                return _call_cancelling(portal, call)
        # The loop's main task returns nothing: Python 3.11's asyncio.Runner formats that task,
        # its result included, as it restores the SIGINT handler; for a loaded dict of 20,000
        # arrays that took about 10 ms of a 0.28 s load.
        results: list[T] = []

        async def main() -> None:
            results.append(await call())

        anyio.run(main)
        return results[0]

    # -- work that outlives the call ---------------------------------------------------------

    def start(self, fn: Callable[[], Awaitable[T]], *, label: str) -> Job:
        """Start ``fn()`` on the loop thread and return at once; exit waits for it.

        The caller must hold the bridge (:meth:`hold` or :meth:`lease`) until the job is done,
        or release it knowing that the loop stops only once its jobs have finished.
        """
        with self._lock:
            if self._portal is None:
                raise RuntimeError("start() needs a held bridge: call hold() first")
            future = self._portal.start_task_soon(fn)
            job = Job(label, future)
            self._jobs.add(job)
        _register_exit_wait(self)
        future.add_done_callback(lambda _: self._forget(job))
        return job

    def _forget(self, job: Job) -> None:
        with self._lock:
            self._jobs.discard(job)
            if job.unseen_failure() is not None:  # kept until exit, unless someone looks
                self._failed.add(job)

    @contextlib.contextmanager
    def lease(self) -> Iterator[anyio.from_thread.BlockingPortal]:
        """Hold the loop thread open for the ``with`` block; yields its portal."""
        with self._lock:
            portal = self._acquire()
        try:
            yield portal
        finally:
            with self._lock:
                self._release_locked()

    def hold(self) -> None:
        """Hold the loop thread open until :meth:`release` (what :meth:`lease` does)."""
        with self._lock:
            self._acquire()

    def release(self) -> None:
        with self._lock:
            self._release_locked()

    def pending(self) -> list[Job]:
        """The jobs still running."""
        with self._lock:
            return [job for job in self._jobs if not job.done()]

    def failed(self) -> list[Job]:
        """The jobs that finished with an error nobody has looked at yet."""
        with self._lock:
            return [job for job in self._failed if job.unseen_failure() is not None]

    def wait(self) -> None:
        """Block until every job started so far has finished (their errors are theirs)."""
        while pending := self.pending():
            concurrent.futures.wait([job.future for job in pending])

    @property
    def native_thread_id(self) -> int | None:
        """The OS id of the loop thread while it runs (for niceness and diagnostics)."""
        with self._lock:
            return None if self._thread is None else self._thread.native_id

    @property
    def running(self) -> bool:
        """Whether the loop thread is alive."""
        with self._lock:
            return self._thread is not None and self._thread.is_alive()

    # -- the loop thread -------------------------------------------------------------------

    def _acquire(self) -> anyio.from_thread.BlockingPortal:
        """Under the lock: count one more holder, starting the loop thread if needed."""
        if self._portal is None:
            self._portal, self._thread = self._start_thread()
        self._leases += 1
        return self._portal

    def _release_locked(self) -> None:
        """Under the lock: one holder fewer; the last one stops the loop once its jobs end."""
        if self._leases == 0:
            raise RuntimeError("release() without a matching hold()")
        self._leases -= 1
        if self._leases == 0 and self._portal is not None:
            portal, self._portal = self._portal, None
            self._stopping, self._thread = self._thread, None
            # stop() lets the tasks in flight finish first. From the loop thread itself (a
            # holder collected there) the loop cannot be asked to stop; it stays, idle, as a
            # daemon thread.
            with contextlib.suppress(RuntimeError):
                portal.start_task_soon(portal.stop)

    def _start_thread(self) -> tuple[anyio.from_thread.BlockingPortal, threading.Thread]:
        ready: concurrent.futures.Future[anyio.from_thread.BlockingPortal] = (
            concurrent.futures.Future()
        )
        nice = self.nice

        async def serve() -> None:
            if nice is not None and sys.platform.startswith("linux"):
                os.setpriority(os.PRIO_PROCESS, 0, nice)  # this thread only
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

        thread = threading.Thread(target=main, name=_THREAD_NAME, daemon=True)
        thread.start()
        return ready.result(), thread

    def join(self, timeout: float | None = None) -> None:
        """Wait until the loop thread of an unheld bridge has ended."""
        with self._lock:
            thread = self._stopping
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)


def _on_a_bridge_thread() -> bool:
    return threading.current_thread().name == _THREAD_NAME


def _call_cancelling(
    portal: anyio.from_thread.BlockingPortal, call: Callable[[], Awaitable[T]]
) -> T:
    """``portal.call``, except that an interrupt of the waiting thread cancels the call.

    Without this, Ctrl-C while waiting would leave the coroutine running unowned on the loop.
    The call's own clean-up (shielded in the pipeline) runs before the interrupt propagates.
    """
    future = portal.start_task_soon(call)
    try:
        return future.result()
    except BaseException:
        if not future.done():
            future.cancel()
            concurrent.futures.wait([future], timeout=60)
        raise


_bridges: dict[int | None, Bridge] = {}
_bridges_lock = threading.Lock()


def shared_bridge(nice: int | None = None) -> Bridge:
    """The process's bridge for background work at this niceness (None: the caller's)."""
    with _bridges_lock:
        bridge = _bridges.get(nice)
        if bridge is None:
            bridge = _bridges[nice] = Bridge(nice=nice)
        return bridge


default_bridge = shared_bridge()
"""The bridge of :mod:`streamckpt.sync` and of checkpoints with default settings."""


# ---------------------------------------------------------------------------------------------
# The one exit wait.

_exit_bridges: set[Bridge] = set()
_exit_lock = threading.Lock()
_exit_registered = False


def _register_exit_wait(bridge: Bridge) -> None:
    global _exit_registered
    with _exit_lock:
        _exit_bridges.add(bridge)
        if not _exit_registered:
            register = getattr(threading, "_register_atexit", None)
            try:
                if register is None:  # not CPython: the best hook left
                    import atexit

                    atexit.register(_wait_at_exit)
                else:
                    register(_wait_at_exit)
                _exit_registered = True
            except RuntimeError:  # already shutting down: the caller will be waited for below
                pass


def _wait_at_exit() -> None:
    """Let every background job finish before the interpreter goes; fail loudly if one did."""
    with _exit_lock:
        bridges = list(_exit_bridges)
    failures: list[Job] = []
    for bridge in bridges:
        pending = bridge.pending()
        if pending:
            print(
                f"streamckpt: waiting at exit for {len(pending)} background save(s) in flight: "
                + ", ".join(job.label for job in pending),
                file=sys.stderr,
                flush=True,
            )
        bridge.wait()
        # every failure nobody looked at: of the jobs just waited for (their done callbacks
        # may still be running), and of those that failed earlier (a save that fails fast,
        # long before the script ends)
        finished = {*pending, *bridge.failed()}
        failures += [job for job in finished if job.unseen_failure() is not None]
    for job in failures:
        error = job.unseen_failure()
        print(
            f"streamckpt: background save {job.label} failed: {type(error).__name__}: {error}",
            file=sys.stderr,
            flush=True,
        )
    if failures:
        sys.stdout.flush()
        os._exit(1)


# ---------------------------------------------------------------------------------------------
# Blocking twins: made from the async definitions, so they cannot drift from them.


def blocking(fn: Callable[P, Awaitable[T]]) -> Callable[P, T]:
    """The blocking twin of a coroutine function: same parameters, same documentation."""

    @functools.wraps(fn)
    def twin(*args: P.args, **kwargs: P.kwargs) -> T:
        return default_bridge.run(fn, *args, **kwargs)

    twin.__doc__ = f"Blocking :func:`{fn.__module__}.{fn.__qualname__}`.\n\n{fn.__doc__ or ''}"
    return twin


class BlockingTwin:
    """Base of the blocking faces of async classes; see :func:`blocking_method`."""

    __slots__ = ()

    def _twin_target(self) -> Any:
        """The async object whose methods the twins call."""
        raise NotImplementedError

    def _twin_run(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """Run one of the target's coroutines to completion (default: in the calling thread)."""
        return default_bridge.run(fn, *args, **kwargs)


def blocking_method(
    method: Callable[Concatenate[Any, P], Awaitable[T]],
) -> Callable[Concatenate[BlockingTwin, P], T]:
    """The blocking twin of an async method, for a :class:`BlockingTwin` subclass's body."""

    def twin(self: BlockingTwin, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._twin_run(method, self._twin_target(), *args, **kwargs)

    functools.update_wrapper(twin, method)
    return twin
