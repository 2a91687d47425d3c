"""Which tensors' pieces may fail to tile them: every tensor of a job judged at once.

Pure arrays in, tensor numbers out. The rule is :func:`streamckpt.format.partitioned.
check_tiling`'s: pieces cover every element exactly once if and only if their signed corners
add up to the whole box's. Here the corners of all pieces of all tensors are spelled as one
integer each and the +1 and -1 corners compared as two sorted multisets, so a million pieces
cost two sorts. This is a filter: a tensor it names is then checked on its own by
``check_tiling``, which says what is wrong; a tensor it passes does tile.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from streamckpt.distributed.columns import Ints

__all__ = ["suspect_tilings"]

#: Tilings cut along more axes than this are left to the one-by-one check (2^axes corners).
_VECTOR_CUT_AXES = 4
_INT63 = (1 << 63) - 1


def suspect_tilings(tensor: Ints, ndim: Ints, shape: Ints, starts: Ints, stops: Ints) -> set[int]:
    """The tensors (numbers from ``tensor``) whose pieces may not tile them.

    One row per distinct piece: its tensor's number, rank and full shape, and its box
    (``starts``, ``stops``); axes past a tensor's rank are ignored. Pieces reaching outside
    their tensor or holding nothing are suspects too.
    """
    axes = starts.shape[1]
    live = np.arange(axes)[None, :] < ndim[:, None]
    # an axis past a tensor's rank counts as one of length 1, held whole
    full = np.where(live, shape, 1)
    start = np.where(live, starts, 0)
    stop = np.where(live, stops, 1)
    suspects = set(tensor[((start < 0) | (stop > full) | (stop <= start)).any(axis=1)].tolist())
    cut = np.flatnonzero(((start != 0) | (stop != full)).any(axis=0))
    tensors = np.unique(tensor)
    radix = [int(full[:, a].max()) + 1 for a in cut]
    if len(cut) > _VECTOR_CUT_AXES or len(tensors) * math.prod(radix) > _INT63:
        suspects.update(tensors.tolist())  # too many corners to spell at once: one by one
    else:
        suspects.update(_corner_failures(tensor, start[:, cut], stop[:, cut], full, cut, radix))
    return suspects


def _corner_failures(
    tensor: Ints, start: Ints, stop: Ints, full: Ints, cut: Ints, radix: list[int]
) -> list[int]:
    """The tensors whose pieces' signed corners do not add up to their whole box's."""
    tensors = np.unique(tensor)
    box_full = np.zeros((len(tensors), len(cut)), dtype=np.int64)
    for column, axis in enumerate(cut.tolist()):
        box_full[:, column] = _per_tensor(full[:, axis], tensor, tensors)
    plus: list[Ints] = []  # corners of sign +1, of pieces and (taken away) of whole boxes
    minus: list[Ints] = []
    for subset in itertools.product((False, True), repeat=len(cut)):
        odd = sum(subset) % 2 == 1
        pick = np.array(subset, dtype=bool)
        for owners, corner, into in (
            (tensor, np.where(pick, stop, start), minus if odd else plus),
            (tensors, np.where(pick, box_full, 0), plus if odd else minus),
        ):
            key = owners.astype(np.int64)
            for column, base in enumerate(radix):
                key = key * base + corner[:, column]
            into.append(key)
    # every sum vanishes exactly when the +1 corners and the -1 corners are the same multiset
    positive, negative = np.sort(np.concatenate(plus)), np.sort(np.concatenate(minus))
    if len(positive) == len(negative) and bool((positive == negative).all()):
        return []
    every = np.concatenate([positive, negative])
    weights = np.concatenate([np.ones(len(positive), np.int64), -np.ones(len(negative), np.int64)])
    order = np.argsort(every, kind="stable")
    every = every[order]
    starts = np.flatnonzero(np.concatenate(([True], every[1:] != every[:-1])))
    totals = np.add.reduceat(weights[order], starts)
    failing = every[starts[totals != 0]] // math.prod(radix)
    return sorted(set(failing.tolist()))


def _per_tensor(column: Ints, tensor: Ints, tensors: Ints) -> Ints:
    """``column``'s value for each of ``tensors`` (the same on all of a tensor's rows)."""
    out = np.zeros(int(tensors.max()) + 1, dtype=np.int64)
    out[tensor] = column
    return out[tensors]
