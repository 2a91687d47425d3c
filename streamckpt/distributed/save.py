"""A save by many processes: plan together, write side by side, the primary commits.

Every process runs :func:`save_distributed` with its own values and the same coordinator.
The collectives, in order (each carries a success or the process's error, so that one
process's failure reaches all of them at the next step instead of a timeout):

1. ``plan``: every process's fingerprint of its items (names, dtypes, shapes, boxes, sizes)
   and the digest of the plan it used last; when all of them used this very plan last, that
   is all (a repeated save of one structure); else ``plan-items`` gathers the items
   themselves, and every process computes the same :class:`~.plan.GlobalPlan`;
2. ``session``: the primary has claimed the prefix (``pipeline.commit``: one writer per
   prefix) and decided how shards are named; everyone learns it, or the primary's error;
3. every process streams its own range of data shards through the single-process pipeline
   (concurrent shards, crc32c on the way, the store's byte budget) and checks them;
4. ``written``: every process's index entries (where each value landed, its crc32c);
5. the primary merges them (``merge.merge_records``) and writes the index create-only, only
   when every process succeeded; else it removes every shard of the save (also those of a
   process that died) and leftover uploads;
6. ``outcome``: the primary's :class:`SaveInfo`, or its error, on every process.

A process that fails, is cancelled or dies never leaves an index: the primary commits only
after step 4 brought every process's success. A process that does not arrive makes the
others' collective time out (the coordinator's ``timeout``) with a
:class:`~streamckpt.errors.CoordinationError` naming it where the engine can tell.
"""

from __future__ import annotations

import contextlib
import functools
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread

from streamckpt.distributed._protocol import PRIMARY, Coordinator
from streamckpt.distributed.local import prepare_local
from streamckpt.distributed.merge import merge_records
from streamckpt.distributed.plan import GlobalPlan, LocalPlan, fingerprint, plan_global
from streamckpt.distributed.writing import Cancelled, Report, write_own, write_together
from streamckpt.errors import CoordinationError
from streamckpt.format.bundle import BundleHeader
from streamckpt.format.index_file import encode_index_records
from streamckpt.pipeline.commit import (
    Outcome,
    Session,
    abandon,
    begin,
    claimed,
    commit,
    delete_quietly,
    tidy,
)
from streamckpt.pipeline.save import (
    DEFAULT_CHUNK_BYTES,
    ProgressCallback,
    SaveInfo,
    Tensors,
)
from streamckpt.pipeline.tensors import PreparedTensor
from streamckpt.storage import Store

__all__ = ["last_coordination", "save_distributed"]


@dataclass
class _PlanCache:
    """The plan a coordinator's processes used last, and the digest that names it."""

    digest: bytes = b""
    plan: GlobalPlan | None = None
    #: seconds of the last save's planning collectives, and whether the plan was reused
    seconds: float = 0.0
    reused: bool = False


# One per coordinator the caller holds (a bound storage coordinator is a new object per save).
_CACHES: weakref.WeakKeyDictionary[Any, _PlanCache] = weakref.WeakKeyDictionary()


def _cache(coordinator: Coordinator) -> _PlanCache:
    try:
        return _CACHES.setdefault(coordinator, _PlanCache())
    except TypeError:  # not weakly referenceable: no reuse, every save plans afresh
        return _PlanCache()


def last_coordination(coordinator: Coordinator) -> Mapping[str, float]:
    """Seconds the last save with ``coordinator`` spent planning, and whether it reused."""
    cache = _cache(coordinator)
    return {"plan_seconds": cache.seconds, "plan_reused": float(cache.reused)}


def _raise_first(reports: Sequence[Report], coordinator: Coordinator, step: str) -> None:
    """Raise if any process reported an error: its own, or one naming the others at fault."""
    failed = [rank for rank, report in enumerate(reports) if report.error is not None]
    if not failed:
        return
    own = reports[coordinator.rank].error
    if own is not None:
        raise own
    first = reports[failed[0]].error
    raise CoordinationError(
        f"the save failed on rank{'s' if len(failed) > 1 else ''} "
        f"{', '.join(map(str, failed))} at step {step!r}: {first!r}",
        ranks=failed,
    )


