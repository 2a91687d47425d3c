"""DT_STRING payload codec: spec 7.3 / 7.5 worked examples, TF golden files, hostile bytes."""

from __future__ import annotations

import math
import struct
import tracemalloc
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import TF_FIXTURES, load_manifest

from streamckpt.errors import ChecksumError, CorruptCheckpointError
from streamckpt.format.crc import crc32c, mask
from streamckpt.format.strings import decode_strings, encode_strings, string_payload_size
from streamckpt.format.varint import encode_varint

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _flatten(value: Any) -> list[str]:
    if isinstance(value, list):
        return [leaf for item in value for leaf in _flatten(item)]
    return [value]


def _string_entries() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    found = []
    for fixture in load_manifest()["fixtures"]:
        for bundle in fixture["bundles"]:
            for entry in bundle["entries"]:
                if entry["dtype"] == "DT_STRING":
                    found.append((f"{bundle['prefix']}:{entry['key']}", bundle, entry))
    return found


STRING_ENTRIES = _string_entries()


def _stored_payload(bundle: dict[str, Any], entry: dict[str, Any]) -> bytes:
    shards = bundle["header"]["num_shards"]
    path = TF_FIXTURES / f"{bundle['prefix']}.data-{entry['shard_id']:05d}-of-{shards:05d}"
    with open(path, "rb") as f:
        f.seek(entry["offset"])
        return f.read(entry["size"])


# --- spec worked examples -------------------------------------------------------------------


def test_worked_example_hi_empty_xyz() -> None:
    payload, entry_crc = encode_strings([b"hi", b"", b"xyz"])
    assert payload == bytes.fromhex("020003") + bytes.fromhex("1b428bca") + b"hixyz"
    assert len(payload) == 12
    assert entry_crc == 0x2307FAF1
    assert crc32c(bytes.fromhex("020000000000000003000000")) == 0x2BA19404
    assert decode_strings(payload, 3, expected_crc=0x2307FAF1) == [b"hi", b"", b"xyz"]


def test_zero_elements() -> None:
    payload, entry_crc = encode_strings([])
    assert payload == bytes.fromhex("d8ea82a2")
    assert entry_crc == 0x640CC1F6
    assert decode_strings(payload, 0, expected_crc=0x640CC1F6) == []


def test_scalar_empty_string() -> None:
    payload, entry_crc = encode_strings([b""])
    assert payload == bytes.fromhex("00a67b113a")
    assert entry_crc == 0xBE0767BD
    assert decode_strings(payload, 1, expected_crc=0xBE0767BD) == [b""]


def test_entry_crc_is_not_the_crc_of_the_payload() -> None:
    payload, entry_crc = encode_strings([b"hi", b"", b"xyz"])
    assert mask(crc32c(payload)) != entry_crc


def test_big_endian_lengths_and_checksum() -> None:
    payload, entry_crc = encode_strings([b"hi", b"", b"xyz"], big_endian=True)
    fixed = struct.pack(">3I", 2, 0, 3)
    stored = struct.pack(">I", mask(crc32c(fixed)))
    assert payload == bytes.fromhex("020003") + stored + b"hixyz"
    assert entry_crc == mask(crc32c(b"hixyz", crc32c(stored, crc32c(fixed))))
    assert decode_strings(payload, 3, big_endian=True, expected_crc=entry_crc) == [
        b"hi",
        b"",
        b"xyz",
    ]
    with pytest.raises(ChecksumError):
        decode_strings(payload, 3)


def test_lengths_of_2_pow_32_and_more_use_8_byte_checksum_input() -> None:
    huge = 1 << 32
    fixed = struct.pack("<I", 1) + struct.pack("<Q", huge)
    good_l = struct.pack("<I", mask(crc32c(fixed)))
    payload = encode_varint(1) + encode_varint(huge) + good_l + b"x"
    # The checksum passes (so 8 bytes were fed), then the layout check refuses the size.
    with pytest.raises(CorruptCheckpointError) as caught:
        decode_strings(payload, 2)
    assert not isinstance(caught.value, ChecksumError)

    fixed_as_u32 = struct.pack("<II", 1, huge & 0xFFFFFFFF)
    wrong_l = struct.pack("<I", mask(crc32c(fixed_as_u32)))
    with pytest.raises(ChecksumError):
        decode_strings(encode_varint(1) + encode_varint(huge) + wrong_l + b"x", 2)


def test_multibyte_varint_lengths() -> None:
    values = [b"a" * 300, b"", b"b" * 20000]
    payload, entry_crc = encode_strings(values)
    assert payload[:6] == encode_varint(300) + b"\x00" + encode_varint(20000)
    assert decode_strings(payload, 3, expected_crc=entry_crc) == values
    assert string_payload_size(values) == len(payload)


# --- golden TensorFlow files ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("label", "bundle", "entry"), STRING_ENTRIES, ids=[e[0] for e in STRING_ENTRIES]
)
def test_golden_string_entries(label: str, bundle: dict[str, Any], entry: dict[str, Any]) -> None:
    stored = _stored_payload(bundle, entry)
    assert len(stored) == entry["size"]
    count = math.prod(entry["shape"])
    expected = [bytes.fromhex(h) for h in _flatten(entry["value_hex"])]
    assert len(expected) == count
    decoded = decode_strings(stored, count, expected_crc=entry["crc32c_stored"])
    assert decoded == expected
    assert decode_strings(memoryview(stored), count) == expected
    payload, entry_crc = encode_strings(expected)
    assert payload == stored
    assert entry_crc == entry["crc32c_stored"]
    assert string_payload_size(expected) == entry["size"]


