"""Pure planners: where each tensor goes on save, which byte ranges to fetch on read.

Both are plain functions of sizes and offsets, so they are tested without any storage, and
their result *is* the I/O that will happen.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

from streamckpt.format.record import Record

_set = object.__setattr__


class Placement(NamedTuple):
    """One tensor's bytes: ``[offset, offset + size)`` of data shard ``shard_id``.

    A named tuple, not a dataclass: plans of many small tensors make one per tensor on save
    and on load, and a frozen dataclass costs four times as much to build (1.4 against
    0.33 µs).
    """

    key: bytes
    shard_id: int
    offset: int
    size: int


class SavePlan(Record):
    """Which tensors each shard holds, in write order, with their offsets."""

    __slots__ = ("num_shards", "shards")
    num_shards: int
    shards: tuple[tuple[Placement, ...], ...]

    def __init__(self, num_shards: int, shards: tuple[tuple[Placement, ...], ...]) -> None:
        _set(self, "num_shards", num_shards)
        _set(self, "shards", shards)

    @property
    def placements(self) -> dict[bytes, Placement]:
        return {p.key: p for shard in self.shards for p in shard}

    def shard_bytes(self, shard_id: int) -> int:
        shard = self.shards[shard_id]
        return shard[-1].offset + shard[-1].size if shard else 0


#: The most shards a save picks for itself (an explicit ``num_shards`` may ask for more).
MAX_AUTO_SHARDS = 16


def auto_num_shards(sizes: Iterable[int], *, shard_bytes: int | None) -> int:
    """How many shards a save makes when the caller does not say: about ``shard_bytes`` each.

    ``None`` (a store with nothing to gain from more objects) is one shard. On an object store
    each shard is joined by the server after its last byte (an S3 complete, a GCS compose),
    work that grows with the object; several shards are joined side by side, each while the
    next one is still streaming. Never more shards than the largest tensor can fill (a
    tensor is never split, so one huge tensor is one shard), and at most ``MAX_AUTO_SHARDS``.
    """
    sizes = list(sizes)
    return shard_count(sum(sizes), max(sizes, default=0), shard_bytes=shard_bytes)


def shard_count(total: int, largest: int, *, shard_bytes: int | None) -> int:
    """``auto_num_shards`` of tensors of ``total`` bytes, the largest of ``largest``."""
    if shard_bytes is None or total == 0:
        return 1
    shard_bytes = max(1, shard_bytes)
    wanted = (total + shard_bytes // 2) // shard_bytes  # the nearest count: 256.1 MiB is 4 x 64
    fillable = total // largest
    return max(1, min(wanted, fillable, MAX_AUTO_SHARDS))


def plan_save(*, sizes: Mapping[bytes, int], num_shards: int) -> SavePlan:
    """Balance tensors over ``num_shards`` by bytes; inside each shard, keep name order.

    Largest first onto the least-filled shard (ties: the lower shard id), the classic greedy
    that is within 4/3 of the best balance, deterministic for the same input.
    """
    import heapq  # here: a process that only reads never needs it (issue 15.1)

    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    members: list[list[bytes]] = [[] for _ in range(num_shards)]
    loads = [(0, shard_id) for shard_id in range(num_shards)]
    heapq.heapify(loads)
    for key in sorted(sizes, key=lambda k: (-sizes[k], k)):
        load, shard_id = heapq.heappop(loads)
        members[shard_id].append(key)
        heapq.heappush(loads, (load + sizes[key], shard_id))
    return plan_in_order(shards=[sorted(keys) for keys in members], sizes=sizes)


def plan_in_order(*, shards: Sequence[Sequence[bytes]], sizes: Mapping[bytes, int]) -> SavePlan:
    """A plan with an explicit assignment and order (e.g. to reproduce TensorFlow's files)."""
    placed: list[tuple[Placement, ...]] = []
    for shard_id, keys in enumerate(shards):
        offset = 0
        row = []
        for key in keys:
            row.append(Placement(key, shard_id, offset, sizes[key]))
            offset += sizes[key]
        placed.append(tuple(row))
    return SavePlan(num_shards=len(shards), shards=tuple(placed))


class ReadGroup(Record):
    """One request: ``[start, end)`` of a shard, covering the ``members`` ranges."""

    __slots__ = ("end", "members", "shard_id", "start")
    shard_id: int
    start: int
    end: int
    members: tuple[Placement, ...]

    def __init__(self, shard_id: int, start: int, end: int, members: tuple[Placement, ...]) -> None:
        _set(self, "shard_id", shard_id)
        _set(self, "start", start)
        _set(self, "end", end)
        _set(self, "members", members)

    @property
    def length(self) -> int:
        return self.end - self.start


_OFFSET_SIZE = operator.attrgetter("offset", "size")  # C, not a lambda: 20,000 at a restore


def plan_reads(
    wanted: Iterable[Placement], *, max_gap: int, max_group_bytes: int
) -> list[ReadGroup]:
    """Merge ranges of the same shard whose gap is at most ``max_gap``.

    A group grows only while it stays within ``max_group_bytes``; a single range larger than
    that is a group of its own. Groups come sorted by shard, then offset.
    """
    by_shard: dict[int, list[Placement]] = {}
    for p in wanted:
        by_shard.setdefault(p.shard_id, []).append(p)
    groups: list[ReadGroup] = []
    for shard_id in sorted(by_shard):
        current: list[Placement] = []
        start = end = 0
        for p in sorted(by_shard[shard_id], key=_OFFSET_SIZE):
            p_end = p.offset + p.size
            if current and p.offset - end <= max_gap and max(end, p_end) - start <= max_group_bytes:
                current.append(p)
                end = max(end, p_end)
                continue
            if current:
                groups.append(ReadGroup(shard_id, start, end, tuple(current)))
            current, start, end = [p], p.offset, p_end
        if current:
            groups.append(ReadGroup(shard_id, start, end, tuple(current)))
    return groups
