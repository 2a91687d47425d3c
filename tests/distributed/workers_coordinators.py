"""Worker functions for ``test_coordinators``: each runs in its own process of a job.

Every backend runs the same two scripts: ``exercise`` (each collective kind, several in a
row) and ``absent`` (one rank never arrives; the others report the error they got and how
long it took).
"""

from __future__ import annotations

import os
import time
from typing import Any

import anyio

from streamckpt.distributed import Coordinator
from streamckpt.errors import CoordinationError


async def exercise(coordinator: Coordinator) -> dict[str, Any]:
    rank = coordinator.rank
    out: dict[str, Any] = {"rank": coordinator.rank, "world_size": coordinator.world_size}
    out["gather"] = await coordinator.all_gather({"rank": rank, "sq": rank * rank}, name="gather")
    out["bcast0"] = await coordinator.broadcast(f"from {rank}", name="bcast0")
    out["bcast2"] = await coordinator.broadcast(("root", rank), name="bcast2", root=2)
    await coordinator.barrier(name="barrier")
    # several in a row: a sequence that drifted by one would mix these up
    out["row"] = [
        await coordinator.all_gather((step, rank), name=f"row-{step}") for step in range(4)
    ]
    out["bcast_none"] = await coordinator.broadcast(None if rank == 1 else "x", name="n", root=1)
    return out


async def absent(coordinator: Coordinator, *, missing: int, mode: str) -> dict[str, Any]:
    """``missing`` skips the second collective: it sleeps past the others' timeout or exits."""
    rank = coordinator.rank
    await coordinator.all_gather(rank, name="first")
    if rank == missing:
        if mode == "exit":
            os._exit(3)
        await anyio.sleep(coordinator.timeout + 4)
        return {"rank": rank, "slept": True}
    started = time.monotonic()
    try:
        got = await coordinator.all_gather(rank, name="second")
    except CoordinationError as exc:
        elapsed = time.monotonic() - started
        return {"rank": rank, "ranks": exc.ranks, "elapsed": elapsed, "message": str(exc)}
    return {"rank": rank, "unexpected": got}


def _run(script: str, coordinator: Coordinator, **kwargs: Any) -> dict[str, Any]:
    fn = {"exercise": exercise, "absent": absent}[script]

    async def main() -> dict[str, Any]:
        return await fn(coordinator, **kwargs)

    return anyio.run(main)


# -- torch -----------------------------------------------------------------------------------


def torch_job(rank: int, world_size: int, *, script: str, timeout: float, **kw: Any) -> Any:
    import torch.distributed as dist

    from streamckpt.distributed import TorchCoordinator

    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    dist.barrier()  # (process starts differ by seconds on a busy machine; timeouts are short)
    coordinator = TorchCoordinator(timeout=timeout)
    assert coordinator.bind(None, "x") is coordinator  # type: ignore[arg-type]
    return _run(script, coordinator, **kw)


# -- jax -------------------------------------------------------------------------------------


def jax_job(rank: int, world_size: int, *, script: str, timeout: float, **kw: Any) -> Any:
    import jax
    from jax._src.distributed import global_state

    from streamckpt.distributed import JaxCoordinator

    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{os.environ['MASTER_PORT']}",
        num_processes=world_size,
        process_id=rank,
        initialization_timeout=60,
        shutdown_timeout_seconds=30,
    )
    global_state.client.wait_at_barrier("test-start", 60_000)  # see torch_job
    coordinator = JaxCoordinator(timeout=timeout)
    assert (coordinator.rank, coordinator.world_size) == (rank, world_size)
    result = _run(script, coordinator, **kw)
    if kw.get("mode") == "exit":
        _outlive_survivors(rank, world_size, kw["missing"])
    else:
        jax.distributed.shutdown()  # a barrier: rank 0's process hosts the service
    return result


def _outlive_survivors(rank: int, world_size: int, missing: int) -> None:
    """Keep rank 0 (the service's host) until the other survivors have their result.

    A process whose service goes away is terminated by JAX; with a dead peer there is no
    shutdown barrier to wait at, so the survivors say they are done and rank 0 waits for
    that, then gives them a moment to print before its exit takes the service down.
    """
    from jax._src.distributed import global_state

    client = global_state.client
    assert client is not None and missing != 0
    if rank != 0:
        client.key_value_set(f"test/finished/{rank}", "1")
        return
    for other in range(1, world_size):
        if other != missing:
            client.blocking_key_value_get(f"test/finished/{other}", 30_000)
    time.sleep(1.0)


# -- storage ---------------------------------------------------------------------------------


def storage_job(
    rank: int,
    world_size: int,
    *,
    script: str,
    timeout: float,
    root: str,
    storage_options: dict[str, Any] | None = None,
    bind: str | None = None,
    delay: dict[int, float] | None = None,
    **kw: Any,
) -> Any:
    """With ``bind``, the coordinator is bound to that checkpoint directory (a URI) first."""
    from streamckpt.distributed import StorageCoordinator
    from streamckpt.storage import resolve

    time.sleep((delay or {}).get(rank, 0.0))
    if script == "absent":  # see torch_job
        start = StorageCoordinator(
            rank=rank,
            world_size=world_size,
            timeout=60.0,
            root=f"{root}/start",
            storage_options=storage_options,
        )
        anyio.run(lambda: start.barrier(name="start"))
    coordinator = StorageCoordinator(
        rank=rank,
        world_size=world_size,
        timeout=timeout,
        root=root,
        storage_options=storage_options,
    )
    if bind is not None:
        store, directory = resolve(bind, storage_options=storage_options)
        coordinator = coordinator.bind(store, directory)
    return _run(script, coordinator, **kw)


def storage_stale(
    rank: int,
    world_size: int,
    *,
    root: str,
    storage_options: dict[str, Any] | None = None,
    tag: str,
) -> Any:
    """A job that leaves files behind: it gathers once, then all but rank 0 post a second
    gather (of ``(tag, rank)``) that never completes, and give it up after a second."""
    from streamckpt.distributed import StorageCoordinator

    coordinator = StorageCoordinator(
        rank=rank, world_size=world_size, timeout=60.0, root=root, storage_options=storage_options
    )

    async def main() -> Any:
        first = await coordinator.all_gather((tag, rank), name="gather")
        if rank == 0:
            return first
        with anyio.move_on_after(1.0):
            await coordinator.all_gather((tag, rank), name="gather")
            return "completed"
        return "gave up"

    return anyio.run(main)


def storage_never(rank: int, world_size: int, *, timeout: float, root: str, missing: int) -> Any:
    """``missing`` never calls a collective; the others report what the first one raised."""
    from streamckpt.distributed import StorageCoordinator

    if rank == missing:
        return "skipped"
    coordinator = StorageCoordinator(rank=rank, world_size=world_size, timeout=timeout, root=root)

    async def main() -> Any:
        started = time.monotonic()
        try:
            got = await coordinator.all_gather(rank, name="first")
        except CoordinationError as exc:
            return {"ranks": exc.ranks, "elapsed": time.monotonic() - started}
        return {"unexpected": got}

    return anyio.run(main)
