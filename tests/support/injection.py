"""Faults at every system call of the local store, and cancellation at every checkpoint.

``SyscallFaults`` stands in for the ``os`` module of the local store (``LOCAL_SAVE_MODULES``,
``patch_local_os``): every call
is the real one, counted; the ``fail_at``-th call of the kinds under test raises ``OSError``
with the chosen errno instead (the call is not made). A dry run with ``fail_at=None`` counts
the calls of an operation, so that a campaign can then fail each one in turn. A failing
``close`` still releases its descriptor first, as Linux's does.

``CheckpointCounter`` counts the steps of every asyncio task started while it is installed
(the save's own task and all its children: each step ends at an ``await`` that yields to the
loop) and cancels a scope at the ``cancel_at``-th, so a campaign can cancel a save at its 1st,
2nd, ... checkpoint in turn, not at random.
"""

from __future__ import annotations

import asyncio
import collections.abc
import contextlib
import os
import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import pytest

import streamckpt.storage.local
import streamckpt.storage.local_writer

# The modules whose ``os`` a local save calls: the store, and its shard writer.
LOCAL_SAVE_MODULES = (streamckpt.storage.local, streamckpt.storage.local_writer)


def patch_local_os(monkeypatch: pytest.MonkeyPatch, stand_in: Any) -> None:
    """``stand_in`` as ``os`` of every module of ``LOCAL_SAVE_MODULES`` (undone by pytest)."""
    for module in LOCAL_SAVE_MODULES:
        monkeypatch.setattr(module, "os", stand_in)


# System calls by kind, as the local store spells them.
KINDS: dict[str, tuple[str, ...]] = {
    "open": ("open",),
    "write": ("write", "writev", "pwrite", "pwritev", "ftruncate"),
    "fsync": ("fsync", "fdatasync"),
    "close": ("close",),
    "link": ("link", "rename", "replace"),
    "unlink": ("unlink", "remove"),
    "mkdir": ("mkdir", "makedirs"),
    "read": ("read", "pread", "preadv", "fstat", "stat", "listdir"),
}


@dataclass(frozen=True, slots=True)
class Call:
    """One system call the store made: its name and the path (or fd's path) it was about."""

    name: str
    path: str


class SyscallFaults:
    """A stand-in for ``os``: real calls, counted, and the ``fail_at``-th one failing."""

    def __init__(self, *, fail_at: int | None, error: int, kinds: tuple[str, ...]) -> None:
        self.fail_at = fail_at
        self.error = error
        self.names = {name for kind in kinds for name in KINDS[kind]}
        self.calls: list[Call] = []
        self.fired: Call | None = None
        self._lock = threading.Lock()
        self._paths: dict[int, str] = {}

    def _count(self, name: str, path: str) -> None:
        with self._lock:
            self.calls.append(Call(name, path))
            if self.fired is None and len(self.calls) == self.fail_at:
                self.fired = Call(name, path)
                raise OSError(self.error, os.strerror(self.error), path)

    def __getattr__(self, name: str) -> Any:
        real = getattr(os, name)
        if name not in self.names or not callable(real):
            return real

        def call(*args: Any, **kwargs: Any) -> Any:
            first = args[0] if args else None
            if isinstance(first, int) and name != "open":
                path = self._paths.get(first, f"fd {first}")
            else:
                path = os.fspath(first) if first is not None else ""
            if name == "close":
                # Linux releases the descriptor even when close fails: so does the fault
                with contextlib.suppress(OSError):
                    real(*args, **kwargs)
                self._count(name, path)
                return None
            self._count(name, path)
            result = real(*args, **kwargs)
            if name == "open":
                self._paths[result] = path
            return result

        return call


def open_fds() -> set[int]:
    """This process's open file descriptors.

    Compare with ``<=``: no descriptor may be added by the case under test, but unrelated ones
    (an earlier test's client collected meanwhile) may close during it.
    """
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


class _Counted(collections.abc.Coroutine[Any, Any, Any]):
    """A task's coroutine, whose every yield to the loop is counted."""

    def __init__(self, inner: Any, counter: CheckpointCounter) -> None:
        self._inner = inner
        self._counter = counter

    def send(self, value: Any) -> Any:
        result = self._inner.send(value)
        self._counter.tick()
        return result

    def throw(self, *args: Any) -> Any:
        result = self._inner.throw(*args)
        self._counter.tick()
        return result

    def close(self) -> None:
        self._inner.close()

    def __getattr__(self, name: str) -> Any:  # cr_running, cr_frame, ...: anyio inspects them
        return getattr(self._inner, name)

    def __await__(self) -> Generator[Any, None, Any]:
        return self._inner.__await__()  # type: ignore[no-any-return]


class CheckpointCounter:
    """Counts the steps of every task started while installed; calls ``cancel`` at one."""

    def __init__(self, cancel_at: int | None, cancel: Callable[[], None]) -> None:
        self.cancel_at = cancel_at
        self.steps = 0
        self.fired = False
        self._cancel = cancel
        self._installed: Any = None

    def tick(self) -> None:
        self.steps += 1
        if not self.fired and self.steps == self.cancel_at:
            self.fired = True
            self._cancel()

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        self._installed = loop.get_task_factory()

        def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> Any:
            return asyncio.Task(_Counted(coro, self), loop=loop, **kwargs)

        loop.set_task_factory(factory)

    def uninstall(self) -> None:
        asyncio.get_running_loop().set_task_factory(self._installed)
