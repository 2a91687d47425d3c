"""DT_VARIANT payloads as opaque elements: spec 7.4, the TF TensorList fixture, hostile bytes."""

from __future__ import annotations

import math
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import TF_FIXTURES, load_manifest

from streamckpt.errors import ChecksumError, CorruptCheckpointError
from streamckpt.format.crc import crc32c, mask
from streamckpt.format.variant import decode_variants, encode_variants

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _variant_entries() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    found = []
    for fixture in load_manifest()["fixtures"]:
        for bundle in fixture["bundles"]:
            for entry in bundle["entries"]:
                if entry["dtype"] == "DT_VARIANT":
                    found.append((f"{bundle['prefix']}:{entry['key']}", bundle, entry))
    return found


VARIANT_ENTRIES = _variant_entries()


def _stored_payload(bundle: dict[str, Any], entry: dict[str, Any]) -> bytes:
    shards = bundle["header"]["num_shards"]
    path = TF_FIXTURES / f"{bundle['prefix']}.data-{entry['shard_id']:05d}-of-{shards:05d}"
    with open(path, "rb") as f:
        f.seek(entry["offset"])
        return f.read(entry["size"])


def test_fixture_has_variants() -> None:
    assert {label for label, _, _ in VARIANT_ENTRIES} >= {
        "dtypes_exotic/ckpt:variant_scalar",
        "dtypes_exotic/ckpt:variant_vector",
    }


@pytest.mark.parametrize(
    ("label", "bundle", "entry"), VARIANT_ENTRIES, ids=[e[0] for e in VARIANT_ENTRIES]
)
def test_golden_variant_entries(label: str, bundle: dict[str, Any], entry: dict[str, Any]) -> None:
    stored = _stored_payload(bundle, entry)
    assert stored == bytes.fromhex(entry["data_hex"])
    count = math.prod(entry["shape"])
    elements = decode_variants(stored, count, expected_crc=entry["crc32c_stored"])
    assert len(elements) == count
    # A TensorList serializes its type name inside the VariantTensorDataProto.
    assert all(b"tensorflow::TensorList" in element for element in elements)
    payload, entry_crc = encode_variants(elements)
    assert payload == stored
    assert entry_crc == entry["crc32c_stored"]
    assert decode_variants(memoryview(stored), count) == elements


def test_layout_by_hand() -> None:
    # Spec 7.4, computed step by step: length as 8-byte LE into the running CRC, then payload,
    # then the masked value is written and fed back in.
    running = crc32c(struct.pack("<Q", 2) + b"ab")
    first = struct.pack("<I", mask(running))
    running = crc32c(first, running)
    running = crc32c(struct.pack("<Q", 0), running)
    second = struct.pack("<I", mask(running))
    running = crc32c(second, running)
    payload, entry_crc = encode_variants([b"ab", b""])
    assert payload == b"\x02ab" + first + b"\x00" + second
    assert entry_crc == mask(running)
    assert mask(crc32c(payload)) != entry_crc


def test_zero_elements() -> None:
    payload, entry_crc = encode_variants([])
    assert payload == b""
    assert entry_crc == mask(0) == 0xA282EAD8
    assert decode_variants(b"", 0, expected_crc=entry_crc) == []


def test_element_checksum_mismatch_reports_offset() -> None:
    payload = bytearray(encode_variants([b"ab", b"cd"])[0])
    payload[1] ^= 0x20
    with pytest.raises(ChecksumError) as caught:
        decode_variants(bytes(payload), 2)
    assert caught.value.offset == 3


def test_entry_crc_mismatch() -> None:
    payload, entry_crc = encode_variants([b"ab"])
    with pytest.raises(ChecksumError):
        decode_variants(payload, 1, expected_crc=entry_crc ^ 0x80)


def test_count_too_large_fails_fast() -> None:
    with pytest.raises(CorruptCheckpointError):
        decode_variants(b"\x00" * 20, 10**15)
    with pytest.raises(CorruptCheckpointError):
        decode_variants(b"", -1)


def test_claimed_length_past_the_payload() -> None:
    payload = b"\xff\xff\xff\xff\x0f" + b"\x00" * 8
    with pytest.raises(CorruptCheckpointError) as caught:
        decode_variants(payload, 1)
    assert caught.value.offset == 0


def test_trailing_bytes_and_every_truncation_refused() -> None:
    payload = encode_variants([b"ab", b"", b"xyz"])[0]
    with pytest.raises(CorruptCheckpointError):
        decode_variants(payload + b"\x00", 3)
    for cut in range(len(payload)):
        with pytest.raises(CorruptCheckpointError):
            decode_variants(payload[:cut], 3)


variant_values = st.lists(st.binary(max_size=300), max_size=8)


@FAST
@given(values=variant_values)
def test_round_trip(values: list[bytes]) -> None:
    payload, entry_crc = encode_variants(values)
    assert decode_variants(payload, len(values), expected_crc=entry_crc) == values


@FAST
@given(payload=st.binary(max_size=64), count=st.integers(min_value=-2, max_value=20))
def test_random_bytes_raise_only_corrupt(payload: bytes, count: int) -> None:
    try:
        values = decode_variants(payload, count)
    except CorruptCheckpointError:
        return
    assert len(values) == count
    assert sum(map(len, values)) + 5 * count <= len(payload)


@FAST
@given(values=variant_values.filter(bool), data=st.data())
def test_mutated_payloads_raise_only_corrupt(values: list[bytes], data: st.DataObject) -> None:
    payload, entry_crc = encode_variants(values)
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
        decode_variants(bytes(mutated), len(values), expected_crc=entry_crc)
