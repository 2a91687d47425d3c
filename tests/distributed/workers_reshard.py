"""Workers for test_reshard: Checkpoints of DTensors and sharded jax arrays, saved on one
topology and restored on another through ``Checkpoint.restore``."""

from __future__ import annotations

from typing import Any

import numpy as np

FULL_SHAPE = (12, 10)


def full() -> np.ndarray[Any, Any]:
    return np.arange(120, dtype=np.float32).reshape(FULL_SHAPE)


def dtensor_save(rank: int, world_size: int, *, prefix: str) -> str:
    """4 ranks, a (2, 2) mesh: w sharded over both axes, b replicated; one Checkpoint."""
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

    import streamckpt.sync
    from streamckpt.distributed import TorchCoordinator

    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    mesh = init_device_mesh("cpu", (2, 2))
    w = distribute_tensor(torch.from_numpy(full()), mesh, [Shard(0), Shard(1)])
    b = distribute_tensor(torch.arange(10, dtype=torch.float32), mesh, [Replicate(), Replicate()])
    ckpt = streamckpt.sync.Checkpoint(model={"w": w, "b": b})
    path = ckpt.save(prefix, coordinator=TorchCoordinator(timeout=60))
    dist.destroy_process_group()
    return str(path)


def dtensor_restore(rank: int, world_size: int, *, path: str) -> tuple[Any, ...]:
    """2 ranks, a (2,) mesh sharding w by columns: each restores only its columns."""
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

    import streamckpt.sync
    from streamckpt.distributed import TorchCoordinator

    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    mesh = init_device_mesh("cpu", (2,))
    w = distribute_tensor(torch.zeros(FULL_SHAPE), mesh, [Shard(1)])
    b = distribute_tensor(torch.zeros(10), mesh, [Replicate()])
    local = w.to_local()
    ckpt = streamckpt.sync.Checkpoint(model={"w": w, "b": b})
    status = ckpt.restore(path, coordinator=TorchCoordinator(timeout=60), replicated="broadcast")
    status.assert_consumed()
    same_storage = ckpt.model["w"].to_local().data_ptr() == local.data_ptr()
    gathered = ckpt.model["w"].full_tensor().numpy()
    dist.destroy_process_group()
    return (
        ckpt.model["w"].to_local().numpy().copy(),
        ckpt.model["b"].to_local().numpy().copy(),
        gathered,
        same_storage,
    )


def jax_reshard(rank: int, world_size: int, *, prefix: str) -> tuple[Any, ...]:
    """One process, 8 host devices: saved sharded (4, 2), restored sharded (2, 4) by columns."""
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    import streamckpt.sync

    devices = np.array(jax.devices()).reshape(4, 2)
    saved = jax.device_put(
        full(), NamedSharding(Mesh(devices, ("x", "y")), PartitionSpec("x", "y"))
    )
    path = streamckpt.sync.Checkpoint(model={"w": saved}).save(prefix)
    other = NamedSharding(Mesh(devices.reshape(2, 4), ("a", "b")), PartitionSpec("b", "a"))
    target = jax.device_put(np.zeros(FULL_SHAPE, np.float32), other)
    ckpt = streamckpt.sync.Checkpoint(model={"w": target})
    ckpt.restore(path).assert_consumed()
    restored = ckpt.model["w"]
    return (
        np.asarray(restored),
        restored.sharding == other,
        len(jax.devices()),
    )
