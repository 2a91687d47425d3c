"""Bundle entries: the fast decoder agrees with protobuf on everything it accepts."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from support import TF_FIXTURES

from streamckpt.errors import CorruptCheckpointError, StreamCkptError
from streamckpt.format.bundle import BundleEntry, decode_entry, min_payload_size
from streamckpt.format.crc import mask
from streamckpt.format.dtypes import DataType
from streamckpt.format.entries import entry_fields
from streamckpt.proto import tensor_bundle_pb2


def via_protobuf(raw: bytes) -> tuple[int, tuple[int, ...], int, int, int, int]:
    proto = tensor_bundle_pb2.BundleEntryProto()
    proto.ParseFromString(raw)
    shape = tuple(d.size for d in proto.shape.dim)
    return proto.dtype, shape, proto.shard_id, proto.offset, proto.size, proto.crc32c


entries = st.builds(
    BundleEntry,
    dtype=st.sampled_from([d for d in DataType if d not in (0, 20)]),
    shape=st.lists(st.integers(0, 2**40), max_size=6).map(tuple),
    shard_id=st.integers(0, 2**31 - 1),
    offset=st.integers(0, 2**62),
    size=st.integers(0, 2**62),
    crc32c=st.integers(0, 2**32 - 1),
)


@settings(max_examples=300)
@given(entries)
def test_fast_decoder_matches_protobuf(entry: BundleEntry) -> None:
    raw = entry.encode()
    assert entry_fields(raw) == via_protobuf(raw)


@settings(max_examples=500)
@given(st.binary(max_size=64))
@example(bytes.fromhex("12021205"))  # a dim running past its shape: a bare IndexError once
@example(bytes.fromhex("0880808080808080808001"))  # a dtype protobuf reads as negative
@example(bytes.fromhex("20ffffffffffffffff7f"))  # an offset protobuf reads as negative
def test_fast_decoder_never_raises_and_never_disagrees(raw: bytes) -> None:
    """The fast walk returns None for anything it does not take, and protobuf judges it."""
    fast = entry_fields(raw)
    if fast is not None:
        assert fast == via_protobuf(raw)
    with contextlib.suppress(StreamCkptError):  # anything else fails the test
        decode_entry(raw, num_shards=4)


def test_dim_running_past_its_shape_is_corrupt() -> None:
    with pytest.raises(CorruptCheckpointError, match="bad bundle entry"):
        decode_entry(bytes.fromhex("12021205"))


def test_zero_element_variant_takes_no_bytes() -> None:
    """What we write for an empty DT_VARIANT tensor (no bytes at all) reads back."""
    empty = BundleEntry(DataType.DT_VARIANT, (0, 3), size=0, crc32c=mask(0))
    assert decode_entry(empty.encode()) == empty
    # each element takes at least a length byte and its 4-byte checksum
    with pytest.raises(CorruptCheckpointError, match="too small for 2 DT_VARIANT"):
        decode_entry(BundleEntry(DataType.DT_VARIANT, (2,), size=9).encode())
    decode_entry(BundleEntry(DataType.DT_VARIANT, (2,), size=10).encode())
    # strings still need their 4-byte length checksum even when empty
    with pytest.raises(CorruptCheckpointError, match="too small for 0 DT_STRING"):
        decode_entry(BundleEntry(DataType.DT_STRING, (0,), size=3).encode())
    assert min_payload_size(DataType.DT_STRING, 5) == 9
    assert min_payload_size(DataType.DT_VARIANT, 5) == 25


def test_every_fixture_entry_decodes_the_same_both_ways() -> None:
    manifest = json.loads((TF_FIXTURES / "manifest.json").read_text())
    seen = 0
    for fixture in manifest["fixtures"]:
        for bundle in fixture["bundles"]:
            for entry in bundle["entries"]:
                raw = bytes.fromhex(entry["entry_proto_hex"])
                fast = entry_fields(raw)
                if entry.get("slices"):
                    assert fast is None  # slices go through protobuf
                    continue
                assert fast == via_protobuf(raw)
                seen += 1
    assert seen > 100
