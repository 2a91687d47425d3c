"""Turning caller values into payloads ready to stream (decoding is format.payload's).

On save a numeric tensor's payload is a view of the caller's (contiguous, little-endian)
array: nothing is copied unless the layout demands it or the caller asked for a snapshot.
DT_STRING / DT_VARIANT payloads are encoded up front; they are small next to numeric ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from streamckpt.device import HostTransfer
from streamckpt.errors import UnsupportedError
from streamckpt.format.dtypes import DataType, from_numpy, is_fixed_size, numpy_dtype
from streamckpt.format.strings import encode_strings
from streamckpt.format.variant import encode_variants
from streamckpt.tree import to_numpy


@dataclass(frozen=True, slots=True)
class Typed:
    """A value saved with an explicit TensorFlow dtype.

    For the types numpy cannot name: ``DT_QINT8`` and the other quantized types, and
    ``DT_VARIANT`` (elements given as bytes).
    """

    value: Any
    dtype: DataType


@dataclass(frozen=True, slots=True)
class PreparedTensor:
    """A tensor ready to stream: its payload bytes and what the entry will say about them.

    A device array's bytes may still be on their way (``transfer``): the save plans it by its
    size and waits for the bytes only when it streams them (:meth:`data`).
    """

    key: bytes
    dtype: DataType
    shape: tuple[int, ...]
    payload: memoryview
    crc32c: int | None  # masked; known up front for encoded payloads, else computed while writing
    transfer: HostTransfer | None = None

    @property
    def size(self) -> int:
        return self.payload.nbytes if self.transfer is None else self.transfer.nbytes

    def data(self) -> memoryview:
        """The payload; for a device array, once its transfer to the host is complete."""
        if self.transfer is None:
            return self.payload
        flat = np.ascontiguousarray(self.transfer.result()).reshape(-1)
        return memoryview(cast(Any, flat.view(np.uint8)))


def as_array(value: Any) -> np.ndarray[Any, Any]:
    """Host numpy view of a leaf (:func:`streamckpt.tree.to_numpy`), or of a nested list."""
    if isinstance(value, list | tuple):
        return np.asarray(value)
    return to_numpy(value)


def prepare(key: bytes, value: Any, *, copy: bool) -> PreparedTensor:
    """Build the payload for one tensor; ``copy`` snapshots numeric data (async saves)."""
    forced: DataType | None = None
    if isinstance(value, Typed):
        forced, value = value.dtype, value.value
    if isinstance(value, HostTransfer) and forced is None:
        dtype = from_numpy(value.dtype)
        if value.dtype.byteorder != ">" and is_fixed_size(dtype):
            return PreparedTensor(key, dtype, value.shape, memoryview(b""), None, value)
    array = as_array(value)
    dtype = forced if forced is not None else from_numpy(array.dtype)
    shape = tuple(int(d) for d in array.shape)
    if dtype == DataType.DT_STRING:
        payload, crc = encode_strings([_as_bytes(x) for x in array.reshape(-1)])
        return PreparedTensor(key, dtype, shape, memoryview(payload), crc)
    if dtype == DataType.DT_VARIANT:
        payload, crc = encode_variants([_as_bytes(x) for x in array.reshape(-1)])
        return PreparedTensor(key, dtype, shape, memoryview(payload), crc)
    target = numpy_dtype(dtype)
    if array.dtype != target:
        array = array.astype(target)  # big-endian input, or a dtype the caller forced
    flat = np.ascontiguousarray(array).reshape(-1)
    if copy and np.shares_memory(flat, array):
        flat = flat.copy()
    return PreparedTensor(key, dtype, shape, memoryview(cast(Any, flat.view(np.uint8))), None)


def _as_bytes(element: Any) -> bytes:
    if isinstance(element, bytes):
        return element
    if isinstance(element, str):
        return element.encode("utf-8")
    if isinstance(element, np.bytes_ | bytearray | memoryview):
        return bytes(element)
    raise UnsupportedError(f"cannot save {type(element).__name__} as a string element")
