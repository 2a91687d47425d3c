"""CRC-32C and TensorFlow's masking of stored checksums.

Every checksum TensorFlow stores (block trailers, tensor payloads, string length sums) is the
*masked* CRC-32C: a CRC of data that itself holds CRCs would otherwise be weak.
"""

from __future__ import annotations

import crc32c as _crc32c

_MASK_DELTA = 0xA282EAD8
_U32 = 0xFFFFFFFF


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC-32C of ``data``, extending ``crc`` (the CRC of what came before)."""
    return int(_crc32c.crc32c(data, crc))


def mask(crc: int) -> int:
    """Rotate right by 15 bits and add a constant, as TensorFlow stores CRCs."""
    return ((((crc >> 15) | (crc << 17)) & _U32) + _MASK_DELTA) & _U32


def unmask(masked: int) -> int:
    rotated = (masked - _MASK_DELTA) & _U32
    return ((rotated >> 17) | (rotated << 15)) & _U32
