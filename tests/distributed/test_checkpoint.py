"""Checkpoint with a coordinator: one object-based checkpoint from many processes, restored
on another number of processes with another sharding, and by TensorFlow.

In-process "processes" (``support.local_group``) keep this fast; the real engines are in
``test_multiprocess_save.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support.local_group import LocalGroup, run_ranks

import streamckpt
from streamckpt.checkpoint._restore import restore_tree
from streamckpt.errors import ValueMismatchError

pytestmark = pytest.mark.anyio

EMB = np.arange(1000 * 48, dtype=np.float32).reshape(1000, 48)
BIAS = np.linspace(0, 1, 48).astype(np.float32)


def tree_of(rank: int, world: int, *, by: str = "rows") -> dict[str, Any]:
    """``rank``'s part of the model: emb cut into ``world`` pieces by rows or columns."""
    if by == "rows":
        bounds = np.linspace(0, 1000, world + 1).astype(int)
        lo, hi = bounds[rank], bounds[rank + 1]
        piece = streamckpt.Slice(EMB[lo:hi].copy(), full_shape=EMB.shape, offset=(lo, 0))
    else:
        bounds = np.linspace(0, 48, world + 1).astype(int)
        lo, hi = bounds[rank], bounds[rank + 1]
        piece = streamckpt.Slice(EMB[:, lo:hi].copy(), full_shape=EMB.shape, offset=(0, lo))
    return {"model": {"emb": piece, "bias": BIAS.copy()}, "step": np.int64(7)}


def empty_tree_of(rank: int, world: int, *, by: str) -> dict[str, Any]:
    tree = tree_of(rank, world, by=by)
    piece = tree["model"]["emb"]
    piece.value[...] = 0
    tree["model"]["bias"] = np.zeros_like(BIAS)
    tree["step"] = np.zeros((), np.int64)
    return tree


async def save_on(tmp_path: Path, world: int, *, background: bool = False) -> str:
    group = LocalGroup(world)

    async def work(rank: int, coordinator: Any) -> str:
        ckpt = streamckpt.Checkpoint(**tree_of(rank, world))
        if background:
            handle = ckpt.save_async(str(tmp_path / "ckpt"), coordinator=coordinator)
            # the snapshot is taken: the leaves may change at once
            ckpt.model["emb"].value[...] = -1
            ckpt.model["bias"][...] = -1
            saved = await handle
            ckpt.close()
            return str(saved)
        return await ckpt.save(str(tmp_path / "ckpt"), coordinator=coordinator)

    paths = await run_ranks(group, work)
    assert all(path == paths[0] for path in paths), paths
    return str(paths[0])


@pytest.mark.parametrize("background", [False, True])
async def test_four_processes_one_object_checkpoint(tmp_path: Path, background: bool) -> None:
    path = await save_on(tmp_path, 4, background=background)
    nested = await streamckpt.load_nested(path)
    assert np.array_equal(nested["model"]["emb"], EMB)
    assert np.array_equal(nested["model"]["bias"], BIAS)
    assert int(nested["step"]) == 7 and int(nested["save_counter"]) == 1
    async with streamckpt.open(path) as reader:
        # the object graph and bias were written once, emb in 4 pieces
        emb = next(k for k in reader.entries if k.startswith("model/emb"))
        assert len(reader.entries[emb].slices) == 4


@pytest.mark.parametrize(("world", "by"), [(1, "rows"), (2, "cols"), (3, "rows"), (3, "cols")])
async def test_resharding_restore_fetches_only_each_part(
    tmp_path: Path, world: int, by: str
) -> None:
    path = await save_on(tmp_path, 4)
    group = LocalGroup(world)
    index_bytes = (tmp_path / "ckpt-1.index").stat().st_size

    async def work(rank: int, coordinator: Any) -> tuple[dict[str, Any], float]:
        tree = empty_tree_of(rank, world, by=by)
        async with streamckpt.open(path) as reader:
            graph_bytes = reader.entries["_CHECKPOINTABLE_OBJECT_GRAPH"].size
            before = reader.stats["bytes_read"]
            status, counter = await restore_tree(
                reader,
                tree,
                expect_counter=True,
                coordinator=coordinator,
                replicated="broadcast",
            )
            status.assert_consumed()
            assert counter == 1
            return tree, reader.stats["bytes_read"] - before - graph_bytes

    results = await run_ranks(group, work)
    for rank, (tree, fetched) in enumerate(results):
        piece = tree["model"]["emb"]
        lo = piece.offset
        hi = tuple(o + n for o, n in zip(piece.offset, piece.shape, strict=True))
        assert np.array_equal(piece.value, EMB[lo[0] : hi[0], lo[1] : hi[1]])
        assert np.array_equal(tree["model"]["bias"], BIAS)
        assert int(tree["step"]) == 7
        own = piece.value.nbytes
        # its part (plus the object graph every process reads to match its tree), and on
        # the primary the values it reads for all (bias, step, save_counter); the index came
        # with the open; per-request alignment: none on local disk
        extra = BIAS.nbytes + 8 + 8 if rank == 0 else 0
        assert fetched <= own + extra, (rank, fetched, own)
    assert index_bytes > 0


async def test_replicated_read_by_all(tmp_path: Path) -> None:
    path = await save_on(tmp_path, 4)
    group = LocalGroup(2)

    async def work(rank: int, coordinator: Any) -> dict[str, Any]:
        ckpt = streamckpt.Checkpoint(**empty_tree_of(rank, 2, by="rows"))
        status = await ckpt.restore(path, coordinator=coordinator)  # replicated="read"
        status.assert_consumed()
        assert ckpt.save_counter == 1
        return ckpt.model

    models = await run_ranks(group, work)
    for model in models:
        assert np.array_equal(model["bias"], BIAS)
    assert np.array_equal(np.concatenate([m["emb"].value for m in models]), EMB)


async def test_a_slice_of_the_wrong_full_shape_restores_nothing(tmp_path: Path) -> None:
    path = await save_on(tmp_path, 2)
    tree = empty_tree_of(0, 1, by="rows")
    wrong = streamckpt.Slice(np.zeros((10, 48), np.float32), full_shape=(999, 48), offset=(0, 0))
    tree["model"]["emb"] = wrong
    ckpt = streamckpt.Checkpoint(**tree)
    with pytest.raises(ValueMismatchError) as caught:
        await ckpt.restore(path)
    assert "[1000, 48]" in str(caught.value)
    assert not ckpt.model["bias"].any()  # all or nothing


@pytest.mark.tf
async def test_tensorflow_restores_the_variables(tmp_path: Path) -> None:
    tf = pytest.importorskip("tensorflow")
    path = await save_on(tmp_path, 4)
    model = tf.Module()
    model.emb = tf.Variable(tf.zeros((1000, 48)))
    model.bias = tf.Variable(tf.zeros((48,)))
    root = tf.train.Checkpoint(model=model, step=tf.Variable(0, dtype=tf.int64))
    root.restore(path).assert_consumed()
    assert np.array_equal(model.emb.numpy(), EMB)
    assert np.array_equal(model.bias.numpy(), BIAS)
    assert int(root.step.numpy()) == 7
    reader = tf.train.load_checkpoint(path)
    assert np.array_equal(reader.get_tensor("model/emb/.ATTRIBUTES/VARIABLE_VALUE"), EMB)
