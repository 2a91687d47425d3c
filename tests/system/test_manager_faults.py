"""A manager save on local disk with each of its system calls failing in turn, with each errno.

A manager save is a checkpoint save, then the pending-deletions record, the metrics sidecar
and the state file (each written atomically), then deletions. With every one of those calls
failing in turn (counted in a dry run), the save ends within a bound either in a
``StreamCkptError`` that keeps the errno, or in success; and either way:

* the state file parses, and every checkpoint it names loads bit-exact (the one the failed
  save was writing is named only if it is whole);
* the checkpoint saved before is intact and named;
* no temp file, no claim and no file descriptor is left behind;
* a fresh manager on the directory restores the newest whole checkpoint, and its next save
  reclaims whatever the failure left (the deletion record, half-deleted checkpoints).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from support.injection import LOCAL_SAVE_MODULES, SyscallFaults, open_fds

import streamckpt
from streamckpt.errors import StreamCkptError

pytestmark = pytest.mark.anyio

ERRNOS = (errno.EIO, errno.ENOSPC, errno.EROFS)
KINDS = ("open", "write", "fsync", "close", "link", "unlink", "mkdir")
BOUND_S = 20.0


def model(step: int) -> dict[str, Any]:
    return {"w": np.arange(4096, dtype=np.float32) + step, "b": np.full(7, step, np.int64)}


def manager_for(directory: Path, tree: dict[str, Any]) -> streamckpt.CheckpointManager:
    return streamckpt.CheckpointManager(streamckpt.Checkpoint(model=tree), directory, max_to_keep=1)


async def managed_save(directory: Path, faults: SyscallFaults | None, step: int) -> Any:
    manager = manager_for(directory, model(step))
    await manager.reload()
    if faults is not None:
        for module in LOCAL_SAVE_MODULES:
            module.os = faults  # type: ignore[attr-defined]
    try:
        with anyio.fail_after(BOUND_S):
            return await manager.save(step=step)
    finally:
        for module in LOCAL_SAVE_MODULES:
            module.os = os  # type: ignore[attr-defined]


async def assert_directory_whole(directory: Path, *, must_name: int) -> None:
    listed = streamckpt.latest_checkpoint  # the state file, read as TensorFlow reads it
    latest = await listed(directory)
    assert latest is not None
    manager = manager_for(directory, model(0))
    await manager.reload()
    assert f"{directory}/ckpt-{must_name}" in manager.checkpoints or latest.endswith(
        f"ckpt-{must_name + 1}"
    )
    for path in manager.checkpoints:
        step = int(path.rsplit("-", 1)[1])
        loaded = await streamckpt.load(path)
        expected = model(step)
        for key in ("w", "b"):
            stored = loaded[f"model/{key}/.ATTRIBUTES/VARIABLE_VALUE"]
            assert stored.tobytes() == expected[key].tobytes(), (path, key)
    leftovers = [n for n in os.listdir(directory) if ".tmp-" in n or n.endswith(".claim")]
    assert leftovers == []


async def count_calls(tmp_path: Path) -> int:
    directory = tmp_path / "dry"
    await managed_save(directory, None, 1)
    faults = SyscallFaults(fail_at=None, error=errno.EIO, kinds=KINDS)
    await managed_save(directory, faults, 2)
    return len(faults.calls)


async def test_every_system_call_of_a_manager_save_failing(tmp_path: Path) -> None:
    calls = await count_calls(tmp_path)
    assert calls > 10  # the save, three small files and the deletions
    outcomes: dict[str, int] = {"failed": 0, "saved": 0}
    for error in ERRNOS:
        for fail_at in range(1, calls + 1):
            directory = tmp_path / f"run-{error}-{fail_at}"
            await managed_save(directory, None, 1)
            fds = open_fds()
            faults = SyscallFaults(fail_at=fail_at, error=error, kinds=KINDS)
            try:
                await managed_save(directory, faults, 2)
            except StreamCkptError as exc:
                outcomes["failed"] += 1
                assert faults.fired is not None
                assert exc.uri is not None, exc
                kept = [e for e in _chain(exc) if isinstance(e, OSError) and e.errno == error]
                assert kept, f"errno {error} lost: {exc!r}"
            else:
                outcomes["saved"] += 1
            assert open_fds() <= fds, faults.fired
            await assert_directory_whole(directory, must_name=1)
            # A restarted job resumes from a whole checkpoint and cleans up on its next save.
            resumed = manager_for(directory, model(0))
            assert await resumed.restore_or_initialize() is not None
            await resumed.save(step=3)
            names = sorted(os.listdir(directory))
            assert "checkpoint.deleting.json" not in names
            assert [n for n in names if n.endswith(".index")] == ["ckpt-3.index"], names
    assert outcomes["failed"] > 0  # the campaign did reach failures, not only harmless calls


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(seen) < 10:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen
