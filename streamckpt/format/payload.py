"""A tensor's payload bytes to a numpy array, verified against its entry (spec section 7).

The one checksum rule of every payload: the entry's masked crc32c covers the payload bytes
for fixed-size types; for DT_STRING and DT_VARIANT it covers fixed-width lengths instead of
the stored varints, so their codecs verify it while they parse. Nothing is returned unless
it holds. Little-endian fixed-size data is viewed, not copied.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from streamckpt.errors import ChecksumError, TruncatedError
from streamckpt.format.crc import crc32c, mask
from streamckpt.format.dtypes import DataType, itemsize, numpy_dtype

__all__ = ["check_payload_size", "decode_tensor"]


def check_payload_size(size: int, expected: int) -> None:
    """Refuse a buffer of ``size`` bytes, not ``expected``, before anything views it.

    Stores return exactly the bytes asked for or raise; this keeps a strided view (partial
    reads) or a typed view (whole tensors) from ever reaching past a short buffer.
    """
    if size != expected:
        raise TruncatedError(f"read {size} bytes where {expected} were expected")


def decode_tensor(
    buffer: bytes | bytearray | memoryview,
    *,
    dtype: DataType,
    shape: tuple[int, ...],
    big_endian: bool,
    expected_crc: int,
    crc: int | None = None,
) -> np.ndarray[Any, Any]:
    """An array of ``shape`` over ``buffer``, checked against the masked ``expected_crc``.

    ``crc``: the (unmasked) crc32c of ``buffer``, where the caller computed it while the
    bytes arrived (still in cache: a second pass over memory saved); ignored for strings and
    variants, whose checksum is not over their bytes. Offsets in errors are relative to the
    payload start; the caller makes them file offsets.
    """
    count = math.prod(shape)
    if dtype == DataType.DT_STRING or dtype == DataType.DT_VARIANT:
        # their codecs load only for these dtypes: a plain read's start pays for each module
        from streamckpt.format.strings import decode_strings
        from streamckpt.format.variant import decode_variants

        if dtype == DataType.DT_STRING:
            values = decode_strings(
                memoryview(buffer), count, big_endian=big_endian, expected_crc=expected_crc
            )
        else:
            values = decode_variants(memoryview(buffer), count, expected_crc=expected_crc)
        out = np.empty(count, dtype=object)
        out[:] = values
        return out.reshape(shape)
    check_payload_size(memoryview(buffer).nbytes, count * itemsize(dtype))
    actual = mask(crc32c(buffer) if crc is None else crc)
    if actual != expected_crc:
        raise ChecksumError(
            f"tensor checksum mismatch (stored {expected_crc:#010x}, computed {actual:#010x})"
        )
    array = np.frombuffer(buffer, dtype=numpy_dtype(dtype, big_endian=big_endian), count=count)
    if big_endian and array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return array.reshape(shape)
