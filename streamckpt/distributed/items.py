"""What a process sends for a multi-process save: its items, as objects and as columns.

Rule: a process describes what it holds (names, dtypes, full shapes, boxes, byte sizes),
never data; the columns (:class:`LocalPlan`) are what is gathered, built by each process
from its own items, so the planner (:mod:`.plan`) does its per-item work in numpy. Also the
keys values are stored under, TensorFlow's way.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from streamckpt.distributed.columns import Ints
from streamckpt.format.bundle import key_to_name
from streamckpt.format.slices import Extent, TensorSlice, encode_slice_key
from streamckpt.sharding import Box

__all__ = ["LocalItem", "LocalPlan", "fingerprint", "index_key", "to_tensor_slice"]


@dataclass(frozen=True, slots=True)
class LocalItem:
    """One value a process holds: a whole tensor (``box`` None) or one piece of it."""

    name: bytes
    dtype: int
    full_shape: tuple[int, ...]
    box: Box | None
    nbytes: int

    @property
    def key(self) -> bytes:
        """The index key its bytes are stored under."""
        return index_key(self.name, self.full_shape, self.box)


def _ints(values: Iterable[int]) -> Ints:
    return np.fromiter(values, dtype=np.int64)


def _matrix(rows: Sequence[Sequence[int]], width: int) -> Ints:
    out = np.zeros((len(rows), width), dtype=np.int64)
    for row, values in enumerate(rows):
        out[row, : len(values)] = values
    return out


@dataclass(frozen=True, eq=False)
class LocalPlan:
    """What one process holds, as columns: what a save gathers from every process.

    Each process builds its own (from its thousand-odd items, beside the others), and a
    million items arrive as a thousand small sets of arrays. Axes past an item's rank are 0.
    A whole value's box is its whole shape.
    """

    names: tuple[bytes, ...]
    dtypes: Ints
    nbytes: Ints
    ndims: Ints
    shapes: Ints
    starts: Ints
    stops: Ints
    whole: np.ndarray[Any, np.dtype[np.bool_]]

    @classmethod
    def of(cls, items: Iterable[LocalItem]) -> LocalPlan:
        items = list(items)
        width = max((len(item.full_shape) for item in items), default=0)
        for item in items:
            if item.box is not None and len(item.box) != len(item.full_shape):
                raise ValueError(
                    f"{key_to_name(item.name)!r}: a box of {len(item.box)} axes for a tensor "
                    f"of {len(item.full_shape)}"
                )
        return cls(
            names=tuple(item.name for item in items),
            dtypes=_ints(int(item.dtype) for item in items),
            nbytes=_ints(item.nbytes for item in items),
            ndims=_ints(len(item.full_shape) for item in items),
            shapes=_matrix([item.full_shape for item in items], width),
            starts=_matrix([[a for a, _ in item.box or ()] for item in items], width),
            stops=_matrix(
                [[b for _, b in item.box] if item.box else item.full_shape for item in items],
                width,
            ),
            whole=np.fromiter((item.box is None for item in items), dtype=bool, count=len(items)),
        )

    def __len__(self) -> int:
        return len(self.names)

    def width(self, axes: int) -> LocalPlan:
        """The same plan with ``axes`` columns of shape and box (padded with 0)."""
        have = self.shapes.shape[1]
        if have == axes:
            return self
        pad = ((0, 0), (0, axes - have))
        return LocalPlan(
            self.names,
            self.dtypes,
            self.nbytes,
            self.ndims,
            np.pad(self.shapes, pad),
            np.pad(self.starts, pad),
            np.pad(self.stops, pad),
            self.whole,
        )


def index_key(name: bytes, full_shape: Sequence[int], box: Box | None) -> bytes:
    """The key a value is stored under: its name when whole, else its slice key."""
    if box is None:
        return name
    return encode_slice_key(name, to_tensor_slice(full_shape, box))


def to_tensor_slice(full_shape: Sequence[int], box: Box) -> TensorSlice:
    """TensorFlow's form of a box: an axis taken whole is written as "full" (length -1)."""
    return TensorSlice(
        tuple(
            Extent(0, None) if (start, stop) == (0, size) else Extent(start, stop - start)
            for (start, stop), size in zip(box, full_shape, strict=True)
        )
    )


def fingerprint(items: object) -> bytes:
    """A digest of a picklable value (a process's plan): equal digests, the same plan."""
    return hashlib.blake2b(pickle.dumps(items, protocol=5), digest_size=16).digest()