def _check_same_params(reports: Sequence[Report], uri: str) -> None:
    """Refuse a save whose processes were called with different settings.

    Each would plan other shard counts and names: the index would point at files that were
    never written (a process that passed another ``num_shards``, or a store of another kind).
    """
    first = reports[0].value[2]
    differ = [rank for rank, report in enumerate(reports) if report.value[2] != first]
    if differ:
        raise CoordinationError(
            "processes called save with different settings (num_shards, the kind of store "
            f"or the number of processes): rank 0 has {first.decode()}, rank "
            f"{differ[0]} has {reports[differ[0]].value[2].decode()}",
            ranks=differ,
            uri=uri,
        )


async def _gather(coordinator: Coordinator, report: Report, step: str) -> list[Report]:
    values = await coordinator.all_gather(report, name=step)
    return [v if isinstance(v, Report) else Report(error=TypeError(repr(v))) for v in values]


async def save_distributed(
    store: Store,
    prefix_path: str,
    tensors: Tensors,
    coordinator: Coordinator,
    *,
    num_shards: int | None,
    overwrite: bool,
    copy: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: ProgressCallback | None = None,
) -> SaveInfo:
    """Save this process's part of one checkpoint; every process gets the same SaveInfo.

    ``num_shards`` is per process (each process that writes anything writes that many
    data shards); None lets each choose by its own bytes, as a single-process save does.
    """
    started = time.perf_counter()
    cache = _cache(coordinator)
    bound = coordinator.bind(store, store.dirname(prefix_path))
    rank = bound.rank
    if progress is not None:
        store.stats.on_bytes = progress
    async with contextlib.AsyncExitStack() as stack:
        # 1. the plan
        t0 = time.perf_counter()
        report = Report()
        items = LocalPlan.of(())
        prepared: dict[bytes, PreparedTensor] = {}
        try:
            listed, prepared = await anyio.to_thread.run_sync(
                lambda: prepare_local(tensors, copy=copy)
            )
            items = LocalPlan.of(listed)
        except Exception as exc:
            report = Report(error=exc)
        digest = fingerprint(items)
        # what the plan depends on besides the items: every process must pass the same
        # (``overwrite`` is the primary's alone: it claims, replaces and commits)
        params = repr((bound.world_size, store.shard_bytes, num_shards)).encode()
        mine = Report((digest, cache.digest, params), report.error)
        reports = await _gather(bound, mine, "plan")
        _raise_first(reports, bound, "plan")
        _check_same_params(reports, store.uri(prefix_path))
        plan_digest = fingerprint([r.value[0] for r in reports] + [params])
        if cache.plan is not None and all(r.value[1] == plan_digest for r in reports):
            plan = cache.plan
            cache.reused = True
        else:
            gathered = await _gather(bound, Report(items), "plan-items")
            _raise_first(gathered, bound, "plan-items")

            def make_plan() -> GlobalPlan:
                return plan_global(
                    [r.value for r in gathered],
                    shard_bytes=store.shard_bytes,
                    num_shards=num_shards,
                )

            plan = await anyio.to_thread.run_sync(make_plan)
            cache.plan, cache.digest, cache.reused = plan, plan_digest, False
        cache.seconds = time.perf_counter() - t0

        # 2. the session: the primary claims the prefix and decides the shards' names
        claim = None
        session_report = Report()
        if rank == PRIMARY:
            try:
                claim = await stack.enter_async_context(
                    claimed(store, prefix_path, overwrite=overwrite)
                )
                session_report = Report(await begin(store, prefix_path, overwrite=overwrite))
            except Exception as exc:
                session_report = Report(error=exc)
        got = await bound.broadcast(session_report, name="session", root=PRIMARY)
        if not isinstance(got, Report) or got.error is not None:
            error = got.error if isinstance(got, Report) else None
            if rank == PRIMARY and error is not None:
                raise error
            raise CoordinationError(
                f"the primary could not start the save: {error!r}", ranks=[PRIMARY]
            )
        session: Session = got.value

        # 3. this process's shards
        phases: dict[str, float] = {"plan": cache.seconds}
        first, count = plan.shard_ranges[rank]
        paths = [session.write_path(first + i, plan.num_shards) for i in range(count)]
        t0 = time.perf_counter()
        write = functools.partial(
            write_own, store, paths, plan, rank, prepared, chunk_bytes, plan_digest
        )
        all_paths = [session.write_path(i, plan.num_shards) for i in range(plan.num_shards)]
        original: BaseException | None = None
        try:
            written, reports = await write_together(bound, write)
        except BaseException:
            # a peer that stopped answering: nothing commits; the primary removes every shard
            with anyio.CancelScope(shield=True):
                if claim is not None:  # the primary
                    await abandon(store, session, claim, all_paths)
                else:
                    await delete_quietly(store, paths)
            raise
        phases["write_shards"] = time.perf_counter() - t0

        # 5. the commit; 6. the outcome
        with anyio.CancelScope(shield=True):
            finish = _finish(
                store,
                bound,
                plan,
                session,
                claim,
                written,
                reports,
                paths,
                overwrite=overwrite,
                phases=phases,
                started=started,
            )
            try:
                info = await finish
            except Cancelled as exc:
                original = exc.original
        if original is not None:
            raise original  # the cancellation, re-raised once the protocol is done
    return info


