"""What the index says about a tensor, as callers see it (no data, no I/O).

Its own module so that the blocking local reads (:mod:`streamckpt.pipeline.local_read`) and
the async reader describe tensors alike without the former importing the latter's anyio.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from streamckpt.format.bundle import BundleEntry, key_to_name
from streamckpt.format.dtypes import DataType, is_fixed_size, itemsize, numpy_dtype
from streamckpt.format.record import Record
from streamckpt.format.slices import TensorSlice

_set = object.__setattr__


class TensorInfo(Record):
    """What the index says about one tensor, without its data."""

    __slots__ = ("crc32c", "key", "name", "offset", "shape", "shard", "size", "slices", "tf_dtype")
    name: str
    key: bytes
    tf_dtype: DataType
    shape: tuple[int, ...]
    shard: int
    offset: int
    size: int
    crc32c: int
    slices: tuple[TensorSlice, ...]

    def __init__(
        self,
        name: str,
        key: bytes,
        tf_dtype: DataType,
        shape: tuple[int, ...],
        shard: int,
        offset: int,
        size: int,
        crc32c: int,
        slices: tuple[TensorSlice, ...] = (),
    ) -> None:
        _set(self, "name", name)
        _set(self, "key", key)
        _set(self, "tf_dtype", tf_dtype)
        _set(self, "shape", shape)
        _set(self, "shard", shard)
        _set(self, "offset", offset)
        _set(self, "size", size)
        _set(self, "crc32c", crc32c)
        _set(self, "slices", slices)

    @property
    def dtype(self) -> np.dtype[Any]:
        return numpy_dtype(self.tf_dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of the decoded array (for strings: the stored payload size)."""
        if not is_fixed_size(self.tf_dtype):
            return self.size
        return math.prod(self.shape) * itemsize(self.tf_dtype)

    @property
    def is_partitioned(self) -> bool:
        return bool(self.slices)


def info_of(key: bytes, entry: BundleEntry) -> TensorInfo:
    return TensorInfo(
        name=key_to_name(key),
        key=key,
        tf_dtype=entry.dtype,
        shape=entry.shape,
        shard=entry.shard_id,
        offset=entry.offset,
        size=entry.size,
        crc32c=entry.crc32c,
        slices=entry.slices,
    )
