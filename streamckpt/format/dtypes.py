"""TensorFlow DataType numbers and their numpy counterparts.

Fixed-size types map to a numpy dtype whose itemsize is exactly the bytes per element in the
data file (sub-byte and float8 kinds take one byte each, as ml_dtypes stores them too).
DT_STRING and DT_VARIANT have no fixed size; they decode to object arrays of ``bytes``.
The quantized types are stored like plain integers; they read back as those integers, and a
caller that wants to write them names the dtype explicitly.

``ml_dtypes`` (bfloat16, float8, float4, int4, int2) is imported only when a checkpoint or a
value has one of its types: its import costs more than a small read (0.6-0.8 s of 0.7's
extension module on the test machine). A numpy array of one of its types cannot exist before
it is imported, so a saved value never needs the import to be recognised.
"""

from __future__ import annotations

import enum
import sys
from typing import Final

import numpy as np

from streamckpt.errors import UnsupportedError


class DataType(enum.IntEnum):
    """TensorFlow's DataType enum, the values that can appear in a checkpoint."""

    DT_INVALID = 0
    DT_FLOAT = 1
    DT_DOUBLE = 2
    DT_INT32 = 3
    DT_UINT8 = 4
    DT_INT16 = 5
    DT_INT8 = 6
    DT_STRING = 7
    DT_COMPLEX64 = 8
    DT_INT64 = 9
    DT_BOOL = 10
    DT_QINT8 = 11
    DT_QUINT8 = 12
    DT_QINT32 = 13
    DT_BFLOAT16 = 14
    DT_QINT16 = 15
    DT_QUINT16 = 16
    DT_UINT16 = 17
    DT_COMPLEX128 = 18
    DT_HALF = 19
    DT_RESOURCE = 20
    DT_VARIANT = 21
    DT_UINT32 = 22
    DT_UINT64 = 23
    DT_FLOAT8_E5M2 = 24
    DT_FLOAT8_E4M3FN = 25
    DT_FLOAT8_E4M3FNUZ = 26
    DT_FLOAT8_E4M3B11FNUZ = 27
    DT_FLOAT8_E5M2FNUZ = 28
    DT_INT4 = 29
    DT_UINT4 = 30
    DT_INT2 = 31
    DT_UINT2 = 32
    DT_FLOAT4_E2M1FN = 33


D = DataType

# Little-endian numpy dtype of each fixed-size type numpy itself has.
_NUMPY: Final[dict[DataType, np.dtype[np.generic]]] = {
    D.DT_FLOAT: np.dtype("<f4"),
    D.DT_DOUBLE: np.dtype("<f8"),
    D.DT_INT32: np.dtype("<i4"),
    D.DT_UINT8: np.dtype("u1"),
    D.DT_INT16: np.dtype("<i2"),
    D.DT_INT8: np.dtype("i1"),
    D.DT_COMPLEX64: np.dtype("<c8"),
    D.DT_INT64: np.dtype("<i8"),
    D.DT_BOOL: np.dtype("?"),
    D.DT_QINT8: np.dtype("i1"),
    D.DT_QUINT8: np.dtype("u1"),
    D.DT_QINT32: np.dtype("<i4"),
    D.DT_QINT16: np.dtype("<i2"),
    D.DT_QUINT16: np.dtype("<u2"),
    D.DT_UINT16: np.dtype("<u2"),
    D.DT_COMPLEX128: np.dtype("<c16"),
    D.DT_HALF: np.dtype("<f2"),
    D.DT_UINT32: np.dtype("<u4"),
    D.DT_UINT64: np.dtype("<u8"),
}

