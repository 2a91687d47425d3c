"""Payload bytes to arrays: nothing returned unless the entry's checksum holds."""

from __future__ import annotations

import numpy as np
import pytest

from streamckpt.errors import ChecksumError, CorruptCheckpointError, TruncatedError
from streamckpt.format.crc import crc32c, mask
from streamckpt.format.dtypes import DataType
from streamckpt.format.payload import check_payload_size, decode_tensor
from streamckpt.format.strings import encode_strings
from streamckpt.format.variant import encode_variants


def test_fixed_size_is_viewed_and_checked() -> None:
    array = np.arange(6, dtype="<i4").reshape(2, 3)
    buffer = bytearray(array.tobytes())
    crc = mask(crc32c(buffer))
    got = decode_tensor(
        buffer, dtype=DataType.DT_INT32, shape=(2, 3), big_endian=False, expected_crc=crc
    )
    np.testing.assert_array_equal(got, array)
    assert np.shares_memory(got, np.frombuffer(buffer, dtype=np.uint8))  # no copy
    buffer[5] ^= 1
    with pytest.raises(ChecksumError, match="tensor checksum mismatch"):
        decode_tensor(
            buffer, dtype=DataType.DT_INT32, shape=(2, 3), big_endian=False, expected_crc=crc
        )


def test_big_endian_payloads_come_back_little_endian() -> None:
    array = np.arange(4, dtype=">f8")
    raw = array.tobytes()
    got = decode_tensor(
        raw, dtype=DataType.DT_DOUBLE, shape=(4,), big_endian=True, expected_crc=mask(crc32c(raw))
    )
    assert got.dtype == np.dtype("<f8")
    np.testing.assert_array_equal(got, np.arange(4, dtype="<f8"))


def test_strings_and_variants_are_checked_by_their_codecs() -> None:
    payload, crc = encode_strings([b"a", b"", b"ccc"])
    got = decode_tensor(
        payload, dtype=DataType.DT_STRING, shape=(3, 1), big_endian=False, expected_crc=crc
    )
    assert got.shape == (3, 1) and got.reshape(-1).tolist() == [b"a", b"", b"ccc"]
    with pytest.raises(ChecksumError):
        decode_tensor(
            payload, dtype=DataType.DT_STRING, shape=(3, 1), big_endian=False, expected_crc=crc ^ 1
        )
    payload, crc = encode_variants([b"x", b"yz"])
    got = decode_tensor(
        payload, dtype=DataType.DT_VARIANT, shape=(2,), big_endian=False, expected_crc=crc
    )
    assert got.tolist() == [b"x", b"yz"]
    empty, crc = encode_variants([])
    assert empty == b""
    got = decode_tensor(
        empty, dtype=DataType.DT_VARIANT, shape=(0, 2), big_endian=False, expected_crc=crc
    )
    assert got.shape == (0, 2)
    with pytest.raises(CorruptCheckpointError):
        decode_tensor(
            empty, dtype=DataType.DT_VARIANT, shape=(1,), big_endian=False, expected_crc=crc
        )


def test_a_short_buffer_is_refused_before_it_is_viewed() -> None:
    raw = np.arange(4, dtype="<f4").tobytes()
    with pytest.raises(TruncatedError, match="read 12 bytes where 16 were expected"):
        decode_tensor(
            raw[:12],
            dtype=DataType.DT_FLOAT,
            shape=(4,),
            big_endian=False,
            expected_crc=mask(crc32c(raw[:12])),
        )
    check_payload_size(16, 16)
    with pytest.raises(TruncatedError):
        check_payload_size(15, 16)
