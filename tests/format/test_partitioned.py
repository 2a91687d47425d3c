"""Partitioned tensors: the tiling check agrees with counting every element, in linear time;
pieces must exist and agree with their tensor; which keys are pieces."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamckpt.errors import CorruptCheckpointError, UnsupportedError
from streamckpt.format.bundle import BundleEntry
from streamckpt.format.dtypes import DataType
from streamckpt.format.partitioned import check_piece, check_tiling, piece_keys, tensor_keys
from streamckpt.format.slices import Extent, TensorSlice, encode_slice_key


def box(*ranges: tuple[int, int]) -> TensorSlice:
    return TensorSlice(tuple(Extent(start, stop - start) for start, stop in ranges))


def tiles_by_counting(shape: tuple[int, ...], pieces: list[TensorSlice]) -> bool:
    counts = np.zeros(shape, dtype=np.int64)
    for piece in pieces:
        counts[piece.index_in(shape)] += 1
    return bool((counts == 1).all())


def tiles(shape: tuple[int, ...], pieces: list[TensorSlice]) -> bool:
    try:
        check_tiling(shape, pieces)
    except CorruptCheckpointError:
        return False
    return True


@st.composite
def grid_tilings(draw: st.DrawFn) -> tuple[tuple[int, ...], list[TensorSlice]]:
    """A tensor cut into a grid, each cell maybe cut further along one axis; then perhaps
    one piece moved, dropped, duplicated or grown."""
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
    cuts = [
        sorted(set(draw(st.lists(st.integers(1, size - 1), max_size=2)))) if size > 1 else []
        for size in shape
    ]
    bounds = [
        list(zip([0, *c], [*c, size], strict=True)) for c, size in zip(cuts, shape, strict=True)
    ]
    pieces = [
        box(*cell)
        for cell in np.ndindex(*[len(b) for b in bounds])
        for cell in [tuple(bounds[a][i] for a, i in enumerate(cell))]
    ]
    if pieces and draw(st.booleans()):
        i = draw(st.integers(0, len(pieces) - 1))
        extents = list(pieces[i].extents)
        axis = draw(st.integers(0, len(shape) - 1))
        e = extents[axis]
        assert e.length is not None
        change = draw(st.sampled_from(["drop", "dup", "shift", "grow"]))
        if change == "drop":
            pieces.pop(i)
        elif change == "dup":
            pieces.append(pieces[i])
        elif change == "shift" and e.start > 0:
            extents[axis] = Extent(e.start - 1, e.length)
            pieces[i] = TensorSlice(tuple(extents))
        elif change == "grow" and e.start + e.length < shape[axis]:
            extents[axis] = Extent(e.start, e.length + 1)
            pieces[i] = TensorSlice(tuple(extents))
    return shape, pieces


@st.composite
def random_pieces(draw: st.DrawFn) -> tuple[tuple[int, ...], list[TensorSlice]]:
    shape = tuple(draw(st.lists(st.integers(0, 4), min_size=1, max_size=3)))
    pieces = []
    for _ in range(draw(st.integers(0, 6))):
        ranges = []
        for size in shape:
            start = draw(st.integers(0, size))
            ranges.append((start, draw(st.integers(start, size))))
        pieces.append(box(*ranges))
    return shape, pieces


@settings(max_examples=400, deadline=None)
@given(grid_tilings() | random_pieces())
def test_tiling_check_agrees_with_counting_every_element(
    case: tuple[tuple[int, ...], list[TensorSlice]],
) -> None:
    shape, pieces = case
    assert tiles(shape, pieces) == tiles_by_counting(shape, pieces)


def test_same_volume_with_a_gap_and_an_overlap_is_refused() -> None:
    # a 2x2 grid whose bottom-right cell is replaced by a second copy of the top-left one
    pieces = [box((0, 1), (0, 1)), box((0, 1), (1, 2)), box((1, 2), (0, 1)), box((0, 1), (0, 1))]
    with pytest.raises(CorruptCheckpointError, match="overlapping slices"):
        check_tiling((2, 2), pieces)
    with pytest.raises(CorruptCheckpointError, match="missing pieces"):
        check_tiling((2, 2), pieces[:3])
    with pytest.raises(CorruptCheckpointError, match="overlapping pieces"):
        check_tiling((2, 2), [*pieces, box((1, 2), (1, 2))])
    check_tiling((2, 2), [*pieces[:3], box((1, 2), (1, 2))])


def test_pinwheel_tiling_is_accepted() -> None:
    """Five pieces no single cut separates (no guillotine), around a centre cell."""
    pieces = [
        box((0, 2), (0, 1)),
        box((2, 3), (0, 2)),
        box((1, 3), (2, 3)),
        box((0, 1), (1, 3)),
        box((1, 2), (1, 2)),
    ]
    assert tiles_by_counting((3, 3), pieces)
    check_tiling((3, 3), pieces)


def test_pieces_cut_along_too_many_axes_are_unsupported() -> None:
    shape = (2,) * 9
    cells = [box(*[(i, i + 1) for i in cell]) for cell in np.ndindex(*shape)]
    with pytest.raises(UnsupportedError, match="cut 9 axes"):
        check_tiling(shape, cells)
    check_tiling(shape[:8], [box(*[(i, i + 1) for i in cell]) for cell in np.ndindex(*shape[:8])])


def _grid(rows: int, cols: int) -> list[TensorSlice]:
    return [box((r, r + 1), (c, c + 1)) for r in range(rows) for c in range(cols)]


def test_tiling_check_is_linear_in_pieces_cut_along_two_axes() -> None:
    """The pairwise check this replaced took minutes for tens of thousands of 2-D pieces."""

    def seconds(rows: int) -> float:
        pieces = _grid(rows, 100)
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            check_tiling((rows, 100), pieces)
            best = min(best, time.perf_counter() - started)
        return best

    small, large = seconds(40), seconds(400)  # 4,000 and 40,000 pieces
    # linear: 10x the pieces cost about 10x; quadratic would be 100x
    assert large < 30 * small + 0.05, (small, large)
    assert large < 2.0, large


def _entry(**fields: Any) -> BundleEntry:
    defaults: dict[str, Any] = {"dtype": DataType.DT_FLOAT, "shape": (2, 3), "size": 24}
    return BundleEntry(**{**defaults, **fields})


def test_check_piece() -> None:
    piece = box((0, 2), (0, 3))
    full = _entry(slices=(piece,), size=0)
    good = _entry(offset=8)
    assert check_piece(full, piece, good) is good
    with pytest.raises(CorruptCheckpointError, match="missing from the index"):
        check_piece(full, piece, None)
    with pytest.raises(CorruptCheckpointError, match="disagrees") as info:
        check_piece(full, piece, _entry(dtype=DataType.DT_INT32, offset=8))
    assert info.value.offset == 8
    with pytest.raises(CorruptCheckpointError, match="disagrees"):
        check_piece(full, piece, _entry(shape=(3, 2)))
    with pytest.raises(CorruptCheckpointError, match="itself partitioned"):
        check_piece(full, piece, _entry(slices=(piece,)))


def test_tensor_keys_are_decided_by_the_full_entries_not_by_key_syntax() -> None:
    piece = box((0, 1), (0, 3))
    other = box((1, 2), (0, 3))
    full = _entry(slices=(piece, other), size=0)
    keys = list(piece_keys(b"w", full))
    assert keys == [(piece, encode_slice_key(b"w", piece)), (other, encode_slice_key(b"w", other))]
    # a plain tensor whose name happens to be a well-formed slice key of a tensor "v"
    lookalike = encode_slice_key(b"v", piece)
    entries = {
        b"w": full,
        keys[0][1]: _entry(shape=(1, 3), size=12),
        keys[1][1]: _entry(shape=(1, 3), size=12),
        lookalike: _entry(shape=(1, 3), size=12),
        b"plain": _entry(),
    }
    assert tensor_keys(entries) == [b"w", lookalike, b"plain"]