def test_golden_covers_the_strings_fixture() -> None:
    labels = {label for label, _, _ in STRING_ENTRIES}
    assert "tiny/ckpt:s" in labels
    assert "strings/ckpt:long_20000" in labels
    assert "strings/ckpt:zero_elems_2d" in labels


# --- corrupt input --------------------------------------------------------------------------


def test_count_larger_than_payload_fails_fast() -> None:
    with pytest.raises(CorruptCheckpointError):
        decode_strings(b"\x00" * 16, 10**15)
    with pytest.raises(CorruptCheckpointError):
        decode_strings(b"", 0)


def test_negative_count() -> None:
    with pytest.raises(CorruptCheckpointError):
        decode_strings(encode_strings([])[0], -1)


def test_flipped_length_checksum_reports_its_offset() -> None:
    payload = bytearray(encode_strings([b"hi", b"", b"xyz"])[0])
    payload[4] ^= 0x01
    with pytest.raises(ChecksumError) as caught:
        decode_strings(bytes(payload), 3)
    assert caught.value.offset == 3


def test_wrong_entry_crc() -> None:
    payload, entry_crc = encode_strings([b"hi", b"", b"xyz"])
    with pytest.raises(ChecksumError):
        decode_strings(payload, 3, expected_crc=entry_crc ^ 1)
    corrupted = payload[:-1] + b"Z"
    assert decode_strings(corrupted, 3) == [b"hi", b"", b"xyZ"]
    with pytest.raises(ChecksumError):
        decode_strings(corrupted, 3, expected_crc=entry_crc)


def test_trailing_garbage_and_every_truncation_refused() -> None:
    payload = encode_strings([b"hi", b"", b"xyz"])[0]
    with pytest.raises(CorruptCheckpointError) as caught:
        decode_strings(payload + b"\x00", 3)
    assert not isinstance(caught.value, ChecksumError)
    for cut in range(len(payload)):
        with pytest.raises(CorruptCheckpointError):
            decode_strings(payload[:cut], 3)


def test_varint_running_past_the_payload() -> None:
    with pytest.raises(CorruptCheckpointError):
        decode_strings(b"\x80\x80\x80\x80\x80", 1)


# --- properties -----------------------------------------------------------------------------

string_values = st.lists(
    st.one_of(
        st.binary(max_size=40),
        st.sampled_from([b"", b"\x00", b"\xff" * 3]),
        st.binary(min_size=128, max_size=3000),
    ),
    max_size=12,
)


@FAST
@given(values=string_values, big_endian=st.booleans())
def test_round_trip(values: list[bytes], big_endian: bool) -> None:
    payload, entry_crc = encode_strings(values, big_endian=big_endian)
    assert len(payload) == string_payload_size(values)
    decoded = decode_strings(payload, len(values), big_endian=big_endian, expected_crc=entry_crc)
    assert decoded == values


@FAST
@given(payload=st.binary(max_size=64), count=st.integers(min_value=-2, max_value=80))
def test_random_bytes_raise_only_corrupt(payload: bytes, count: int) -> None:
    try:
        values = decode_strings(payload, count, big_endian=count % 2 == 0)
    except CorruptCheckpointError:
        return
    assert len(values) == count
    assert sum(map(len, values)) < len(payload)


@FAST
@given(values=string_values, data=st.data())
def test_mutated_payloads_raise_only_corrupt(values: list[bytes], data: st.DataObject) -> None:
    payload, entry_crc = encode_strings(values)
    mutated = bytearray(payload)
    action = data.draw(st.sampled_from(["flip", "insert", "delete"]))
    at = data.draw(st.integers(min_value=0, max_value=len(payload) - 1))
    if action == "flip":
        mutated[at] ^= data.draw(st.integers(min_value=1, max_value=255))
    elif action == "insert":
        mutated.insert(at, data.draw(st.integers(min_value=0, max_value=255)))
    else:
        del mutated[at]
    with pytest.raises(CorruptCheckpointError):
        decode_strings(bytes(mutated), len(values), expected_crc=entry_crc)


# --- many elements: checked a chunk at a time -------------------------------------------------


@pytest.mark.parametrize("big_endian", [False, True])
def test_many_strings_across_chunks_round_trip(big_endian: bool) -> None:
    """Lengths of one, two and three varint bytes, straddling the 16 Ki-element chunks."""
    values = [bytes([i % 251]) * (i % 3 * 150) for i in range(40_000)]
    payload, entry_crc = encode_strings(values, big_endian=big_endian)
    decoded = decode_strings(payload, len(values), big_endian=big_endian, expected_crc=entry_crc)
    assert decoded == values
    empties = [b""] * 50_000
    payload, entry_crc = encode_strings(empties)
    assert decode_strings(payload, len(empties), expected_crc=entry_crc) == empties


def test_a_huge_claim_over_zeros_is_refused_in_bounded_memory() -> None:
    """16 Mi empty strings over zeroed bytes: refused by the length checksum, and nothing
    in proportion to the count is built first."""
    count = 16 << 20
    payload = bytearray(count + 4)
    tracemalloc.start()
    try:
        with pytest.raises(ChecksumError, match="length checksum"):
            decode_strings(payload, count)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak
