"""Worker functions for ``test_multiprocess_save``: each runs in one process of a real job.

Every job saves pieces of the same checkpoint, :func:`full_tensors`, which the test computes
too (the values are made from a fixed seed, never shipped): rank ``r`` gives

* ``emb``: rows ``250r .. 250r + 250`` of a (1000, 48) float32 (NaN, -0.0 and inf inside);
* ``grid``: one cell of a 2 x 2 grid cut of a (7, 5) float32, uneven both ways;
* ``bias`` and ``step`` (an int64 scalar): the same on every rank, replicas written once;
* ``half``: a column block of a (5, 6) bfloat16, uneven, rank 3's block empty;
* ``pairs``: a list of two Slices, rows ``r`` and ``r + 4`` of an (8, 3) int32;
* ``rank{r}/rng``: a value of its own, under a name of its own.

Workers report what each save returned, or the error it raised as a small dict (type, ranks,
message, seconds), so the test can tell every rank's outcome apart.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

import anyio
import ml_dtypes
import numpy as np

import streamckpt
import streamckpt.sync
from streamckpt import Slice
from streamckpt.distributed.save import last_coordination

WORLD = 4
EMB_ROWS = 250
GRID_ROWS = ((0, 3), (3, 7))
GRID_COLS = ((0, 2), (2, 5))
HALF_COLS = ((0, 1), (1, 3), (3, 6), (6, 6))  # rank 3 holds an empty block

# name -> (mesh shape, full shape, placements as ("S", dim) / ("R",))
DTENSOR_CASES: dict[str, tuple[Any, ...]] = {
    "grid": ((2, 2), (10, 7), (("S", 0), ("S", 1))),  # 5 x (4, 3) cells
    "rep_shard": ((2, 2), (9, 4), (("R",), ("S", 0))),  # rows 5, 4; each replicated twice
    "rows_empty": ((4,), (3, 5), (("S", 0),)),  # 1, 1, 1, 0 rows
    "replicated": ((4,), (6,), (("R",),)),  # whole on every rank
}

# name -> (full shape, PartitionSpec over mesh ("x": 4, "y": 2) of 2 devices per process)
JAX_CASES: dict[str, tuple[Any, ...]] = {
    "j_grid": ((12, 6), ("x", "y")),  # 8 pieces, 2 per process
    "j_rows": ((8, 4), ("x", None)),  # replicated over "y": one piece per process
    "j_cols": ((5, 4), (None, "y")),  # replicated over "x": only process 0 gives it
    "j_whole": ((3, 3), ()),  # replicated everywhere: process 0 gives it whole
}


def full_tensors(world_size: int = WORLD, *, variant: int = 0) -> dict[str, np.ndarray[Any, Any]]:
    """The checkpoint every job writes in pieces, assembled (``variant``: other ``emb``
    values, the same structure)."""
    rng = np.random.default_rng(20240611)
    emb = rng.standard_normal((1000, 48), dtype=np.float32)
    emb[0, :3] = [np.nan, -0.0, np.inf]
    emb += np.float32(variant)
    out: dict[str, np.ndarray[Any, Any]] = {
        "emb": emb,
        "grid": rng.standard_normal((7, 5), dtype=np.float32),
        "bias": rng.standard_normal(48, dtype=np.float32),
        "step": np.array(1_234_567_890_123, dtype=np.int64),
        "half": rng.standard_normal((5, 6), dtype=np.float32).astype(ml_dtypes.bfloat16),
        "pairs": (np.arange(24, dtype=np.int32).reshape(8, 3) - 11) * 1_000_003,
    }
    for rank in range(world_size):
        out[f"rank{rank}/rng"] = rng.standard_normal((rank + 1, 3))
    return out


def dtensor_full(shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
    return (np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape) * 1.5) - 7


def jax_full(shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
    return np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape) * -0.25 + 3


def pieces(rank: int, *, as_torch: bool = False, variant: int = 0) -> dict[str, Any]:
    """What rank ``rank`` gives: Slices (torch tensors or numpy arrays), replicas, its own."""
    full = full_tensors(variant=variant)

    def value(array: np.ndarray[Any, Any]) -> Any:
        if not as_torch:
            return array
        import torch

        if array.dtype == ml_dtypes.bfloat16:
            return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
        return torch.from_numpy(array.copy())

    rows = GRID_ROWS[rank // 2]
    cols = GRID_COLS[rank % 2]
    lo, hi = HALF_COLS[rank]
    emb = full["emb"][EMB_ROWS * rank : EMB_ROWS * (rank + 1)]
    return {
        "emb": Slice(value(emb), full_shape=(1000, 48), offset=(EMB_ROWS * rank, 0)),
        "grid": Slice(
            value(full["grid"][rows[0] : rows[1], cols[0] : cols[1]]),
            full_shape=(7, 5),
            offset=(rows[0], cols[0]),
        ),
        "bias": full["bias"],
        "step": full["step"],
        "half": Slice(value(full["half"][:, lo:hi]), full_shape=(5, 6), offset=(0, lo)),
        "pairs": [
            Slice(full["pairs"][r : r + 1], full_shape=(8, 3), offset=(r, 0))
            for r in (rank, rank + 4)
        ],
        f"rank{rank}/rng": full[f"rank{rank}/rng"],
    }


IDLE_ROWS = ((0, 2), (2, 4), (4, 6), (6, 6))


def idle_full() -> dict[str, np.ndarray[Any, Any]]:
    return {"w": np.arange(24, dtype=np.float32).reshape(6, 4) / 3, "b": np.ones(4, np.int16)}


def idle_pieces(rank: int) -> dict[str, Any]:
    """Rows of ``w`` and replicas of ``b`` from ranks 0 to 2; rank 3 only an empty piece."""
    full = idle_full()
    lo, hi = IDLE_ROWS[rank]
    out: dict[str, Any] = {"w": Slice(full["w"][lo:hi], full_shape=(6, 4), offset=(lo, 0))}
    if rank != 3:
        out["b"] = full["b"]
    return out


def outcome(call: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """What ``call(*args, **kwargs)`` returned, or what it raised, as a picklable record."""
    started = time.monotonic()
    try:
        return {"info": call(*args, **kwargs), "seconds": time.monotonic() - started}
    except Exception as exc:
        return {
            "error": type(exc).__name__,
            "ranks": getattr(exc, "ranks", None),
            "message": str(exc),
            "seconds": time.monotonic() - started,
        }


def _save(prefix: str, tensors: Any, coordinator: Any, options: Any, **kw: Any) -> Any:
    async def main() -> Any:
        return await streamckpt.save(
            prefix, tensors, coordinator=coordinator, storage_options=options, **kw
        )

    return anyio.run(main)


# -- torch.distributed -----------------------------------------------------------------------


def _torch_init(rank: int, world_size: int, timeout: float) -> Any:
    import torch.distributed as dist

    from streamckpt.distributed import TorchCoordinator

    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    return TorchCoordinator(timeout=timeout)


def _dtensors(rank: int) -> dict[str, Any]:
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    meshes = {shape: init_device_mesh("cpu", shape) for shape in [(4,), (2, 2)]}
    out = {}
    for name, (mesh, shape, spec) in DTENSOR_CASES.items():
        placements = [Shard(p[1]) if p[0] == "S" else Replicate() for p in spec]
        full = torch.from_numpy(dtensor_full(shape))
        out[f"dt/{name}"] = distribute_tensor(full, meshes[mesh], placements)
    return out


def torch_job(
    rank: int,
    world_size: int,
    *,
    base: str,
    scenarios: list[str],
    storage_options: dict[str, Any] | None = None,
    timeout: float = 60.0,
) -> dict[str, Any]:
    """Run ``scenarios`` in order on one TorchCoordinator; each one's outcome on this rank.

    * ``slices``: :func:`pieces` (torch tensors) through ``await streamckpt.save``;
    * ``dtensor``: the :data:`DTENSOR_CASES` as DTensors, through ``streamckpt.sync.save``;
    * ``reuse``: :func:`pieces` twice, the second time other values over the first
      (``overwrite``): both saves reuse the plan of ``slices`` (one structure);
    * ``idle``: rank 3 gives only an empty piece, so it has nothing to write;
    * ``bad_dtype``: rank 1 also gives a datetime64 value (no TensorFlow dtype);
    * ``bad_shape``: rank 3 gives its ``emb`` rows as a piece of a (1001, 48) tensor.
    """
    coordinator = _torch_init(rank, world_size, timeout)
    out: dict[str, Any] = {}
    for scenario in scenarios:
        prefix = f"{base}/{scenario}"
        if scenario == "dtensor":
            out[scenario] = outcome(
                streamckpt.sync.save,
                prefix,
                _dtensors(rank),
                coordinator=coordinator,
                storage_options=storage_options,
            )
            continue
        if scenario == "reuse":
            reports = []
            for variant in (0, 1):
                tensors = pieces(rank, as_torch=True, variant=variant)
                report = outcome(
                    _save, prefix, tensors, coordinator, storage_options, overwrite=bool(variant)
                )
                report["reused"] = last_coordination(coordinator)["plan_reused"]
                reports.append(report)
            out[scenario] = reports
            continue
        if scenario == "idle":
            out[scenario] = outcome(_save, prefix, idle_pieces(rank), coordinator, storage_options)
            continue
        tensors = pieces(rank, as_torch=True)
        if scenario == "bad_dtype" and rank == 1:
            tensors["when"] = np.array(["2024-06-11"], dtype="datetime64[D]")
        elif scenario == "bad_shape" and rank == 3:
            emb = tensors["emb"]
            tensors["emb"] = Slice(emb.value, full_shape=(1001, 48), offset=emb.offset)
        elif scenario not in ("slices", "bad_dtype", "bad_shape"):
            raise ValueError(scenario)
        out[scenario] = outcome(_save, prefix, tensors, coordinator, storage_options)
    return out


def torch_killed(
    rank: int, world_size: int, *, base: str, marker: str, victim: int, timeout: float
) -> dict[str, Any]:
    """Save ``before`` whole, then ``failed``, in which ``victim`` stops at its first byte.

    The victim's progress callback (called by its shard writer as the first bytes of its
    shard reach the store: the shard file exists then) writes ``marker`` and sleeps until
    the test SIGKILLs the process: it dies in the middle of its write, every time.
    """
    coordinator = _torch_init(rank, world_size, timeout)
    tensors = pieces(rank, as_torch=True)
    out = {"before": outcome(_save, f"{base}/before", tensors, coordinator, None)}

    def stop_here(nbytes: int) -> None:
        with open(marker, "w") as f:
            f.write(str(nbytes))
        time.sleep(600)

    progress = stop_here if rank == victim else None
    out["failed"] = outcome(_save, f"{base}/failed", tensors, coordinator, None, progress=progress)
    return out


# -- the storage coordinator -----------------------------------------------------------------


def storage_job(
    rank: int,
    world_size: int,
    *,
    prefixes: list[str],
    storage_options: dict[str, Any] | None = None,
    timeout: float = 60.0,
    num_shards: dict[int, int] | None = None,
) -> dict[str, Any]:
    """Save :func:`pieces` (numpy) at each prefix in turn, coordinated through the store only
    (``num_shards``: what some ranks pass as ``num_shards``; the others pass None)."""
    from streamckpt.distributed import StorageCoordinator

    coordinator = StorageCoordinator(rank=rank, world_size=world_size, timeout=timeout)
    tensors = pieces(rank)
    shards = (num_shards or {}).get(rank)
    out: dict[str, Any] = {
        prefix: outcome(_save, prefix, tensors, coordinator, storage_options, num_shards=shards)
        for prefix in prefixes
    }
    out["engines"] = sorted(m for m in ("torch", "jax", "tensorflow") if m in sys.modules)
    return out


# -- jax.distributed -------------------------------------------------------------------------


def jax_job(rank: int, world_size: int, *, base: str, timeout: float) -> dict[str, Any]:
    """Multi-controller JAX, 2 host devices per process: global jax.Arrays that no process
    holds whole, plus :func:`pieces` (numpy), saved with a JaxCoordinator."""
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from streamckpt.distributed import JaxCoordinator

    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{os.environ['MASTER_PORT']}",
        num_processes=world_size,
        process_id=rank,
        initialization_timeout=60,
        shutdown_timeout_seconds=30,
    )
    coordinator = JaxCoordinator(timeout=timeout)
    devices = jax.devices()
    mesh = Mesh(np.array(devices).reshape(4, 2), ("x", "y"))
    tensors = pieces(rank)
    addressable = {}
    for name, (shape, spec) in JAX_CASES.items():
        full = jax_full(shape)

        def part(index: Any, full: np.ndarray[Any, Any] = full) -> np.ndarray[Any, Any]:
            block: np.ndarray[Any, Any] = full[index]
            return block

        sharding = NamedSharding(mesh, PartitionSpec(*spec))  # type: ignore[no-untyped-call]
        array = jax.make_array_from_callback(shape, sharding, part)
        addressable[name] = array.is_fully_addressable
        tensors[name] = array
    out = {
        "devices": (len(devices), len(jax.local_devices())),
        "fully_addressable": addressable,
        "save": outcome(_save, f"{base}/jax", tensors, coordinator, None),
    }
    jax.distributed.shutdown()  # type: ignore[no-untyped-call]  # a barrier: rank 0's process hosts the service
    return out