# The types of ml_dtypes, by attribute name, with their bytes per element in a data file.
_ML_DTYPES: Final[dict[DataType, tuple[str, int]]] = {
    D.DT_BFLOAT16: ("bfloat16", 2),
    D.DT_FLOAT8_E5M2: ("float8_e5m2", 1),
    D.DT_FLOAT8_E4M3FN: ("float8_e4m3fn", 1),
    D.DT_FLOAT8_E4M3FNUZ: ("float8_e4m3fnuz", 1),
    D.DT_FLOAT8_E4M3B11FNUZ: ("float8_e4m3b11fnuz", 1),
    D.DT_FLOAT8_E5M2FNUZ: ("float8_e5m2fnuz", 1),
    D.DT_INT4: ("int4", 1),
    D.DT_UINT4: ("uint4", 1),
    D.DT_INT2: ("int2", 1),
    D.DT_UINT2: ("uint2", 1),
    D.DT_FLOAT4_E2M1FN: ("float4_e2m1fn", 1),
}

VARIABLE_SIZE: Final = frozenset({D.DT_STRING, D.DT_VARIANT})

# numpy -> TensorFlow; the quantized types are never inferred (they share numpy types).
_QUANTIZED: Final = frozenset({D.DT_QINT8, D.DT_QUINT8, D.DT_QINT32, D.DT_QINT16, D.DT_QUINT16})
_FROM_NUMPY: Final[dict[np.dtype[np.generic], DataType]] = {}
for _dt, _np in _NUMPY.items():
    if _dt not in _QUANTIZED:
        _FROM_NUMPY.setdefault(_np, _dt)
_FROM_ML_DTYPES: dict[np.dtype[np.generic], DataType] = {}  # filled once ml_dtypes is loaded


def _ml_dtype(dtype: DataType) -> np.dtype[np.generic]:
    """The ml_dtypes type of ``dtype``, importing ml_dtypes on first use."""
    import ml_dtypes

    found: np.dtype[np.generic] = np.dtype(getattr(ml_dtypes, _ML_DTYPES[dtype][0]))
    return found


def to_datatype(value: int) -> DataType:
    """Validate a dtype number read from an entry; unknown or unsavable ones are refused."""
    try:
        dt = DataType(value)
    except ValueError:
        raise UnsupportedError(f"unknown dtype number {value}") from None
    if dt == D.DT_INVALID or dt == D.DT_RESOURCE:
        raise UnsupportedError(f"dtype {dt.name} cannot appear in a checkpoint")
    return dt


def is_fixed_size(dtype: DataType) -> bool:
    return dtype not in VARIABLE_SIZE


def numpy_dtype(dtype: DataType, *, big_endian: bool = False) -> np.dtype[np.generic]:
    """The numpy dtype that views a fixed-size payload; ``object`` for strings and variants."""
    if dtype in VARIABLE_SIZE:
        return np.dtype(object)
    np_dtype = _NUMPY.get(dtype)
    if np_dtype is None:
        if dtype not in _ML_DTYPES:
            raise UnsupportedError(f"dtype {dtype.name} has no numpy counterpart")
        np_dtype = _ml_dtype(dtype)
    return np_dtype.newbyteorder(">") if big_endian and np_dtype.itemsize > 1 else np_dtype


def itemsize(dtype: DataType) -> int:
    """Bytes per element in a data file; 0 for variable-size types."""
    if dtype in VARIABLE_SIZE:
        return 0
    extended = _ML_DTYPES.get(dtype)
    return extended[1] if extended is not None else _NUMPY[dtype].itemsize


def from_numpy(np_dtype: np.dtype[np.generic]) -> DataType:
    """The DataType a numpy array is saved as.

    Object and bytes arrays are DT_STRING; numpy's fixed-width ``S`` strings are accepted too.
    """
    if np_dtype.kind in ("O", "S"):
        return D.DT_STRING
    native = np_dtype.newbyteorder("<") if np_dtype.byteorder == ">" else np_dtype
    found = _FROM_NUMPY.get(native)
    if found is None and "ml_dtypes" in sys.modules:  # only then can it be one of its types
        if not _FROM_ML_DTYPES:
            _FROM_ML_DTYPES.update({_ml_dtype(dt): dt for dt in _ML_DTYPES})
        found = _FROM_ML_DTYPES.get(native)
    if found is None:
        raise UnsupportedError(f"numpy dtype {np_dtype} has no TensorFlow counterpart")
    return found
