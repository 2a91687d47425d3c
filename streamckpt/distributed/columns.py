"""Column tools of the planner and the merge: equal rows grouped, the collector paused.

A job of 1,024 processes x 1,000 items is a million items, and a Python step per item costs
seconds; grouping equal rows (the holders of one value, the pieces of one box) is one sort
instead. What is sorted is a 64-bit word per row, its hash above its row number: numpy
sorts words several times faster than it sorts row numbers by key, and the row numbers make
the order stable. Hashes are only a shortcut: rows of one hash that differ are noticed and
sorted by their values, so no two values are ever merged by a collision.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

__all__ = ["Groups", "Ints", "group_rows", "paused_gc"]

Ints = np.ndarray[Any, np.dtype[np.int64]]

_MIX = np.uint64(0x9E3779B97F4A7C15)
_SHIFT = np.uint64(31)


class Groups:
    """Rows put in an order where equal rows are side by side, and where each run starts.

    The order is stable: equal rows keep their order of appearance, so the first of a run is
    the row that came first (for the planner: the lowest rank).
    """

    __slots__ = ("ids", "order", "starts")

    def __init__(self, order: Ints, starts: Ints, count: int) -> None:
        #: row numbers, equal rows together
        self.order = order
        #: positions in ``order`` where each run of equal rows begins
        self.starts = starts
        #: per row: the number of its run
        self.ids = np.empty(count, dtype=np.int64)
        runs = np.zeros(count, dtype=np.int64)
        runs[starts[1:]] = 1
        self.ids[order] = np.cumsum(runs)

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def first(self) -> Ints:
        """Per run: its first row."""
        return self.order[self.starts]

    @property
    def sizes(self) -> Ints:
        """Per run: how many rows it has."""
        return np.diff(np.append(self.starts, len(self.order)))


def _columns(blocks: Sequence[Ints]) -> list[Ints]:
    return [column for block in blocks for column in (block.T if block.ndim == 2 else [block])]


def group_rows(*blocks: Ints) -> Groups:
    """The runs of equal rows of the blocks side by side (1-d blocks are one column each).

    Given as blocks, not as one stacked matrix: stacking a million rows costs as much as
    hashing them.
    """
    columns = _columns(blocks)
    count = len(columns[0]) if columns else 0
    if count == 0:
        empty = np.zeros(0, dtype=np.int64)
        return Groups(empty, empty, 0)
    shift = np.uint64(max(1, (count - 1).bit_length()))
    hashes = np.zeros(count, dtype=np.uint64)
    for column in columns:
        hashes ^= column.astype(np.uint64)
        hashes *= _MIX
        hashes ^= hashes >> _SHIFT
    words = (hashes >> shift << shift) | np.arange(count, dtype=np.uint64)
    words.sort()
    order = (words & ((np.uint64(1) << shift) - np.uint64(1))).astype(np.int64)
    hashes = words >> shift
    new = np.ones(count, dtype=bool)
    new[1:] = hashes[1:] != hashes[:-1]
    differ = _differ(columns, order)
    collided = np.flatnonzero(differ & ~new[1:])
    if len(collided):
        # runs of one hash holding other rows: sort each by its rows (stable: lexsort)
        run_starts = np.flatnonzero(new)
        for run in np.unique(np.searchsorted(run_starts, collided, side="right") - 1).tolist():
            lo = int(run_starts[run])
            hi = int(run_starts[run + 1]) if run + 1 < len(run_starts) else count
            segment = order[lo:hi]
            order[lo:hi] = segment[np.lexsort([column[segment] for column in columns[::-1]])]
        differ = _differ(columns, order)
    new[1:] |= differ
    return Groups(order, np.flatnonzero(new).astype(np.int64), count)


def _differ(columns: Sequence[Ints], order: Ints) -> np.ndarray[Any, np.dtype[np.bool_]]:
    """Per position of ``order`` after the first: whether its row differs from the last."""
    differ = np.zeros(max(0, len(order) - 1), dtype=bool)
    for column in columns:
        ordered = column[order]
        differ |= ordered[1:] != ordered[:-1]
    return differ


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """No cyclic collection while a million small tuples and bytes are made.

    They hold no cycles, but each few hundred allocations would start a collection that
    walks all of them again: it doubled the merge's time. Collection resumes afterwards.
    """
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()
