"""The global planner of a multi-process save: pure functions of what each process holds.

Every process sends a compact :class:`LocalPlan` (names, dtypes, shapes, boxes, byte sizes
as a few arrays; never data). Every process then runs :func:`plan_global` on the same
gathered plans and gets the same :class:`GlobalPlan`, so no plan needs to be sent back:

* a piece held by one process is written by it; a piece (or a whole tensor) held by several
  is a replica, written once, by the holder with the fewest bytes so far (largest replicas
  first, ties by key, then to the lower rank: deterministic; when every replica is held by
  every process, the classic greedy within 4/3 of the best balance);
* each process gets its own range of data-shard ids, so that all write side by side and the
  ``-of-N`` count is known before the first byte;
* every tensor is checked before anything is written: one dtype and one full shape on every
  process, pieces that tile the full shape (no gap, no overlap), replicas of one size.

Columns, not objects: at 1,024 processes x 1,000 items a Python step per item costs
seconds, so per-item work is numpy's (one sort of row hashes groups the holders of each
value, one sort of signed corners checks every tiling at once: :mod:`.columns`,
:mod:`.tiling`). What a process sends is in :mod:`.items`. Python loops only over
replicas and over the tensors whose check fails (to name what is wrong). Index keys are
built only where needed: a process's own, the replicas', and all of them on the primary's
merge (:mod:`.merge`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from streamckpt.distributed.columns import Ints, group_rows, paused_gc
from streamckpt.distributed.items import (
    LocalItem,
    LocalPlan,
    fingerprint,
    index_key,
    to_tensor_slice,
)
from streamckpt.distributed.tiling import suspect_tilings
from streamckpt.errors import CoordinationError, StreamCkptError
from streamckpt.format.bundle import key_to_name
from streamckpt.format.dtypes import DataType
from streamckpt.format.partitioned import check_tiling
from streamckpt.pipeline.plan import SavePlan, plan_save, shard_count
from streamckpt.sharding import Box

__all__ = [
    "GlobalPlan",
    "Layout",
    "LocalItem",
    "LocalPlan",
    "fingerprint",
    "index_key",
    "plan_global",
    "to_tensor_slice",
]


@dataclass(frozen=True, slots=True)
class Layout:
    """One tensor of the checkpoint: plain (``pieces`` empty) or stored in pieces."""

    dtype: int
    shape: tuple[int, ...]
    pieces: tuple[Box, ...]


def _fail(message: str, ranks: Iterable[int], name: bytes | None = None) -> CoordinationError:
    error = CoordinationError(message, ranks=sorted({int(r) for r in ranks}))
    if name is not None:
        error.with_context(tensor=key_to_name(name))
    return error


@dataclass(frozen=True, eq=False)
class GlobalPlan:
    """What every process writes, and where: the same on every process.

    Tensors are numbered in the order they first appear (rank by rank), distinct values
    (a whole tensor, or one box of one) likewise; ``writer[v]`` writes value ``v``.
    """

    num_shards: int
    #: per rank: (first shard id, number of shards)
    shard_ranges: tuple[tuple[int, int], ...]
    names: tuple[bytes, ...]
    tensor_dtypes: Ints
    tensor_ndims: Ints
    tensor_shapes: Ints
    value_tensor: Ints
    value_whole: np.ndarray[Any, np.dtype[np.bool_]]
    value_starts: Ints
    value_stops: Ints
    value_nbytes: Ints
    writer: Ints
    _writes: dict[int, tuple[Ints, tuple[bytes, ...]]] = field(default_factory=dict, repr=False)

    @property
    def world_size(self) -> int:
        return len(self.shard_ranges)

    @property
    def num_tensors(self) -> int:
        return len(self.names)

    @property
    def total_bytes(self) -> int:
        return int(self.value_nbytes.sum())

    def shape_of(self, tensor: int) -> tuple[int, ...]:
        return tuple(self.tensor_shapes[tensor, : self.tensor_ndims[tensor]].tolist())

    def box_of(self, value: int) -> Box | None:
        if self.value_whole[value]:
            return None
        ndim = int(self.tensor_ndims[self.value_tensor[value]])
        starts = self.value_starts[value, :ndim].tolist()
        stops = self.value_stops[value, :ndim].tolist()
        return tuple(zip(starts, stops, strict=True))

    def key_of(self, value: int) -> bytes:
        """The index key of value ``value``."""
        tensor = int(self.value_tensor[value])
        return index_key(self.names[tensor], self.shape_of(tensor), self.box_of(value))

    def writes_of(self, rank: int) -> tuple[Ints, tuple[bytes, ...]]:
        """The values ``rank`` writes and their keys, in key order (kept: asked again)."""
        known = self._writes.get(rank)
        if known is not None:
            return known
        values = np.flatnonzero(self.writer == rank)
        keys = [self.key_of(v) for v in values.tolist()]
        order = sorted(range(len(keys)), key=keys.__getitem__)
        known = self._writes[rank] = (values[order], tuple(keys[i] for i in order))
        return known

    def local_plan(self, rank: int) -> SavePlan:
        """The shards of ``rank`` (global ids), its values balanced over them by bytes."""
        first, count = self.shard_ranges[rank]
        if not count:
            return SavePlan(num_shards=0, shards=())
        values, keys = self.writes_of(rank)
        sizes = dict(zip(keys, self.value_nbytes[values].tolist(), strict=True))
        local = plan_save(sizes=sizes, num_shards=count)
        shards = tuple(
            tuple(
                type(p)(p.key, p.shard_id + first, p.offset, p.size)  # global shard ids
                for p in shard
            )
            for shard in local.shards
        )
        return SavePlan(num_shards=count, shards=shards)

    # --- views for tests and tools: built on demand, a Python object per value -------------

    @property
    def writes(self) -> tuple[tuple[bytes, ...], ...]:
        """Per rank: the index keys it writes, sorted."""
        return tuple(self.writes_of(rank)[1] for rank in range(self.world_size))

    @property
    def sizes(self) -> dict[bytes, int]:
        return {self.key_of(v): size for v, size in enumerate(self.value_nbytes.tolist())}

    @property
    def tensors(self) -> dict[bytes, Layout]:
        pieces: dict[int, list[Box]] = {}
        for value in np.flatnonzero(~self.value_whole).tolist():
            box = self.box_of(value)
            assert box is not None
            pieces.setdefault(int(self.value_tensor[value]), []).append(box)
        return {
            name: Layout(
                int(self.tensor_dtypes[t]), self.shape_of(t), tuple(sorted(pieces.get(t, [])))
            )
            for t, name in enumerate(self.names)
        }

    def bytes_by_rank(self) -> list[int]:
        loads = np.zeros(self.world_size, dtype=np.int64)
        np.add.at(loads, self.writer, self.value_nbytes)
        return [int(x) for x in loads]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GlobalPlan):
            return NotImplemented
        return (self.num_shards, self.shard_ranges, self.writes, self.sizes, self.tensors) == (
            other.num_shards,
            other.shard_ranges,
            other.writes,
            other.sizes,
            other.tensors,
        )

    __hash__ = None  # type: ignore[assignment]


def plan_global(
    plans: Sequence[LocalPlan | Sequence[LocalItem]],
    *,
    shard_bytes: int | None,
    num_shards: int | None = None,
) -> GlobalPlan:
    """The plan of a save by ``len(plans)`` processes; ``plans[r]`` is what rank r holds.

    ``num_shards`` is the number of data shards *per process* that writes anything (None:
    ``auto_num_shards`` of its own bytes with the store's ``shard_bytes``).
    """
    with paused_gc():
        return _plan(plans, shard_bytes, num_shards)


def _plan(
    plans: Sequence[LocalPlan | Sequence[LocalItem]],
    shard_bytes: int | None,
    num_shards: int | None,
) -> GlobalPlan:
    local = [p if isinstance(p, LocalPlan) else LocalPlan.of(p) for p in plans]
    world = len(local)
    axes = max((p.shapes.shape[1] for p in local), default=0)
    local = [p.width(axes) for p in local]
    names, name_ids = _intern([p.names for p in local])
    rank = np.repeat(np.arange(world, dtype=np.int64), [len(p) for p in local])

    def column(name: str) -> Ints:
        if local:
            return np.concatenate([getattr(p, name) for p in local])
        return np.zeros((0, axes) if name in ("shapes", "starts", "stops") else 0, np.int64)

    dtype, nbytes, ndim = column("dtypes"), column("nbytes"), column("ndims")
    shape, start, stop = column("shapes"), column("starts"), column("stops")
    whole: np.ndarray[Any, np.dtype[np.bool_]] = column("whole").astype(bool)
    count = len(names)
    # 1. one dtype and one shape per tensor: every item against the tensor's first
    first = np.full(count, len(rank), dtype=np.int64)
    np.minimum.at(first, name_ids, np.arange(len(rank), dtype=np.int64))
    of_item = first[name_ids]
    disagree = (dtype != dtype[of_item]) | (ndim != ndim[of_item])
    disagree |= (shape != shape[of_item]).any(axis=1)
    if disagree.any():
        i = int(np.flatnonzero(disagree)[0])
        j = int(of_item[i])
        raise _fail(
            f"processes disagree about a tensor: rank {rank[j]} has dtype "
            f"{_dtype_name(dtype[j])} shape {_shape(shape[j], ndim[j])}, rank {rank[i]} has "
            f"dtype {_dtype_name(dtype[i])} shape {_shape(shape[i], ndim[i])}",
            [rank[j], rank[i]],
            names[name_ids[i]],
        )
    t_dtype, t_ndim, t_shape = dtype[first], ndim[first], shape[first]
    # 2. a tensor is whole everywhere or in pieces everywhere; strings never in pieces
    wholes = np.bincount(name_ids[whole], minlength=count)
    items = np.bincount(name_ids, minlength=count)
    in_pieces = wholes < items
    for problem, bad in (
        (
            "a tensor is given whole by some processes and in pieces by others",
            in_pieces & (wholes > 0),
        ),
        (
            "a string or variant tensor cannot be saved in pieces",
            in_pieces & np.isin(t_dtype, [DataType.DT_STRING, DataType.DT_VARIANT]),
        ),
    ):
        if bad.any():
            t = int(np.flatnonzero(bad)[0])
            raise _fail(problem, rank[name_ids == t], names[t])
    # 3. distinct values: equal (tensor, box) rows; holders in rank order
    groups = group_rows(name_ids, start, stop)
    ordered_rank = rank[groups.order]
    same_run = np.ones(len(rank), dtype=bool)
    same_run[groups.starts] = False
    twice = same_run[1:] & (ordered_rank[1:] == ordered_rank[:-1])
    if twice.any():
        i = int(groups.order[np.flatnonzero(twice) + 1].min())  # the first in rank order
        raise _fail(f"rank {rank[i]} gives the same value twice", [rank[i]], names[name_ids[i]])
    holder_first = groups.first[groups.ids[groups.order]]
    differ = np.flatnonzero(nbytes[groups.order] != nbytes[holder_first])
    if len(differ):
        pos = int(differ[np.argmin(groups.order[differ])])
        i, j = int(groups.order[pos]), int(holder_first[pos])
        raise _fail(
            f"replicas of one value differ in size: rank {rank[j]} has {nbytes[j]} bytes, "
            f"rank {rank[i]} has {nbytes[i]}",
            [rank[j], rank[i]],
            names[name_ids[i]],
        )
    # values numbered in order of first appearance (rank by rank), not of their hashes
    is_first = np.zeros(len(rank), dtype=bool)
    is_first[groups.first] = True
    v_first = np.flatnonzero(is_first)
    numbered = (np.cumsum(is_first) - 1)[groups.first]  # each run's number in that order
    run_starts = np.empty(len(groups), dtype=np.int64)
    run_starts[numbered] = groups.starts
    run_sizes = np.empty(len(groups), dtype=np.int64)
    run_sizes[numbered] = groups.sizes
    plan = GlobalPlan(
        num_shards=0,
        shard_ranges=(),
        names=names,
        tensor_dtypes=t_dtype,
        tensor_ndims=t_ndim,
        tensor_shapes=t_shape,
        value_tensor=name_ids[v_first],
        value_whole=whole[v_first],
        value_starts=start[v_first],
        value_stops=stop[v_first],
        value_nbytes=nbytes[v_first],
        writer=rank[v_first],
    )
    # 4. pieces tile their tensors
    _check_tilings(plan, rank, name_ids)
    # 5. who writes what, and the shards
    writer = _assign(plan, ordered_rank, run_starts, run_sizes, world)
    return _with_shards(plan, writer, world, shard_bytes, num_shards)


def _intern(names_by_rank: Sequence[tuple[bytes, ...]]) -> tuple[tuple[bytes, ...], Ints]:
    """Number names in order of first appearance.

    A rank naming what the last one named (every process of a data-parallel job) costs one
    tuple comparison.
    """
    table: dict[bytes, int] = {}
    ids: list[Ints] = []
    previous: tuple[tuple[bytes, ...], Ints] | None = None
    for names in names_by_rank:
        if previous is not None and names == previous[0]:
            ids.append(previous[1])
            continue
        add = table.setdefault
        numbered = np.fromiter([add(name, len(table)) for name in names], np.int64)
        ids.append(numbered)
        previous = (names, numbered)
    return tuple(table), (np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64))


def _check_tilings(plan: GlobalPlan, rank: Ints, name_ids: Ints) -> None:
    """Refuse pieces that do not tile their tensor, naming the tensor and its holders.

    All tensors at once: the signed corners of every piece (see ``check_tiling``) are summed
    per tensor with the whole box's taken away, and every sum must vanish; pieces reaching
    outside their tensor or holding nothing fail too. Tensors that fail are then checked one
    by one by ``check_tiling``, which says what is wrong.
    """
    pieces = np.flatnonzero(~plan.value_whole)
    if not len(pieces):
        return
    tensor = plan.value_tensor[pieces]
    suspects = suspect_tilings(
        tensor,
        plan.tensor_ndims[tensor],
        plan.tensor_shapes[tensor],
        plan.value_starts[pieces],
        plan.value_stops[pieces],
    )
    for t in sorted(suspects):
        boxes = [plan.box_of(v) for v in pieces[tensor == t].tolist()]
        shape = plan.shape_of(t)
        try:
            slices = [to_tensor_slice(shape, box) for box in boxes if box is not None]
            check_tiling(shape, slices)
        except (StreamCkptError, ValueError) as exc:
            why = exc.message if isinstance(exc, StreamCkptError) else str(exc)
            raise _fail(
                f"the pieces processes give do not tile the tensor of shape {list(shape)}: {why}",
                rank[name_ids == t],
                plan.names[t],
            ) from None


def _assign(plan: GlobalPlan, ordered_rank: Ints, starts: Ints, holders: Ints, world: int) -> Ints:
    """Who writes each value: its only holder, else the least-loaded of its holders."""
    writer = plan.writer.copy()
    sizes = plan.value_nbytes
    single = holders == 1
    loads = np.zeros(world, dtype=np.int64)
    np.add.at(loads, writer[single], sizes[single])
    replicated = np.flatnonzero(~single).tolist()
    if not replicated:
        return writer
    keys = {v: plan.key_of(v) for v in replicated}
    replicated.sort(key=lambda v: (-int(sizes[v]), keys[v]))
    load = loads.tolist()
    by_rank = ordered_rank.tolist()
    for v in replicated:
        lo = int(starts[v])
        # holders are in rank order and min keeps the first of equals: ties go to the lower
        rank = min(by_rank[lo : lo + int(holders[v])], key=load.__getitem__)
        load[rank] += int(sizes[v])
        writer[v] = rank
    return writer


def _with_shards(
    plan: GlobalPlan,
    writer: Ints,
    world: int,
    shard_bytes: int | None,
    num_shards: int | None,
) -> GlobalPlan:
    sizes = plan.value_nbytes
    values = np.bincount(writer, minlength=world)
    totals = np.zeros(world, dtype=np.int64)
    np.add.at(totals, writer, sizes)
    largest = np.zeros(world, dtype=np.int64)
    np.maximum.at(largest, writer, sizes)
    shard_ranges = []
    first = 0
    for count, total, big in zip(values.tolist(), totals.tolist(), largest.tolist(), strict=True):
        if not count:
            shards = 0
        elif num_shards is not None:
            shards = max(1, min(num_shards, count))
        else:
            shards = shard_count(total, big, shard_bytes=shard_bytes)
        shard_ranges.append((first, shards))
        first += shards
    return dataclasses.replace(
        plan, num_shards=first, shard_ranges=tuple(shard_ranges), writer=writer
    )


def _shape(shape: Ints, ndim: Any) -> list[int]:
    return [int(x) for x in shape[: int(ndim)]]


def _dtype_name(dtype: Any) -> str:
    try:
        return DataType(int(dtype)).name
    except ValueError:
        return str(int(dtype))