def _sum_stats(by_rank: Sequence[Mapping[str, int]], primary: Mapping[str, int]) -> dict[str, int]:
    """The store counters of every process's writes, plus the primary's commit requests."""
    total = dict(primary)
    for stats in by_rank[1:]:
        for key, count in stats.items():
            total[key] = total.get(key, 0) + count
    return total


async def _finish(
    store: Store,
    coordinator: Coordinator,
    plan: GlobalPlan,
    session: Session,
    claim: Any,
    written: Report,
    reports: list[Report],
    own_paths: list[str],
    *,
    overwrite: bool,
    phases: dict[str, float],
    started: float,
) -> SaveInfo:
    rank = coordinator.rank
    all_paths = [session.write_path(i, plan.num_shards) for i in range(plan.num_shards)]
    failed = any(r.error is not None for r in reports)
    outcome_report: Report = Report()
    if rank == PRIMARY:
        t0 = time.perf_counter()
        outcome = Outcome()
        try:
            if failed:
                _raise_first(reports, coordinator, "written")
            # the same plan everywhere, or the index would name another layout's files
            digests = [r.value[2] for r in reports]
            if any(d != digests[0] for d in digests):
                raise CoordinationError(
                    "processes wrote by different plans; nothing is committed",
                    ranks=[rank for rank, d in enumerate(digests) if d != digests[0]],
                )
            records = merge_records(plan, [r.value[0] for r in reports])
            header = BundleHeader(num_shards=plan.num_shards)
            index_bytes = encode_index_records(header, records.keys, records.values)
            await commit(
                store, session, claim, index_bytes, outcome, all_paths, overwrite=overwrite
            )
            phases["commit_index"] = time.perf_counter() - t0
            await tidy(store, session, num_shards=plan.num_shards)
            outcome_report = Report(
                SaveInfo(
                    prefix=store.uri(session.prefix_path),
                    num_shards=plan.num_shards,
                    num_tensors=plan.num_tensors,
                    bytes_written=plan.total_bytes,
                    index_bytes=len(index_bytes),
                    files=(*(store.uri(p) for p in all_paths), store.uri(session.index_path)),
                    seconds=time.perf_counter() - started,
                    seconds_by_phase=dict(phases),
                    stats=_sum_stats([r.value[1] for r in reports], store.stats.snapshot()),
                )
            )
        except Exception as exc:
            outcome_report = Report(error=exc)
        finally:
            if not outcome.committed:
                await abandon(store, session, claim, all_paths)
    elif failed and written.error is None:
        await delete_quietly(store, own_paths)  # the primary removes them too; sooner here
    got = await coordinator.broadcast(outcome_report, name="outcome", root=PRIMARY)
    if written.error is not None:
        raise written.error  # this process's own error, not its copy from the collective
    if rank != PRIMARY and failed:
        _raise_first(reports, coordinator, "written")
    if not isinstance(got, Report) or got.error is not None:
        error = got.error if isinstance(got, Report) else None
        if rank == PRIMARY and error is not None:
            raise error
        raise CoordinationError(f"the primary could not commit the save: {error!r}", ranks=[0])
    info: SaveInfo = got.value
    return info
