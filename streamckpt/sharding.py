"""One process's piece of a larger tensor: :class:`Slice`, and the box arithmetic of pieces.

A job spread over many processes holds some tensors in pieces. Each piece is a hyper-rectangle
("box") of the full tensor: per axis a half-open ``[start, stop)``. On save the pieces of all
processes become one partitioned tensor (TensorFlow's slices); on restore a ``Slice`` target
asks for exactly its box, whatever pieces the checkpoint holds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["Box", "Slice", "box_intersection", "box_shape", "full_box"]

#: Per axis ``(start, stop)``, half-open.
Box = tuple[tuple[int, int], ...]


def _value_shape(value: Any) -> tuple[int, ...]:
    shape = getattr(value, "shape", None)
    if shape is None:
        import numpy as np

        shape = np.shape(value)
    return tuple(int(n) for n in shape)


class Slice:
    """``value`` is the box ``offset .. offset + value.shape`` of a tensor of ``full_shape``.

    On save, the slices all processes give for one name must tile its full shape exactly (no
    gap, no overlap; equal boxes from several processes are replicas, written once). On
    restore, a ``Slice`` whose value is an array (numpy, torch, anything writable through
    ``__array__`` or DLPack) is filled in place with that box of the stored tensor.
    """

    __slots__ = ("full_shape", "offset", "value")

    def __init__(
        self, value: Any, *, full_shape: Sequence[int], offset: Sequence[int] | None = None
    ) -> None:
        full = tuple(int(n) for n in full_shape)
        shape = _value_shape(value)
        start = tuple(int(n) for n in offset) if offset is not None else (0,) * len(full)
        if len(shape) != len(full) or len(start) != len(full):
            raise ValueError(
                f"a Slice needs a value, full_shape and offset of one rank; got value shape "
                f"{shape}, full_shape {full}, offset {start}"
            )
        for axis, (lo, n, total) in enumerate(zip(start, shape, full, strict=True)):
            if total < 0 or lo < 0 or lo + n > total:
                raise ValueError(
                    f"Slice axis {axis}: offset {lo} + length {n} is outside 0..{total}"
                )
        self.value = value
        self.full_shape = full
        self.offset = start

    @property
    def shape(self) -> tuple[int, ...]:
        return _value_shape(self.value)

    @property
    def box(self) -> Box:
        return tuple((lo, lo + n) for lo, n in zip(self.offset, self.shape, strict=True))

    @property
    def is_whole(self) -> bool:
        return self.box == full_box(self.full_shape)

    def __repr__(self) -> str:
        return (
            f"Slice(<{type(self.value).__name__} {self.shape}>, full_shape={self.full_shape}, "
            f"offset={self.offset})"
        )


def full_box(shape: Sequence[int]) -> Box:
    return tuple((0, int(n)) for n in shape)


def box_shape(box: Box) -> tuple[int, ...]:
    return tuple(stop - start for start, stop in box)


def box_size(box: Box) -> int:
    return math.prod(box_shape(box))


def box_intersection(a: Box, b: Box) -> Box | None:
    """The common part of two boxes of one rank, or None when they share no element."""
    out = []
    for (a0, a1), (b0, b1) in zip(a, b, strict=True):
        lo, hi = max(a0, b0), min(a1, b1)
        if lo >= hi:
            return None
        out.append((lo, hi))
    return tuple(out)
