"""A save and a load cancelled at each of their checkpoints in turn, not at random.

A dry run counts the steps of every task the operation starts (each step ends at an await that
yields to the loop, see ``support.injection.CheckpointCounter``); then the operation runs once
per step, cancelled there. Every run ends within a bound, with no file descriptor, temp file or
claim left; a cancelled save leaves either no checkpoint at its prefix or a whole one (when the
cancellation came after its commit point), and an earlier checkpoint beside it intact.
Thread timing varies the count a little between runs; the campaign covers the dry run's count
and a few steps more.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import fsspec
import numpy as np
import pytest
from support.injection import CheckpointCounter, open_fds

import streamckpt

pytestmark = pytest.mark.anyio

BOUND_S = 20.0


def tensors(seed: int) -> dict[str, np.ndarray[Any, Any]]:
    rng = np.random.default_rng(seed)
    return {
        f"layer{i}/w": rng.integers(0, 2**31, size=30_000 + 991 * i, dtype=np.int32)
        for i in range(6)
    }


async def run_counted(fn: Callable[[], Awaitable[Any]], cancel_at: int | None) -> tuple[int, bool]:
    """Run ``fn`` in a fresh task, cancelled at step ``cancel_at``: (steps, whether it finished)."""
    finished = False
    with anyio.fail_after(BOUND_S):
        with anyio.CancelScope() as scope:
            counter = CheckpointCounter(cancel_at, scope.cancel)
            counter.install()
            try:
                async with anyio.create_task_group() as tg:

                    async def body() -> None:
                        nonlocal finished
                        await fn()
                        finished = True

                    tg.start_soon(body)
            finally:
                counter.uninstall()
    return counter.steps, finished


async def exact(prefix: str, expected: dict[str, np.ndarray[Any, Any]]) -> bool:
    loaded = await streamckpt.load(prefix)
    return sorted(loaded) == sorted(expected) and all(
        loaded[n].tobytes() == v.tobytes() for n, v in expected.items()
    )


class Place:
    """Local disk or memory://: where the campaign's checkpoints go, and what is left there."""

    def __init__(self, kind: str, root: Path) -> None:
        self.kind = kind
        self.root = root
        self.fs = fsspec.filesystem("memory")

    def prefix(self, run: int, name: str) -> str:
        if self.kind == "memory":
            return f"memory://{self.root}/{run}/{name}"
        return str(self.root / str(run) / name)

    def names(self, run: int) -> list[str]:
        if self.kind == "memory":
            path = f"{self.root}/{run}"
            return [p.rsplit("/", 1)[-1] for p in self.fs.ls(path, detail=False)]
        return os.listdir(self.root / str(run))


@pytest.mark.parametrize("kind", ["local", "memory"])
async def test_save_cancelled_at_every_checkpoint(tmp_path: Path, kind: str) -> None:
    place = Place(kind, tmp_path)

    async def prepare(run: int) -> tuple[str, str]:
        earlier, prefix = place.prefix(run, "ckpt-1"), place.prefix(run, "ckpt-2")
        await streamckpt.save(earlier, tensors(1), num_shards=2)
        return earlier, prefix

    def save(prefix: str) -> Callable[[], Awaitable[Any]]:
        return lambda: streamckpt.save(prefix, tensors(2), num_shards=3, chunk_bytes=32 << 10)

    _, prefix = await prepare(0)
    total, finished = await run_counted(save(prefix), None)
    assert finished and total >= 10
    outcomes = {"cancelled, nothing left": 0, "cancelled after commit, whole": 0, "saved": 0}
    for k in range(1, total + 6):
        earlier, prefix = await prepare(k)
        fds = open_fds()
        _, finished = await run_counted(save(prefix), k)
        names = place.names(k)
        assert not [n for n in names if ".tmp-" in n or n.endswith(".claim")], (k, names)
        if "ckpt-2.index" in names:
            assert await exact(prefix, tensors(2)), k
            outcomes["saved" if finished else "cancelled after commit, whole"] += 1
        else:
            assert not finished, k
            assert not [n for n in names if n.startswith("ckpt-2.")], (k, names)
            outcomes["cancelled, nothing left"] += 1
        assert await exact(earlier, tensors(1)), k
        if kind == "local":
            assert open_fds() <= fds, k
    print(f"{kind}: {total} checkpoints, {total + 5} cancellations: {outcomes}")
    assert outcomes["cancelled, nothing left"] > total // 2


@pytest.mark.parametrize("kind", ["local", "memory"])
async def test_load_cancelled_at_every_checkpoint(tmp_path: Path, kind: str) -> None:
    place = Place(kind, tmp_path)
    prefix = place.prefix(0, "ckpt")
    await streamckpt.save(prefix, tensors(3), num_shards=3)
    total, finished = await run_counted(lambda: streamckpt.load(prefix), None)
    assert finished and total >= 4
    for k in range(1, total + 6):
        fds = open_fds()
        await run_counted(lambda: streamckpt.load(prefix), k)
        if kind == "local":
            assert open_fds() <= fds, k
    assert await exact(prefix, tensors(3))
