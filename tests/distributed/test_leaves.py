"""Sharded framework leaves as pieces: real DTensors on 4 gloo processes, real jax arrays
on 8 host devices, and Slice targets filled in place.

The launcher runs are module fixtures (one 4-process run for every DTensor case, one
process for every jax case): starting torch or jax dominates the time, not the cases.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from support.processes import run_workers, values

from streamckpt.distributed.leaves import fill, local_boxes, local_slices
from streamckpt.errors import NamingError, UnsupportedError
from streamckpt.sharding import Box, Slice, box_intersection, box_shape, full_box

# name -> (mesh shape, full shape, save placements, restore placements)
DTENSOR_CASES: dict[str, tuple[Any, ...]] = {
    "rows_uneven": ((4,), (10, 6), (("S", 0),), (("S", 1),)),  # 3,3,3,1 rows; restore: 2,2,2,0
    "cols_with_empty": ((4,), (8, 6), (("S", 1),), (("S", 0),)),  # 2,2,2,0 columns
    "rows_two_empty": ((4,), (2, 5), (("S", 0),), (("R",),)),  # 1,1,0,0 rows
    "vector": ((4,), (7,), (("S", 0),), (("S", 0),)),
    "replicated": ((4,), (5, 3), (("R",),), (("S", 0),)),
    "grid": ((2, 2), (10, 7), (("S", 0), ("S", 1)), (("S", 1), ("S", 0))),
    "replicate_then_shard": ((2, 2), (9, 4), (("R",), ("S", 0)), (("S", 0), ("S", 0))),
    "nested_same_dim": ((2, 2), (10, 3), (("S", 0), ("S", 0)), (("R",), ("S", 1))),  # 3,2,3,2
    "nested_with_empty": ((2, 2), (3, 2), (("S", 0), ("S", 0)), (("S", 1), ("R",))),  # 1,1,1,0
    "cols_then_rows_3d": ((2, 2), (5, 3, 2), (("S", 1), ("S", 0)), (("S", 2), ("S", 1))),
}

# name -> (full shape, save PartitionSpec, restore PartitionSpec) over mesh ("x": 4, "y": 2)
JAX_CASES: dict[str, tuple[Any, ...]] = {
    "rows_over_x": ((8, 4), ("x", None), ("y", "x")),  # replicated over "y"
    "grid": ((8, 6), ("x", "y"), (None, "y")),
    "replicated": ((4, 3), (), ("x",)),
    "cols_over_y": ((5, 4), (None, "y"), ()),
    "flat_over_both": ((16,), (("x", "y"),), ("y",)),
}
# copies of a box among replica-0 shards of the save spec: one per distinct box
JAX_PIECES = {"rows_over_x": 4, "grid": 8, "replicated": 1, "cols_over_y": 2, "flat_over_both": 8}


def full_array(shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
    return np.arange(math.prod(shape), dtype=np.float32).reshape(shape)


def index(box: Box) -> tuple[slice, ...]:
    return tuple(slice(lo, hi) for lo, hi in box)


def assert_tiles(boxes: list[Box], shape: tuple[int, ...]) -> None:
    """The distinct non-empty boxes cover ``shape`` exactly: inside it, no overlap, no gap."""
    distinct = sorted({b for b in boxes if math.prod(box_shape(b)) > 0})
    for b in distinct:
        assert box_intersection(b, full_box(shape)) == b, (b, shape)
    for i, a in enumerate(distinct):
        for b in distinct[i + 1 :]:
            assert box_intersection(a, b) is None, (a, b)
    assert sum(math.prod(box_shape(b)) for b in distinct) == math.prod(shape), distinct


# --- torch DTensor on 4 real processes ------------------------------------------------------


@pytest.fixture(scope="module")
def dtensor_runs() -> list[dict[str, Any]]:
    results = run_workers(
        "workers_leaves:dtensor_cases", 4, kwargs={"cases": DTENSOR_CASES}, timeout=100
    )
    return values(results)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(DTENSOR_CASES))
def test_dtensor_pieces_tile_and_hold_their_box(
    dtensor_runs: list[dict[str, Any]], case: str
) -> None:
    mesh_shape, shape, save, _ = DTENSOR_CASES[case]
    full = full_array(shape)
    boxes = []
    for rank in dtensor_runs:
        got = rank[case]
        (piece,) = got["slices"]  # every rank gives its piece, an empty one too
        box, full_shape, value = piece
        assert full_shape == shape
        assert value.shape == box_shape(box)
        np.testing.assert_array_equal(value, full[index(box)])
        if got["torch_box"] is not None:  # torch's own (private) arithmetic agrees
            assert box == got["torch_box"]
        boxes.append(box)
    assert_tiles(boxes, shape)
    # replicas all given: each non-empty box once per rank along the replicated mesh dims
    replicas = math.prod(n for n, p in zip(mesh_shape, save, strict=True) if p[0] == "R")
    held = Counter(b for b in boxes if math.prod(box_shape(b)) > 0)
    assert set(held.values()) == {replicas}, held


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(DTENSOR_CASES))
def test_dtensor_restore_fills_the_local_tensor_in_place(
    dtensor_runs: list[dict[str, Any]], case: str
) -> None:
    _, shape, _, _ = DTENSOR_CASES[case]
    full = full_array(shape)
    for rank in dtensor_runs:
        got = rank[case]
        assert got["restored_is_target"] and got["restored_in_place"]
        boxes = got["restore_boxes"]
        assert len(boxes) <= 1  # one local tensor; none listed when it is empty
        local = got["restored_local"]
        assert local.dtype == np.float64  # the target's dtype, filled from float32 pieces
        if boxes:
            np.testing.assert_array_equal(local, full[index(boxes[0])])
        else:
            assert local.size == 0
        np.testing.assert_array_equal(got["restored_full"], full)  # gathered from every rank


@pytest.mark.slow
def test_dtensor_bfloat16_and_refusals(dtensor_runs: list[dict[str, Any]]) -> None:
    full = full_array((6, 4))
    boxes = []
    for rank in dtensor_runs:
        (piece,) = rank["bfloat16"]["slices"]
        box, dtype, value = piece
        assert dtype == "torch.bfloat16" and value.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(value.astype(np.float32), full[index(box)])
        boxes.append(box)
        np.testing.assert_array_equal(rank["bfloat16"]["restored_full"], full)

        errors = rank["errors"]
        assert (
            errors["partial"].startswith("UnsupportedError") and "redistribute" in errors["partial"]
        )
        assert errors["float_into_int"].startswith("NamingError")
        assert "float32" in errors["float_into_int"] and "int32" in errors["float_into_int"]
        assert errors["wrong_shape"].startswith("NamingError")
        assert errors["too_many_pieces"].startswith("NamingError")
        assert rank["plain_tensor"] == (None, None)
    assert_tiles(boxes, (6, 4))


# --- jax on 8 host devices ----------------------------------------------------------------


@pytest.fixture(scope="module")
def jax_run() -> dict[str, Any]:
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    results = run_workers(
        "workers_leaves:jax_cases", 1, kwargs={"cases": JAX_CASES}, env=env, timeout=100
    )
    (got,) = values(results)
    return dict(got)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(JAX_CASES))
def test_jax_replica0_shards_tile_and_restore_into_another_sharding(
    jax_run: dict[str, Any], case: str
) -> None:
    shape = JAX_CASES[case][0]
    full = full_array(shape)
    got = jax_run[case]
    boxes = []
    for box, full_shape, kind, value in got["slices"]:
        assert full_shape == shape and kind == "ArrayImpl"  # shard.data: one device's array
        np.testing.assert_array_equal(value, full[index(box)])
        boxes.append(box)
    assert len(boxes) == len(set(boxes)) == JAX_PIECES[case]  # only replica 0 of each box
    assert_tiles(boxes, shape)

    restore_boxes = got["restore_boxes"]
    assert len(restore_boxes) == len(set(restore_boxes))  # replicas of an index share a read
    assert_tiles(restore_boxes, shape)
    assert got["same_sharding"] and got["restored_dtype"] == "bfloat16"
    np.testing.assert_array_equal(got["restored"], full)
    assert len(got["shards"]) == got["restore_devices"] == 8
    for shard_index, data in got["shards"]:
        np.testing.assert_array_equal(data.astype(np.float32), full[shard_index])


@pytest.mark.slow
def test_jax_refusals_and_single_device(jax_run: dict[str, Any]) -> None:
    assert jax_run["refused"].startswith("NamingError") and "int32" in jax_run["refused"]
    assert jax_run["single_device"] == (None, None)


# --- in this process: what is not sharded, and Slice targets ----------------------------------


def test_plain_values_are_not_sharded_leaves() -> None:
    assert local_slices(np.zeros(3)) is None
    assert local_boxes(np.zeros(3)) is None
    assert local_slices(3.0) is None
    with pytest.raises(UnsupportedError):
        fill(np.zeros(3), [np.zeros(3)])


def test_a_numpy_slice_is_filled_in_place_with_a_cast() -> None:
    value = np.zeros((2, 3), np.float32)
    target = Slice(value, full_shape=(5, 3), offset=(2, 0))
    assert local_boxes(target) == [((2, 4), (0, 3))]
    piece = np.arange(6, dtype=np.float64).reshape(2, 3)
    assert fill(target, [piece]) is target
    assert target.value is value and value.dtype == np.float32
    np.testing.assert_array_equal(value, piece)
    with pytest.raises(NamingError, match="complex128"):
        fill(target, [piece.astype(np.complex128)])
    with pytest.raises(NamingError, match=r"\[3, 2\]"):
        fill(target, [piece.reshape(3, 2)])


def test_an_empty_slice_asks_for_nothing() -> None:
    target = Slice(np.zeros((0, 3)), full_shape=(4, 3), offset=(4, 0))
    assert local_boxes(target) == []
    assert fill(target, []) is target


def test_a_torch_slice_is_filled_in_place_bfloat16_too() -> None:
    torch = pytest.importorskip("torch")
    for dtype in (torch.float32, torch.bfloat16):
        tensor = torch.zeros(3, 2, dtype=dtype, requires_grad=True)
        target = Slice(tensor, full_shape=(3, 4), offset=(0, 2))
        (box,) = local_boxes(target) or []
        piece = full_array((3, 4))[index(box)]
        fill(target, [piece])
        assert target.value is tensor and tensor.dtype == dtype and tensor.requires_grad
        np.testing.assert_array_equal(tensor.detach().float().numpy(), piece)
    assert local_slices(torch.ones(2)) is None and local_boxes(torch.ones(2)) is None
    with pytest.raises(NamingError):
        fill(Slice(torch.zeros(2, dtype=torch.int64), full_shape=(2,)), [np.ones(2)])
