"""CheckpointManager with a coordinator: one publisher, one choice on restore.

In-process "processes" (``support.local_group``); what a broken manager would get wrong: a
state file written by several processes (or by none), old checkpoints deleted before the
commit or by every process, processes restoring different checkpoints.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support.local_group import LocalGroup, run_ranks

import streamckpt
from streamckpt.errors import CoordinationError

pytestmark = pytest.mark.anyio

FULL = np.arange(400 * 8, dtype=np.float32).reshape(400, 8)


def model_of(rank: int, world: int, scale: float = 1.0) -> dict[str, Any]:
    rows = 400 // world
    piece = (FULL[rows * rank : rows * (rank + 1)] * scale).astype(np.float32)
    return {"w": streamckpt.Slice(piece, full_shape=FULL.shape, offset=(rows * rank, 0))}


async def test_only_the_primary_publishes_and_deletes(tmp_path: Path) -> None:
    group = LocalGroup(4)
    writes: list[int] = []

    async def work(rank: int, coordinator: Any) -> list[str]:
        ckpt = streamckpt.Checkpoint(model=model_of(rank, 4))
        manager = streamckpt.CheckpointManager(
            ckpt, tmp_path, max_to_keep=2, coordinator=coordinator
        )
        for step in range(1, 4):
            ckpt.model["w"].value[...] = FULL[ckpt.model["w"].box[0][0] :][:100] * step
            if step == 2:
                handle = manager.save_async()
                assert handle is not None
                await handle
            else:
                await manager.save()
            if rank == 0:
                writes.append(os.stat(tmp_path / "checkpoint").st_mtime_ns)
        ckpt.close()
        return list(manager.checkpoints)

    views = await run_ranks(group, work)
    assert all(view == views[0] for view in views), views
    assert [os.path.basename(p) for p in views[0]] == ["ckpt-2", "ckpt-3"]
    names = sorted(os.listdir(tmp_path))
    assert not [n for n in names if n.startswith("ckpt-1.")]  # deleted, once
    assert "checkpoint" in names
    state = (tmp_path / "checkpoint").read_text()
    assert 'model_checkpoint_path: "ckpt-3"' in state
    loaded = await streamckpt.load_nested(str(tmp_path / "ckpt-3"))
    assert np.array_equal(loaded["model"]["w"], FULL * 3)


async def test_every_process_restores_the_primarys_choice(tmp_path: Path) -> None:
    group = LocalGroup(4)

    async def save(rank: int, coordinator: Any) -> None:
        ckpt = streamckpt.Checkpoint(model=model_of(rank, 4))
        manager = streamckpt.CheckpointManager(ckpt, tmp_path, coordinator=coordinator)
        for step in (1, 2):
            ckpt.model["w"].value[...] *= step
            await manager.save()

    await run_ranks(group, save)
    # the newest checkpoint is damaged: the primary's verification skips it
    (tmp_path / "ckpt-2.data-00001-of-00004").write_bytes(b"broken")
    two = LocalGroup(2)
    inits: list[int] = []

    async def restore(rank: int, coordinator: Any) -> tuple[str | None, np.ndarray[Any, Any]]:
        ckpt = streamckpt.Checkpoint(model=model_of(rank, 2, scale=0.0))
        manager = streamckpt.CheckpointManager(
            ckpt, tmp_path, coordinator=coordinator, init_fn=lambda: inits.append(rank)
        )
        path = await manager.restore_or_initialize()
        return path, ckpt.model["w"].value

    results = await run_ranks(two, restore)
    assert [os.path.basename(p or "") for p, _ in results] == ["ckpt-1", "ckpt-1"]
    assert np.array_equal(np.concatenate([v for _, v in results]), FULL)
    assert inits == []


async def test_nothing_to_restore_initializes_everywhere(tmp_path: Path) -> None:
    group = LocalGroup(3)
    inits: list[int] = []

    async def restore(rank: int, coordinator: Any) -> str | None:
        ckpt = streamckpt.Checkpoint(model={"b": np.zeros(3)})
        manager = streamckpt.CheckpointManager(
            ckpt, tmp_path, coordinator=coordinator, init_fn=lambda: inits.append(rank)
        )
        return await manager.restore_or_initialize()

    assert await run_ranks(group, restore) == [None, None, None]
    assert sorted(inits) == [0, 1, 2]


async def test_a_process_that_cannot_restore_fails_all(tmp_path: Path) -> None:
    group = LocalGroup(2)

    async def save(rank: int, coordinator: Any) -> None:
        ckpt = streamckpt.Checkpoint(model=model_of(rank, 2))
        await streamckpt.CheckpointManager(ckpt, tmp_path, coordinator=coordinator).save()

    await run_ranks(group, save)

    async def restore(rank: int, coordinator: Any) -> Any:
        model = model_of(rank, 2)
        if rank == 1:  # a tree that does not fit the checkpoint
            model["w"] = streamckpt.Slice(np.zeros((5, 8), np.float32), full_shape=(5, 8))
        ckpt = streamckpt.Checkpoint(model=model)
        manager = streamckpt.CheckpointManager(ckpt, tmp_path, coordinator=coordinator)
        return await manager.restore_or_initialize()

    results = await run_ranks(group, restore)
    assert isinstance(results[0], CoordinationError) and results[0].ranks == (1,)
    assert isinstance(results[1], streamckpt.ValueMismatchError)
