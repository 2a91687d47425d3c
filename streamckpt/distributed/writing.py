"""The write step of a save together: this process's shards, and heartbeats meanwhile.

While anyone writes, every process beats; the last beat holds every process's report (the
``written`` step of :mod:`streamckpt.distributed.save`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio

from streamckpt.distributed._protocol import Coordinator
from streamckpt.distributed.merge import StoredAt, Written
from streamckpt.distributed.plan import GlobalPlan
from streamckpt.errors import CoordinationError, unwrap_task_group
from streamckpt.pipeline.commit import delete_quietly
from streamckpt.pipeline.save import DEFAULT_MAX_CONCURRENT_SHARDS, verify_shards, write_shards
from streamckpt.pipeline.tensors import PreparedTensor
from streamckpt.storage import Store

__all__ = ["HEARTBEAT_SECONDS", "Cancelled", "Report", "write_own", "write_together"]


@dataclass(frozen=True, slots=True)
class Report:
    """What a process says at one step: its value, or why it cannot go on."""

    value: Any = None
    error: BaseException | None = None


#: While any process still writes, all of them exchange a heartbeat this often (at most):
#: a process that dies is found within the coordinator's timeout, however long the writes
#: of the others take, and a failure stops the others' writes at the next beat.
HEARTBEAT_SECONDS = 5.0


async def write_together(
    coordinator: Coordinator, write: Callable[[], Awaitable[Report]]
) -> tuple[Report, list[Report]]:
    """Run this process's writes while beating with the others; every process's report.

    A collective waits at most the coordinator's timeout, which is about a peer that is
    gone, not about one that is slow: while anyone writes, every process posts ``writing``
    or its final report every :data:`HEARTBEAT_SECONDS` (or a quarter of the timeout), so
    a straggler writing for an hour is waited for and a dead process is named within the
    timeout. When a report carries an error, the processes still writing stop (their
    shards removed) and report that. The last beat, where every process is done, holds
    every process's report: it is the ``written`` step.
    """
    own: list[Report] = []
    finished = anyio.Event()
    write_scope = anyio.CancelScope()
    stopped_by: list[int] = []

    async def run() -> None:
        try:
            with write_scope:
                own.append(await write())
        finally:
            if write_scope.cancel_called and stopped_by:
                # stopped because a peer failed: that is this process's report, not a
                # cancellation of its own
                own[:] = [
                    Report(
                        error=CoordinationError(
                            f"stopped: rank(s) {stopped_by} failed", ranks=stopped_by
                        )
                    )
                ]
            finished.set()

    interval = max(0.01, min(HEARTBEAT_SECONDS, coordinator.timeout / 4))
    reports: list[Report] = []
    with unwrap_task_group():
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await _beat(coordinator, interval, own, finished, write_scope, stopped_by, reports)
    return own[0], reports


async def _beat(
    coordinator: Coordinator,
    interval: float,
    own: list[Report],
    finished: anyio.Event,
    write_scope: anyio.CancelScope,
    stopped_by: list[int],
    reports: list[Report],
) -> None:
    """The heartbeat loop of :func:`write_together` (shielded: it ends the protocol)."""
    with anyio.CancelScope(shield=True):
        while True:
            with anyio.move_on_after(interval):
                await finished.wait()
            mine = own[0] if finished.is_set() and own else None
            beats = await coordinator.all_gather(mine, name="written")
            done = [b for b in beats if isinstance(b, Report)]
            if len(done) == len(beats):
                reports[:] = done
                return
            failing = [r for r, b in enumerate(beats) if isinstance(b, Report) and b.error]
            if failing and not finished.is_set():
                stopped_by[:] = failing
                write_scope.cancel()


class Cancelled(CoordinationError):
    """The save of this process was cancelled.

    The others get a CoordinationError; this one re-raises the cancellation once the save's
    last step is done.
    """

    original: BaseException | None = None


async def write_own(
    store: Store,
    paths: list[str],
    plan: GlobalPlan,
    rank: int,
    prepared: Mapping[bytes, PreparedTensor],
    chunk_bytes: int,
    plan_digest: bytes,
) -> Report:
    """Write and check this process's shards; on failure remove them and report why.

    A cancellation is reported too (and re-raised after the save's last step by the
    caller's shielded finish): the others learn it at the next collective, not by timeout.
    """
    local = plan.local_plan(rank)
    try:
        results = await write_shards(
            store,
            paths,
            prepared,
            local,
            chunk_bytes=chunk_bytes,
            max_concurrent_shards=DEFAULT_MAX_CONCURRENT_SHARDS,
        )
        await verify_shards(store, paths, results)
    except BaseException as exc:
        with anyio.CancelScope(shield=True):
            await delete_quietly(store, paths)
            await store.drain()
        if isinstance(exc, Exception):
            return Report(error=exc)
        if isinstance(exc, anyio.get_cancelled_exc_class()):
            cancelled = Cancelled(f"rank {rank} was cancelled", ranks=[rank])
            cancelled.original = exc
            return Report(error=cancelled)
        raise
    stored: dict[bytes, StoredAt] = {}
    for shard, result in zip(local.shards, results, strict=True):
        for placement in shard:
            stored[placement.key] = StoredAt(
                placement.shard_id,
                placement.offset,
                placement.size,
                result.tensor_crcs[placement.key],
            )
    written = Written.of(plan.writes_of(rank)[1], stored)  # four small arrays to gather
    return Report((written, store.stats.snapshot(), plan_digest))
