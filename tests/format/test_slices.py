"""Partitioned tensors: slice values, spec strings and ordered-code slice keys (spec 5.5, 9)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import load_manifest

from streamckpt.errors import CorruptCheckpointError
from streamckpt.format.slices import (
    Extent,
    TensorSlice,
    _decode_signed,
    _decode_unsigned,
    _encode_signed,
    _encode_unsigned,
    decode_slice_key,
    encode_slice_key,
    format_slice_spec,
    is_slice_key,
    parse_slice_spec,
)
from streamckpt.proto.tensor_bundle_pb2 import BundleEntryProto
from streamckpt.proto.tensor_slice_pb2 import TensorSliceProto

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
INT64_MAX = (1 << 63) - 1


def _as_slice(extents: list[list[Any]]) -> TensorSlice:
    return TensorSlice(tuple(Extent(start, length) for start, length in extents))


def _bundles() -> list[dict[str, Any]]:
    return [bundle for fixture in load_manifest()["fixtures"] for bundle in fixture["bundles"]]


def _entries(kind: str) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    return [
        (f"{bundle['prefix']}:{entry['key_hex']}", bundle, entry)
        for bundle in _bundles()
        for entry in bundle["entries"]
        if entry["kind"] == kind
    ]


SLICE_ENTRIES = _entries("slice")
FULL_ENTRIES = _entries("partitioned")


def _full_entry(bundle: dict[str, Any], name_hex: str) -> dict[str, Any]:
    matches: list[dict[str, Any]] = [e for e in bundle["entries"] if e["key_hex"] == name_hex]
    assert len(matches) == 1
    return matches[0]


# --- spec worked examples -------------------------------------------------------------------

SIGNED_EXAMPLES = [
    (0, "80"),
    (1, "81"),
    (2, "82"),
    (63, "bf"),
    (64, "c040"),
    (8191, "dfff"),
    (8192, "e02000"),
    (70000, "e11170"),
    (2**32, "f900000000"),
    (-1, "7f"),
    (-64, "40"),
    (-65, "3fbf"),
    (0x424242, "f0424242"),
    (-0x800, "3800"),
]


@pytest.mark.parametrize(("value", "encoded"), SIGNED_EXAMPLES)
def test_signed_number_examples(value: int, encoded: str) -> None:
    assert _encode_signed(value).hex() == encoded
    assert _decode_signed(bytes.fromhex(encoded) + b"\x99", 0) == (value, len(encoded) // 2)


@pytest.mark.parametrize(
    ("value", "encoded"), [(0, "00"), (1, "0101"), (2, "0102"), (256, "020100")]
)
def test_unsigned_number_examples(value: int, encoded: str) -> None:
    assert _encode_unsigned(value).hex() == encoded
    assert _decode_unsigned(bytes.fromhex(encoded), 0) == (value, len(encoded) // 2)


def test_signed_number_extremes() -> None:
    for value in (INT64_MAX, -(1 << 63), 1 << 62, -(1 << 62) - 1, 1 << 55, (1 << 55) - 1):
        encoded = _encode_signed(value)
        assert _decode_signed(encoded, 0) == (value, len(encoded))
    assert len(_encode_signed(INT64_MAX)) == 10
    assert len(_encode_signed((1 << 55) - 1)) == 8
    assert len(_encode_signed(1 << 55)) == 9


def test_key_example_rows_2_3_of_m() -> None:
    key = bytes.fromhex("00 6d 00 01 01 02 82 82 80 7f")
    piece = TensorSlice((Extent(2, 2), Extent(0, None)))
    assert encode_slice_key(b"m", piece) == key
    assert decode_slice_key(key) == (b"m", piece)
    assert is_slice_key(key)


def test_name_escaping() -> None:
    piece = TensorSlice((Extent(0, 1),))
    key = encode_slice_key(b"a\x00b\xffc", piece)
    assert key == bytes.fromhex("006100ff62ff0063000101018081")
    assert decode_slice_key(key) == (b"a\x00b\xffc", piece)


def test_spec_string_example() -> None:
    shape, piece = parse_slice_spec("4 3 2,2:-")
    assert shape == (4, 3)
    assert piece == TensorSlice((Extent(2, 2), Extent(0, None)))
    assert format_slice_spec(shape, piece) == "4 3 2,2:-"
    assert piece.shape_in(shape) == (2, 3)
    assert piece.index_in(shape) == (slice(2, 4), slice(0, 3))
    assert not piece.is_full(shape)


def test_a_piece_covering_everything_is_full() -> None:
    shape, piece = parse_slice_spec("4 3 0,4:-")
    assert piece.is_full(shape)
    assert TensorSlice((Extent(0, None), Extent(0, None))).is_full((0, 7))


def test_full_dimension_proto_is_an_empty_extent() -> None:
    proto = TensorSlice((Extent(0, None), Extent(2, 0))).to_proto()
    assert proto.SerializeToString() == bytes.fromhex("0a000a0408021000")
    assert TensorSlice.from_proto(proto) == TensorSlice((Extent(0, None), Extent(2, 0)))


# --- golden TensorFlow files ----------------------------------------------------------------


def test_fixtures_have_slices() -> None:
    assert len(SLICE_ENTRIES) >= 10
    assert len(FULL_ENTRIES) >= 5


@pytest.mark.parametrize(
    ("label", "bundle", "entry"), SLICE_ENTRIES, ids=[e[0] for e in SLICE_ENTRIES]
)
def test_golden_slice_keys(label: str, bundle: dict[str, Any], entry: dict[str, Any]) -> None:
    key = bytes.fromhex(entry["key_hex"])
    assert is_slice_key(key)
    name, piece = decode_slice_key(key)
    assert name == bytes.fromhex(entry["slice_of_hex"])
    assert piece == _as_slice(entry["slice_extents"])
    full = _full_entry(bundle, entry["slice_of_hex"])
    assert piece in [_as_slice(s) for s in full["slices"]]
    assert piece.shape_in(full["shape"]) == tuple(entry["shape"])
    assert encode_slice_key(name, piece) == key


@pytest.mark.parametrize(
    ("label", "bundle", "entry"), FULL_ENTRIES, ids=[e[0] for e in FULL_ENTRIES]
)
def test_golden_full_entries(label: str, bundle: dict[str, Any], entry: dict[str, Any]) -> None:
    name = bytes.fromhex(entry["key_hex"])
    assert not is_slice_key(name)
    proto = BundleEntryProto.FromString(bytes.fromhex(entry["entry_proto_hex"]))
    pieces = [TensorSlice.from_proto(p) for p in proto.slices]
    assert pieces == [_as_slice(s) for s in entry["slices"]]
    assert [p.to_proto().SerializeToString() for p in pieces] == [
        p.SerializeToString() for p in proto.slices
    ]
    keys = {e["key_hex"]: e for e in bundle["entries"]}
    assembled = np.zeros(entry["shape"], dtype=np.asarray(entry["value"]).dtype)
    covered = np.zeros(entry["shape"], dtype=bool)
    for piece in pieces:
        piece.check_within(entry["shape"])
        stored = keys[encode_slice_key(name, piece).hex()]
        assert tuple(stored["shape"]) == piece.shape_in(entry["shape"])
        assembled[piece.index_in(entry["shape"])] = np.asarray(stored["value"])
        covered[piece.index_in(entry["shape"])] = True
    assert covered.all()
    np.testing.assert_array_equal(assembled, np.asarray(entry["value"]))


def test_no_plain_fixture_key_looks_like_a_slice_key() -> None:
    for bundle in _bundles():
        for entry in bundle["entries"]:
            if entry["kind"] != "slice" and entry["key_hex"] is not None:
                assert not is_slice_key(bytes.fromhex(entry["key_hex"]))


# --- validation -----------------------------------------------------------------------------


def test_extent_rejects_impossible_values() -> None:
    with pytest.raises(ValueError):
        Extent(-1, 2)
    with pytest.raises(ValueError):
        Extent(0, -2)
    with pytest.raises(ValueError):
        Extent(3, None)
    with pytest.raises(ValueError):
        Extent(INT64_MAX, 1)


def test_check_within() -> None:
    piece = TensorSlice((Extent(2, 2), Extent(0, None)))
    piece.check_within((4, 3))
    for bad_shape in [(3, 3), (4,), (4, 3, 1), (4, -3)]:
        with pytest.raises(CorruptCheckpointError):
            piece.check_within(bad_shape)
        with pytest.raises(CorruptCheckpointError):
            piece.index_in(bad_shape)


def test_from_proto_rejects_hostile_extents() -> None:
    for extent in [
        TensorSliceProto.Extent(start=-1, length=2),
        TensorSliceProto.Extent(start=0, length=-1),
        TensorSliceProto.Extent(start=5),
        TensorSliceProto.Extent(start=INT64_MAX, length=INT64_MAX),
    ]:
        with pytest.raises(CorruptCheckpointError):
            TensorSlice.from_proto(TensorSliceProto(extent=[extent]))


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "4",
        "4 3",
        "4 3 2,2",
        "4 3 2,2:-:-",
        "4 x 2,2:-",
        "4 3 2;2:-",
        "4 3 3,2:-",
        "4 3 -1,2:-",
        "4 3 2,:-",
        "4  3 2,2:-",
        "4 3 ２,2:-",
    ],
)
def test_parse_slice_spec_rejects(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_slice_spec(spec)


def test_format_slice_spec_rejects() -> None:
    with pytest.raises(ValueError):
        format_slice_spec((), TensorSlice(()))
    with pytest.raises(ValueError):
        format_slice_spec((4,), TensorSlice((Extent(3, 2),)))


@pytest.mark.parametrize(
    "hex_key",
    [
        "",
        "01",
        "00",
        "006d",  # no terminator
        "006d00",  # cut inside the terminator
        "006d0002",  # bad escape after 00
        "006dff01000101",  # bad escape after ff
        "006d0001",  # no rank
        "006d000109",  # unsigned number of 9 bytes
        "006d00010100",  # unsigned number with a leading zero
        "006d000108ffffffffffffffff",  # rank 2**64-1 with nothing after it
        "006d000101028282c040",  # rank 2, cut before the last number
        "006d000101c00582",  # 5 written in two bytes
        "006d000101ffe0000000000000000000",  # signed number of 11 bytes
        "006d000101ffc080000000000000007f",  # start 2**63
        "006d0001017f81",  # start -1
        "006d000101807e",  # length -2
        "006d000101817f",  # whole dimension starting at 1
        "006d00010182827f",  # trailing byte
    ],
)
def test_decode_slice_key_rejects(hex_key: str) -> None:
    key = bytes.fromhex(hex_key)
    with pytest.raises(CorruptCheckpointError):
        decode_slice_key(key)
    assert not is_slice_key(key)


# --- properties -----------------------------------------------------------------------------

names = st.binary(min_size=1, max_size=24) | st.lists(
    st.sampled_from([b"\x00", b"\xff", b"\x01", b"a", b"\xfe"]), min_size=1, max_size=8
).map(b"".join)


@st.composite
def extents(draw: st.DrawFn) -> Extent:
    if draw(st.booleans()):
        return Extent(0, None)
    start = draw(st.integers(min_value=0, max_value=INT64_MAX) | st.integers(0, 10_000))
    length = draw(st.integers(min_value=0, max_value=INT64_MAX - start) | st.integers(0, 100))
    return Extent(start, min(length, INT64_MAX - start))


pieces = st.lists(extents(), max_size=6).map(lambda items: TensorSlice(tuple(items)))


@FAST
@given(name=names, piece=pieces)
def test_slice_key_round_trip(name: bytes, piece: TensorSlice) -> None:
    key = encode_slice_key(name, piece)
    assert decode_slice_key(key) == (name, piece)
    assert is_slice_key(key)


@FAST
@given(value=st.integers(min_value=-(1 << 63), max_value=INT64_MAX))
def test_signed_round_trip(value: int) -> None:
    encoded = _encode_signed(value)
    assert _decode_signed(encoded, 0) == (value, len(encoded))


@FAST
@given(a=st.integers(-(1 << 63), INT64_MAX), b=st.integers(-(1 << 63), INT64_MAX))
def test_signed_numbers_sort_like_their_values(a: int, b: int) -> None:
    assert (a < b) == (_encode_signed(a) < _encode_signed(b))


@FAST
@given(name_a=names, name_b=names, piece_a=pieces, piece_b=pieces)
def test_keys_sort_by_name_first(
    name_a: bytes, name_b: bytes, piece_a: TensorSlice, piece_b: TensorSlice
) -> None:
    if name_a == name_b:
        return
    key_a = encode_slice_key(name_a, piece_a)
    key_b = encode_slice_key(name_b, piece_b)
    assert (name_a < name_b) == (key_a < key_b)


@FAST
@given(name=names, piece=pieces, other=st.binary(min_size=1, max_size=24))
def test_slice_keys_sort_after_header_and_before_plain_names(
    name: bytes, piece: TensorSlice, other: bytes
) -> None:
    key = encode_slice_key(name, piece)
    assert key > b""
    if other[0] != 0:
        assert key < other


@FAST
@given(shape_and_piece=st.data())
def test_spec_string_round_trip(shape_and_piece: st.DataObject) -> None:
    rank = shape_and_piece.draw(st.integers(min_value=1, max_value=5))
    shape = tuple(shape_and_piece.draw(st.lists(st.integers(0, 50), min_size=rank, max_size=rank)))
    items = []
    for size in shape:
        if shape_and_piece.draw(st.booleans()):
            items.append(Extent(0, None))
        else:
            start = shape_and_piece.draw(st.integers(0, size))
            items.append(Extent(start, shape_and_piece.draw(st.integers(0, size - start))))
    piece = TensorSlice(tuple(items))
    assert parse_slice_spec(format_slice_spec(shape, piece)) == (shape, piece)
    assert len(np.zeros(shape)[piece.index_in(shape)].shape) == rank
    assert np.zeros(shape)[piece.index_in(shape)].shape == piece.shape_in(shape)


@FAST
@given(
    key=st.binary(max_size=40)
    | st.binary(max_size=40).map(lambda tail: b"\x00" + tail)
    | st.binary(max_size=24).map(lambda tail: b"\x00m\x00\x01" + tail)
)
def test_random_keys_raise_only_corrupt(key: bytes) -> None:
    try:
        name, piece = decode_slice_key(key)
    except CorruptCheckpointError:
        assert not is_slice_key(key)
        return
    # Only canonical keys are accepted, so whatever decodes re-encodes to the same bytes.
    assert encode_slice_key(name, piece) == key


@FAST
@given(name=names, piece=pieces, data=st.data())
def test_mutated_keys_raise_only_corrupt(
    name: bytes, piece: TensorSlice, data: st.DataObject
) -> None:
    mutated = bytearray(encode_slice_key(name, piece))
    action = data.draw(st.sampled_from(["flip", "insert", "delete", "cut"]))
    at = data.draw(st.integers(min_value=0, max_value=len(mutated) - 1))
    if action == "flip":
        mutated[at] ^= data.draw(st.integers(min_value=1, max_value=255))
    elif action == "insert":
        mutated.insert(at, data.draw(st.integers(min_value=0, max_value=255)))
    elif action == "delete":
        del mutated[at]
    else:
        del mutated[at:]
    try:
        decoded_name, decoded_piece = decode_slice_key(bytes(mutated))
    except CorruptCheckpointError:
        return
    assert encode_slice_key(decoded_name, decoded_piece) == bytes(mutated)
