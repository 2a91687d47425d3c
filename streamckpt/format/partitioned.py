"""Partitioned tensors as an index describes them (spec section 9).

Which keys hold pieces, and whether the pieces a full entry lists can be assembled into it.

Rules this module keeps, each refused with :class:`CorruptCheckpointError` (the caller adds
URI and tensor):

* the pieces tile the full tensor exactly, no gap and no overlap (TF refuses both);
* every listed piece has its own entry, of the full tensor's dtype, with the piece's shape,
  holding bytes (not itself partitioned).

The authority on which keys are pieces is the ``slices`` list of each full entry, as in TF's
reader, not the syntax of a key: a tensor may be named with bytes that parse as a slice key.
Every check here costs time linear in the number of pieces (times a constant for the number
of axes the pieces cut), whatever the input.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from streamckpt.errors import CorruptCheckpointError, UnsupportedError
from streamckpt.format.bundle import BundleEntry
from streamckpt.format.slices import (
    TensorSlice,
    decode_slice_key,
    encode_slice_key_tail,
    slice_key_head,
)

__all__ = ["check_piece", "check_tiling", "piece_keys", "tensor_keys"]

# Pieces cut along more axes than this are refused: the tiling check costs 2**axes per piece.
# TF partitions along one axis; a 2-D or 3-D device mesh cuts along two or three.
MAX_CUT_AXES = 8


def piece_keys(key: bytes, entry: BundleEntry) -> Iterator[tuple[TensorSlice, bytes]]:
    """The index key of every piece ``entry`` lists, in its order, one at a time.

    A generator, so that a caller looking each key up stops building keys at the first that
    is missing: a long name listed with many pieces would otherwise spell name x pieces bytes
    of keys that the index itself never paid for.
    """
    head = slice_key_head(key)
    for piece in entry.slices:
        yield piece, head + encode_slice_key_tail(piece)


def tensor_keys(entries: Mapping[bytes, BundleEntry]) -> list[bytes]:
    """The keys of ``entries`` that are tensors: all but the pieces some full entry lists.

    A key is a piece when it parses as the slice key of a tensor in ``entries`` whose full
    entry lists that slice; parsing costs the key's length, so this is linear in the index.
    """
    listed: dict[bytes, frozenset[TensorSlice]] = {}
    tensors = []
    for key in entries:
        if key[:1] == b"\x00" and _is_listed_piece(key, entries, listed):
            continue
        tensors.append(key)
    return tensors


def _is_listed_piece(
    key: bytes,
    entries: Mapping[bytes, BundleEntry],
    listed: dict[bytes, frozenset[TensorSlice]],
) -> bool:
    try:
        name, piece = decode_slice_key(key)
    except CorruptCheckpointError:
        return False  # not a slice key at all
    full = entries.get(name)
    if full is None or not full.slices:
        return False
    if name not in listed:
        listed[name] = frozenset(full.slices)
    return piece in listed[name]


def check_piece(
    entry: BundleEntry, piece: TensorSlice, piece_entry: BundleEntry | None
) -> BundleEntry:
    """The entry of one piece of ``entry``, refused unless it can be copied into place."""
    if piece_entry is None:
        raise CorruptCheckpointError("a slice of a partitioned tensor is missing from the index")
    if piece_entry.slices:
        raise CorruptCheckpointError("a slice of a partitioned tensor is itself partitioned")
    if piece_entry.dtype != entry.dtype or piece_entry.shape != piece.shape_in(entry.shape):
        raise CorruptCheckpointError(
            "a slice's dtype or shape disagrees with its partitioned tensor",
            shard=piece_entry.shard_id,
            offset=piece_entry.offset,
        )
    return piece_entry


def check_tiling(shape: Sequence[int], pieces: Sequence[TensorSlice]) -> None:
    """Refuse pieces that do not tile a tensor of ``shape`` exactly.

    Counting corners decides it in time linear in the pieces (times 2 to the number of axes
    they cut, at most :data:`MAX_CUT_AXES`), where comparing every pair of pieces took
    minutes for pieces cut along two axes. The number of pieces covering an element is a
    sum of boxes' indicator functions; a box's
    indicator is a signed sum of "quadrant" steps at its corners (+1 at its low corner, -1 at
    each corner one axis beyond, and so on), and steps at distinct corners are independent.
    So the pieces cover every element exactly once if and only if their signed corners,
    added up, cancel to the tensor's own. Only the axes some piece cuts take part: on the
    others every piece spans the whole axis.
    """
    rank = len(shape)
    starts = np.empty((len(pieces), rank), dtype=np.int64)
    stops = np.empty((len(pieces), rank), dtype=np.int64)
    for row, piece in enumerate(pieces):
        if len(piece.extents) != rank:
            piece.check_within(shape)  # raises: a piece of another rank
        for axis, extent in enumerate(piece.extents):
            starts[row, axis] = extent.start
            length = extent.length
            stops[row, axis] = shape[axis] if length is None else extent.start + length
    ends = np.array(shape, dtype=np.int64)
    outside = np.flatnonzero((stops > ends).any(axis=1))
    if len(outside):
        pieces[int(outside[0])].check_within(shape)  # raises, naming the dimension
    volume = math.prod(shape)
    covered = sum(math.prod(row) for row in (stops - starts).tolist())
    if covered != volume:
        problem = "overlapping" if covered > volume else "missing"
        raise CorruptCheckpointError(
            f"partitioned tensor's slices do not tile it ({problem} pieces)"
        )
    if volume == 0:
        return  # no element to cover twice or to miss
    cut_axes = np.flatnonzero((starts != 0).any(axis=0) | (stops != ends).any(axis=0))
    if len(cut_axes) > MAX_CUT_AXES:
        raise UnsupportedError(
            f"partitioned tensor's slices cut {len(cut_axes)} axes; at most {MAX_CUT_AXES}"
            " are supported"
        )
    found = _signed_corners(starts[:, cut_axes], stops[:, cut_axes])
    expected = _signed_corners(np.zeros((1, len(cut_axes)), np.int64), ends[None, cut_axes])
    if found != expected:
        raise CorruptCheckpointError("partitioned tensor has overlapping slices")


def _signed_corners(
    starts: np.ndarray[Any, np.dtype[np.int64]], stops: np.ndarray[Any, np.dtype[np.int64]]
) -> dict[tuple[int, ...], int]:
    """The corners of boxes ``[starts, stops)`` (one per row) with their summed signs.

    A corner takes the stop on the axes in a subset and the start on the rest; its sign is
    -1 to the size of that subset. Corners whose signs cancel are left out.
    """
    count, rank = starts.shape
    points = []
    signs = []
    for subset in itertools.product((False, True), repeat=rank):
        points.append(np.where(np.array(subset), stops, starts))
        signs.append(np.full(count, -1 if sum(subset) % 2 else 1, dtype=np.int64))
    corners = np.concatenate(points)
    weights = np.concatenate(signs)
    order = np.lexsort(corners.T[::-1]) if rank else np.arange(len(corners))
    corners, weights = corners[order], weights[order]
    first = np.ones(len(corners), dtype=bool)
    first[1:] = (corners[1:] != corners[:-1]).any(axis=1)
    starts_of_groups = np.flatnonzero(first)
    totals = np.add.reduceat(weights, starts_of_groups) if len(corners) else weights
    unique = corners[starts_of_groups]
    kept = np.flatnonzero(totals)
    return {tuple(unique[i].tolist()): int(totals[i]) for i in kept}
