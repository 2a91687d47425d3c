"""Which bytes a basic numpy index needs, for reading part of a tensor with one ranged read.

For a C-order tensor the elements of any box (a range per axis) lie between the flat positions
of its first and last corners. We fetch that one contiguous span, view it with the full
tensor's strides (``as_strided``), and apply the remaining steps and integer picks in memory.
A selection along the first axis, the common case, fetches exactly what it returns.

Only basic indexing (ints, slices, Ellipsis) has such a plan; for anything else
:func:`plan_region` returns None and the caller reads the whole tensor. Indexes numpy would
refuse raise numpy's ``IndexError``, so that a partial read fails as indexing the array would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True, slots=True)
class Region:
    byte_start: int
    byte_length: int
    box_shape: tuple[int, ...]
    box_strides: tuple[int, ...]
    inner_index: tuple[int | slice, ...]
    result_shape: tuple[int, ...]


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


def plan_region(shape: tuple[int, ...], itemsize: int, index: Any) -> Region | None:
    """The one byte span ``index`` needs and how to pick from it, or None if not basic."""
    items = _normalize(index, len(shape))
    if items is None:
        return None
    result_shape = np.broadcast_to(np.empty((), dtype=np.uint8), shape)[tuple(items)].shape
    strides = tuple(itemsize * math.prod(shape[d + 1 :]) for d in range(len(shape)))
    lows: list[int] = []
    highs: list[int] = []
    inner: list[int | slice] = []
    empty = math.prod(result_shape) == 0
    for axis, (item, size) in enumerate(zip(items, shape, strict=True)):
        if isinstance(item, slice):
            picked = range(*item.indices(size))
            if len(picked) == 0:
                empty = True
                lows.append(0)
                highs.append(0)
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
        lows.append(lo)
        highs.append(hi)
    if empty:
        return Region(0, 0, (), (), (), tuple(result_shape))
    byte_start = sum(lo * st for lo, st in zip(lows, strides, strict=True))
    byte_end = sum(hi * st for hi, st in zip(highs, strides, strict=True)) + itemsize
    return Region(
        byte_start=byte_start,
        byte_length=byte_end - byte_start,
        box_shape=tuple(hi - lo + 1 for lo, hi in zip(lows, highs, strict=True)),
        box_strides=strides,
        inner_index=tuple(inner),
        result_shape=tuple(result_shape),
    )
