"""Bundle entries: the fast decoder agrees with protobuf on everything it accepts."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st
from support import TF_FIXTURES

from streamckpt.format.bundle import BundleEntry, _fast_fields
from streamckpt.format.dtypes import DataType
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
    assert _fast_fields(raw) == via_protobuf(raw)


@given(st.binary(max_size=64))
def test_fast_decoder_never_disagrees_on_random_bytes(raw: bytes) -> None:
    try:
        fast = _fast_fields(raw)
    except Exception:  # malformed input may raise; decode_entry maps it
        return
    if fast is not None:
        assert fast == via_protobuf(raw)


def test_every_fixture_entry_decodes_the_same_both_ways() -> None:
    manifest = json.loads((TF_FIXTURES / "manifest.json").read_text())
    seen = 0
    for fixture in manifest["fixtures"]:
        for bundle in fixture["bundles"]:
            for entry in bundle["entries"]:
                raw = bytes.fromhex(entry["entry_proto_hex"])
                fast = _fast_fields(raw)
                if entry.get("slices"):
                    assert fast is None  # slices go through protobuf
                    continue
                assert fast == via_protobuf(raw)
                seen += 1
    assert seen > 100
