"""Which bytes a box or a basic numpy index of a C-order tensor needs, and how to pick them.

For a C-order tensor the elements of any box (a range per axis) lie between the flat positions
of its first and last corners. :func:`plan_region` gives that one contiguous span, to be viewed
with the full tensor's strides (``as_strided``), the remaining steps and integer picks applied
in memory. A selection along the first axis, the common case, fetches exactly what it returns.

A box that cuts the inner axes (a column block) has gaps inside that span. :func:`plan_runs`
splits it into contiguous runs, one request each, and joins neighbouring runs whenever the gap
between them is at most ``max_gap`` (a request costs more than reading a small gap), so a
request fetches either the box's bytes or gaps that were cheaper to read than to skip.
:func:`plan_piece_reads` does this for every stored piece of a partitioned tensor that a box
meets. All of these are pure functions of shapes and boxes: their result is the I/O to do.

Only basic indexing (ints, slices, Ellipsis) has such a plan; for anything else
:func:`plan_box` and :func:`plan_region` return None and the caller reads the whole tensor.
Indexes numpy would refuse raise numpy's ``IndexError``, so that a partial read fails as
indexing the array would.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from streamckpt.sharding import Box, box_intersection, box_shape

__all__ = [
    "BoxPlan",
    "PieceRead",
    "Region",
    "Runs",
    "c_strides",
    "plan_box",
    "plan_piece_reads",
    "plan_region",
    "plan_runs",
]


@dataclass(frozen=True, slots=True)
class Region:
    byte_start: int
    byte_length: int
    box_shape: tuple[int, ...]
    box_strides: tuple[int, ...]
    inner_index: tuple[int | slice, ...]
    result_shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class BoxPlan:
    """What a basic index asks of a tensor, as a box and a pick from it.

    The box bounds the elements the index picks; ``inner_index`` picks them (numpy's result,
    steps and integer picks included) from an array holding just that box.
    """

    box: Box
    inner_index: tuple[int | slice, ...]
    result_shape: tuple[int, ...]

    @property
    def is_empty(self) -> bool:
        return math.prod(self.result_shape) == 0

    @property
    def picks_whole_box(self) -> bool:
        """True when the result is the box itself (only step-1 slices, no integer picks)."""
        return all(isinstance(i, slice) and i.step in (None, 1) for i in self.inner_index)


def _normalize(index: Any, rank: int) -> list[Any] | None:
    """One item per axis, or None when ``index`` is not basic indexing."""
    items = list(index) if isinstance(index, tuple) else [index]
    for item in items:
        if item is not Ellipsis and not isinstance(item, slice | int | np.integer):
            return None
        if isinstance(item, bool | np.bool_):
            return None
    if items.count(Ellipsis) > 1:
        raise IndexError("an index can only have a single ellipsis")
    if Ellipsis in items:
        at = items.index(Ellipsis)
        fill = rank - (len(items) - 1)
        items[at : at + 1] = [slice(None)] * fill
    if len(items) > rank:
        raise IndexError(f"too many indices for a tensor of rank {rank}")
    return items + [slice(None)] * (rank - len(items))


def plan_box(shape: tuple[int, ...], index: Any) -> BoxPlan | None:
    """The bounding box ``index`` needs and how to pick from it, or None if not basic.

    A step larger than one asks for the bounding box of its range (what one request of the
    span would fetch anyway). An empty selection has a box with an empty axis.
    """
    items = _normalize(index, len(shape))
    if items is None:
        return None
    result_shape = np.broadcast_to(np.empty((), dtype=np.uint8), shape)[tuple(items)].shape
    box: list[tuple[int, int]] = []
    inner: list[int | slice] = []
    for axis, (item, size) in enumerate(zip(items, shape, strict=True)):
        if isinstance(item, slice):
            picked = range(*item.indices(size))
            if len(picked) == 0:
                box.append((0, 0))
                inner.append(slice(0, 0))
                continue
            # from the ends, not by walking the range: an axis may be 2**62 long
            lo, hi = min(picked[0], picked[-1]), max(picked[0], picked[-1])
            stop = picked.stop - lo
            inner.append(slice(picked.start - lo, stop if stop >= 0 else None, picked.step))
        else:
            position = int(item)
            if not -size <= position < size:
                raise IndexError(f"index {position} is out of bounds for axis {axis} of {size}")
            lo = hi = position % size
            inner.append(0)
        box.append((lo, hi + 1))
    return BoxPlan(tuple(box), tuple(inner), tuple(result_shape))


def c_strides(shape: Sequence[int], itemsize: int) -> tuple[int, ...]:
    """Byte strides of a C-order array of ``shape``."""
    return tuple(itemsize * math.prod(shape[d + 1 :]) for d in range(len(shape)))


def plan_region(shape: tuple[int, ...], itemsize: int, index: Any) -> Region | None:
    """The one byte span ``index`` needs and how to pick from it, or None if not basic."""
    plan = plan_box(shape, index)
    if plan is None:
        return None
    if plan.is_empty:
        return Region(0, 0, (), (), (), plan.result_shape)
    strides = c_strides(shape, itemsize)
    byte_start = sum(lo * st for (lo, _), st in zip(plan.box, strides, strict=True))
    byte_end = sum((hi - 1) * st for (_, hi), st in zip(plan.box, strides, strict=True))
    return Region(
        byte_start=byte_start,
        byte_length=byte_end + itemsize - byte_start,
        box_shape=box_shape(plan.box),
        box_strides=strides,
        inner_index=plan.inner_index,
        result_shape=plan.result_shape,
    )


@dataclass(frozen=True, slots=True)
class Runs:
    """A non-empty box of a C-order array as contiguous byte runs, one request each.

    Run ``t`` (a position in ``outer_shape``) starts ``start + sum(t * outer_strides)`` and is
    ``length`` bytes long; viewed as ``inner_shape`` with ``inner_strides`` it holds the box's
    elements at that outer position (the box's axes are the outer then the inner ones).
    """

    start: int
    length: int
    outer_shape: tuple[int, ...]
    outer_strides: tuple[int, ...]
    inner_shape: tuple[int, ...]
    inner_strides: tuple[int, ...]

    @property
    def count(self) -> int:
        return math.prod(self.outer_shape)

    def positions(self) -> Iterator[tuple[tuple[int, ...], int]]:
        """Every run's outer position and its first byte."""
        for t in itertools.product(*(range(n) for n in self.outer_shape)):
            yield t, self.start + sum(i * s for i, s in zip(t, self.outer_strides, strict=True))


def plan_runs(
    shape: tuple[int, ...], itemsize: int, box: Box, *, max_gap: int, max_runs: int
) -> Runs:
    """The runs that read ``box`` of a C-order array of ``shape``, from the innermost axis out.

    A run covers the box on its inner axes. It grows by one more (outer) axis while the gap it
    would skip between neighbours on that axis is at most ``max_gap`` (no gap when the box
    covers the axes inside it whole, or holds one position on it). Then, while there would be
    more than ``max_runs`` runs, it grows anyway: too many requests cost more than the gaps.
    Planning costs the rank, not the box; walking the runs costs their number.
    """
    extents = box_shape(box)
    if any(n <= 0 for n in extents):
        raise ValueError(f"no runs for the empty box {box}")
    strides = c_strides(shape, itemsize)
    split = len(shape)  # the runs cover axes split..; axes before it are walked
    span = itemsize
    while split > 0:
        axis = split - 1
        gap = strides[axis] - span
        if extents[axis] > 1 and gap > max_gap:
            break
        span += (extents[axis] - 1) * strides[axis]
        split = axis
    while split > 0 and math.prod(extents[:split]) > max_runs:
        split -= 1
        span += (extents[split] - 1) * strides[split]
    return Runs(
        start=sum(lo * st for (lo, _), st in zip(box, strides, strict=True)),
        length=span,
        outer_shape=extents[:split],
        outer_strides=strides[:split],
        inner_shape=extents[split:],
        inner_strides=strides[split:],
    )


@dataclass(frozen=True, slots=True)
class PieceRead:
    """What one stored piece gives to a box: its elements inside the box.

    ``runs`` is None when the box covers the piece: it is read whole (and so can be checked
    by its crc32c). ``target`` is where its elements go in an array of the box's shape.
    """

    piece: int
    runs: Runs | None
    target: tuple[slice, ...]

    @property
    def whole(self) -> bool:
        return self.runs is None


def plan_piece_reads(
    box: Box, pieces: Sequence[Box], itemsize: int, *, max_gap: int, max_runs: int
) -> list[PieceRead]:
    """For every piece that meets ``box`` (positions in ``pieces``, in order), what to read.

    Pieces are boxes of the full tensor, each stored as a C-order array of its own shape.
    Linear in the number of pieces; a piece the box does not meet costs no read.
    """
    reads = []
    for number, piece in enumerate(pieces):
        common = box_intersection(box, piece)
        if common is None or any(lo >= hi for lo, hi in common):
            continue
        target = tuple(
            slice(lo - b0, hi - b0) for (lo, hi), (b0, _) in zip(common, box, strict=True)
        )
        if common == tuple(piece):
            reads.append(PieceRead(number, None, target))
            continue
        inside = tuple((lo - p0, hi - p0) for (lo, hi), (p0, _) in zip(common, piece, strict=True))
        runs = plan_runs(box_shape(piece), itemsize, inside, max_gap=max_gap, max_runs=max_runs)
        reads.append(PieceRead(number, runs, target))
    return reads
