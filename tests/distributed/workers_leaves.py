"""Worker functions for test_leaves: real DTensors over gloo, real multi-device jax arrays.

Every full tensor is ``arange`` of its shape, so any box of it is known to the test without
shipping the full tensor back. Workers return plain tuples and numpy arrays.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def full_array(shape: tuple[int, ...], dtype: Any = np.float32) -> np.ndarray[Any, Any]:
    return np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape).astype(dtype)


def _box_index(box: Any) -> tuple[slice, ...]:
    return tuple(slice(lo, hi) for lo, hi in box)


def dtensor_cases(rank: int, world_size: int, *, cases: dict[str, Any]) -> dict[str, Any]:
    """Save and restore every case on this rank over gloo; what each gave.

    ``cases``: name -> (mesh shape, full shape, save placements, restore placements), a
    placement written ``("S", dim)`` or ``("R",)``. Every mesh is over all ``world_size`` ranks.
    """
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import (
        DTensor,
        Partial,
        Replicate,
        Shard,
        distribute_tensor,
        init_device_mesh,
    )

    from streamckpt.distributed.leaves import fill, local_boxes, local_slices
    from streamckpt.errors import NamingError, UnsupportedError
    from streamckpt.frameworks import torch_to_numpy

    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    except ImportError:  # private: only a second opinion when this torch has it
        compute_local_shape_and_global_offset = None

    assert world_size == 4
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    meshes = {shape: init_device_mesh("cpu", shape) for shape in [(4,), (2, 2)]}

    def placements(spec: tuple[Any, ...]) -> list[Any]:
        return [Shard(p[1]) if p[0] == "S" else Replicate() for p in spec]

    out: dict[str, Any] = {}
    for name, (mesh_shape, shape, save, restore) in cases.items():
        mesh = meshes[mesh_shape]
        full = full_array(shape)
        dtensor = distribute_tensor(torch.from_numpy(full), mesh, placements(save))
        slices = local_slices(dtensor)
        assert slices is not None
        torch_box = None
        if compute_local_shape_and_global_offset is not None:
            local_shape, offset = compute_local_shape_and_global_offset(
                dtensor.shape, mesh, dtensor.placements
            )
            torch_box = tuple((o, o + n) for o, n in zip(offset, local_shape, strict=True))

        # restore into a float64 DTensor laid out otherwise, from float32 pieces of the full
        target = distribute_tensor(
            torch.zeros(shape, dtype=torch.float64), mesh, placements(restore)
        )
        local_before = target.to_local()
        boxes = local_boxes(target)
        assert boxes is not None
        restored = fill(target, [full[_box_index(box)] for box in boxes])
        out[name] = {
            "slices": [(s.box, s.full_shape, torch_to_numpy(s.value).copy()) for s in slices],
            "torch_box": torch_box,
            "restore_boxes": boxes,
            "restored_is_target": restored is target,
            "restored_local": torch_to_numpy(target.to_local()).copy(),
            "restored_in_place": target.to_local().data_ptr() == local_before.data_ptr(),
            "restored_full": target.full_tensor().numpy(),  # a collective: every rank's fill
        }

    # bfloat16: saved as its bits' ml_dtypes view, restored from float32 pieces
    mesh = meshes[(2, 2)]
    full = full_array((6, 4))
    bf16 = distribute_tensor(torch.from_numpy(full).bfloat16(), mesh, [Shard(0), Shard(1)])
    bf_slices = local_slices(bf16)
    assert bf_slices is not None
    bf_target = distribute_tensor(torch.zeros(6, 4, dtype=torch.bfloat16), mesh, [Shard(1)] * 2)
    bf_boxes = local_boxes(bf_target)
    assert bf_boxes is not None
    fill(bf_target, [full[_box_index(box)] for box in bf_boxes])
    out["bfloat16"] = {
        "slices": [(s.box, str(s.value.dtype), torch_to_numpy(s.value).copy()) for s in bf_slices],
        "restored_full": bf_target.full_tensor().float().numpy(),
    }

    # what must be refused
    int_target = distribute_tensor(torch.zeros(6, 4, dtype=torch.int32), mesh, [Shard(1)] * 2)
    (int_box,) = local_boxes(int_target) or [((0, 0), (0, 0))]
    int_shape = tuple(hi - lo for lo, hi in int_box)
    partial = DTensor.from_local(torch.ones(4, 2), mesh, [Partial(), Shard(0)])
    errors: dict[str, str] = {}
    for what, call in [
        ("partial", lambda: local_slices(partial)),
        ("float_into_int", lambda: fill(int_target, [np.zeros(int_shape, np.float32)])),
        ("wrong_shape", lambda: fill(int_target, [np.zeros((1, 1), np.int32)])),
        ("too_many_pieces", lambda: fill(int_target, [np.zeros(int_shape, np.int32)] * 2)),
    ]:
        try:
            call()
        except (UnsupportedError, NamingError) as exc:
            errors[what] = f"{type(exc).__name__}: {exc}"
        else:
            errors[what] = "no error"
    out["errors"] = errors
    out["plain_tensor"] = local_slices(torch.ones(3)), local_boxes(torch.ones(3))
    dist.barrier()
    return out


def jax_cases(rank: int, world_size: int, *, cases: dict[str, Any]) -> dict[str, Any]:
    """Save and restore every case on a (4, 2) mesh of 8 host devices; what each gave.

    ``cases``: name -> (full shape, save spec, restore spec), a spec being the
    ``PartitionSpec`` arguments over mesh axes ``("x", "y")``.
    """
    import jax
    import ml_dtypes
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from streamckpt.distributed.leaves import fill, local_boxes, local_slices
    from streamckpt.errors import NamingError

    devices = jax.devices()
    assert len(devices) == 8, devices
    mesh = Mesh(np.array(devices).reshape(4, 2), ("x", "y"))

    def sharding(spec: tuple[Any, ...]) -> NamedSharding:
        return NamedSharding(mesh, PartitionSpec(*spec))

    out: dict[str, Any] = {}
    for name, (shape, save, restore) in cases.items():
        full = full_array(shape)
        array = jax.device_put(full, sharding(save))
        slices = local_slices(array)
        assert slices is not None
        target = jax.device_put(np.zeros(shape, ml_dtypes.bfloat16), sharding(restore))
        boxes = local_boxes(target)
        assert boxes is not None
        restored = fill(target, [full[_box_index(box)] for box in boxes])
        out[name] = {
            "slices": [
                (s.box, s.full_shape, type(s.value).__name__, np.asarray(s.value)) for s in slices
            ],
            "restore_boxes": boxes,
            "restore_devices": len(target.sharding.addressable_devices),
            "restored": np.asarray(restored).astype(np.float32),
            "restored_dtype": str(restored.dtype),
            "same_sharding": restored.sharding == target.sharding,
            "shards": [
                (shard.index, np.asarray(shard.data)) for shard in restored.addressable_shards
            ],
        }

    target = jax.device_put(np.zeros((8, 6), np.int32), sharding(("x", None)))
    try:
        fill(target, [np.zeros((2, 6), np.float32)] * 4)
        float_into_int = "no error"
    except NamingError as exc:
        float_into_int = f"{type(exc).__name__}: {exc}"
    single = jax.device_put(np.zeros(3), devices[0])
    out["refused"] = float_into_int
    out["single_device"] = local_slices(single), local_boxes(single)
    return out
