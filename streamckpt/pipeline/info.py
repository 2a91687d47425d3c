"""What the index says about a tensor, as callers see it (no data, no I/O).

Its own module so that the blocking local reads (:mod:`streamckpt.pipeline.local_read`) and
the async reader describe tensors alike without the former importing the latter's anyio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from streamckpt.format.bundle import BundleEntry, key_to_name
from streamckpt.format.dtypes import DataType, is_fixed_size, itemsize, numpy_dtype
from streamckpt.format.slices import TensorSlice


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """What the index says about one tensor, without its data."""

    name: str
    key: bytes
    tf_dtype: DataType
    shape: tuple[int, ...]
    shard: int
    offset: int
    size: int
    crc32c: int
    slices: tuple[TensorSlice, ...] = ()

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
