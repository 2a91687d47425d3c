"""Golden TensorFlow fixtures: streamckpt rewrites them byte for byte and reads every value.

Expected values come from ``manifest.json`` (what TensorFlow itself read back), never from
streamckpt; the dtype table below is written out here so that a wrong mapping in the library
cannot agree with itself.
"""

from __future__ import annotations

import hashlib
import math
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from support import TF_FIXTURES, load_manifest

import streamckpt
import streamckpt.sync
from streamckpt import DataType, Typed
from streamckpt.pipeline.plan import plan_in_order
from streamckpt.pipeline.save import prepare_all, write_bundle
from streamckpt.storage import resolve

MANIFEST = load_manifest()
BUNDLES: dict[str, dict[str, Any]] = {
    bundle["prefix"]: bundle for fixture in MANIFEST["fixtures"] for bundle in fixture["bundles"]
}
UNSLICED = [p for p, b in BUNDLES.items() if all(e["kind"] == "tensor" for e in b["entries"])]
SLICED = [p for p in BUNDLES if p not in UNSLICED]

# TF dtype name -> how its values read back (quantized kinds are their plain integers).
EXPECTED_NUMPY: dict[str, np.dtype[Any]] = {
    "DT_FLOAT": np.dtype("<f4"),
    "DT_DOUBLE": np.dtype("<f8"),
    "DT_INT32": np.dtype("<i4"),
    "DT_UINT8": np.dtype("u1"),
    "DT_INT16": np.dtype("<i2"),
    "DT_INT8": np.dtype("i1"),
    "DT_COMPLEX64": np.dtype("<c8"),
    "DT_INT64": np.dtype("<i8"),
    "DT_BOOL": np.dtype("?"),
    "DT_QINT8": np.dtype("i1"),
    "DT_QUINT8": np.dtype("u1"),
    "DT_QINT32": np.dtype("<i4"),
    "DT_BFLOAT16": np.dtype(ml_dtypes.bfloat16),
    "DT_QINT16": np.dtype("<i2"),
    "DT_QUINT16": np.dtype("<u2"),
    "DT_UINT16": np.dtype("<u2"),
    "DT_COMPLEX128": np.dtype("<c16"),
    "DT_HALF": np.dtype("<f2"),
    "DT_UINT32": np.dtype("<u4"),
    "DT_UINT64": np.dtype("<u8"),
    "DT_FLOAT8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "DT_FLOAT8_E4M3FN": np.dtype(ml_dtypes.float8_e4m3fn),
    "DT_FLOAT8_E4M3FNUZ": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "DT_FLOAT8_E4M3B11FNUZ": np.dtype(ml_dtypes.float8_e4m3b11fnuz),
    "DT_FLOAT8_E5M2FNUZ": np.dtype(ml_dtypes.float8_e5m2fnuz),
    "DT_INT4": np.dtype(ml_dtypes.int4),
    "DT_UINT4": np.dtype(ml_dtypes.uint4),
    "DT_INT2": np.dtype(ml_dtypes.int2),
    "DT_UINT2": np.dtype(ml_dtypes.uint2),
    "DT_FLOAT4_E2M1FN": np.dtype(ml_dtypes.float4_e2m1fn),
}
# numpy cannot tell these apart from plain types: saving them needs an explicit dtype.
NEEDS_TYPED = {
    DataType.DT_QINT8,
    DataType.DT_QUINT8,
    DataType.DT_QINT16,
    DataType.DT_QUINT16,
    DataType.DT_QINT32,
    DataType.DT_VARIANT,
}


def prefix_path(prefix: str) -> str:
    return str(TF_FIXTURES / prefix)


@dataclass
class Loaded:
    entries: dict[str, streamckpt.TensorInfo]
    values: dict[str, np.ndarray[Any, Any]]
    slice_values: dict[bytes, np.ndarray[Any, Any]]


@pytest.fixture(scope="module")
def loaded() -> dict[str, Loaded]:
    """Every fixture bundle read once through the sync face (entries, values, slice pieces)."""
    out = {}
    for prefix, bundle in BUNDLES.items():
        slice_keys = [
            bytes.fromhex(e["key_hex"]) for e in bundle["entries"] if e["kind"] == "slice"
        ]
        with streamckpt.sync.open(prefix_path(prefix)) as ckpt:
            entries = ckpt.entries
            values = ckpt.read_many(list(entries))
            pieces = {key: ckpt.read(key) for key in slice_keys}
        out[prefix] = Loaded(entries, values, pieces)
    return out


def entry_key(entry: dict[str, Any], names: list[str]) -> bytes:
    """The key bytes of a manifest entry; a huge key is found by its sha256 and length."""
    if entry["key_hex"] is not None:
        return bytes.fromhex(entry["key_hex"])
    found = [
        key
        for key in (n.encode("utf-8", "surrogateescape") for n in names)
        if len(key) == entry["key_len"] and hashlib.sha256(key).hexdigest() == entry["key_sha256"]
    ]
    assert len(found) == 1
    assert found[0].hex().startswith(entry["key_head_hex"])
    return found[0]


def name_of(key: bytes) -> str:
    return key.decode("utf-8", "surrogateescape")


# -- (a) byte-identical rewrite --------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("prefix", UNSLICED)
async def test_rewrite_is_byte_identical(
    prefix: str, loaded: dict[str, Loaded], tmp_path: Path
) -> None:
    bundle = BUNDLES[prefix]
    fixture = loaded[prefix]
    tensors: dict[str | bytes, Any] = {}
    for name, info in fixture.entries.items():
        value = fixture.values[name]
        tensors[name] = Typed(value, info.tf_dtype) if info.tf_dtype in NEEDS_TYPED else value
    prepared = await prepare_all(tensors, copy=False)

    # TensorFlow's assignment and write order: by offset inside each shard.
    shards: list[list[bytes]] = [[] for _ in range(bundle["header"]["num_shards"])]
    for info in sorted(fixture.entries.values(), key=lambda i: (i.shard, i.offset, i.size)):
        shards[info.shard].append(info.key)
    plan = plan_in_order(shards=shards, sizes={k: t.size for k, t in prepared.items()})

    out_prefix = tmp_path / Path(prefix).name
    store, path = resolve(str(out_prefix))
    await write_bundle(store, path, prepared, plan, overwrite=False)

    assert_same_files(tmp_path, (TF_FIXTURES / prefix).parent, [f["name"] for f in bundle["files"]])


def assert_same_files(written: Path, golden: Path, names: list[str]) -> None:
    """``written`` holds exactly ``names``, each byte-identical to its golden twin."""
    assert sorted(p.name for p in written.iterdir()) == sorted(names)
    for name in names:
        assert (written / name).read_bytes() == (golden / name).read_bytes(), name


# -- (b) every value TensorFlow wrote reads back exactly --------------------------------------


def literal(array: np.ndarray[Any, Any]) -> Any:
    """Nested Python values in the manifest's notation (nan/inf as text, complex as pairs)."""
    if array.dtype.kind in "biu":
        return array.tolist()
    if array.dtype.name in {"int4", "uint4", "int2", "uint2"}:
        return array.astype(np.int64).tolist()
    if array.dtype.kind == "c":
        pairs = np.stack([array.real, array.imag], axis=-1).astype(np.float64)
        return literal_floats(pairs.tolist())
    return literal_floats(array.astype(np.float64).tolist())


def literal_floats(value: Any) -> Any:
    if isinstance(value, list):
        return [literal_floats(v) for v in value]
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def nested_hex(value: Any) -> Any:
    if isinstance(value, list):
        return [nested_hex(v) for v in value]
    assert isinstance(value, bytes)
    return value.hex()


def split_variant_payload(payload: bytes, count: int) -> list[bytes]:
    """Elements of a DT_VARIANT payload: varint length, bytes, 4-byte checksum (spec 7.4)."""
    elements = []
    pos = 0
    for _ in range(count):
        length = shift = 0
        while True:
            byte = payload[pos]
            pos += 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
        elements.append(payload[pos : pos + length])
        pos += length + 4
    assert pos == len(payload)
    return elements


def check_value(array: np.ndarray[Any, Any], entry: dict[str, Any]) -> None:
    shape = tuple(entry["shape"])
    assert isinstance(array, np.ndarray)
    assert array.shape == shape
    dtype = entry["dtype"]
    if dtype == "DT_STRING":
        assert array.dtype == object
        assert all(isinstance(x, bytes) for x in array.reshape(-1))
        assert nested_hex(array.tolist()) == entry["value_hex"]
        return
    if dtype == "DT_VARIANT":
        assert array.dtype == object
        expected = split_variant_payload(bytes.fromhex(entry["data_hex"]), math.prod(shape))
        assert hashlib.sha256(bytes.fromhex(entry["data_hex"])).hexdigest() == entry["data_sha256"]
        assert list(array.reshape(-1)) == expected
        return
    assert array.dtype == EXPECTED_NUMPY[dtype]
    raw = np.ascontiguousarray(array).tobytes()
    assert hashlib.sha256(raw).hexdigest() == entry["sha256"]
    assert raw.hex() == entry["value_hex"]
    got = literal(array)
    assert (got if array.ndim else [got]) == entry["value"]


def check_info(info: streamckpt.TensorInfo, entry: dict[str, Any]) -> None:
    assert info.tf_dtype == entry["dtype_enum"]
    assert info.tf_dtype.name == entry["dtype"]
    assert info.shape == tuple(entry["shape"])
    assert (info.shard, info.offset, info.size) == (
        entry["shard_id"],
        entry["offset"],
        entry["size"],
    )
    assert info.crc32c == entry["crc32c_stored"]
    slices = [[[x.start, x.length] for x in piece.extents] for piece in info.slices]
    assert slices == entry.get("slices", [])
    assert info.is_partitioned == (entry["kind"] == "partitioned")


@pytest.mark.parametrize("prefix", list(BUNDLES))
def test_reads_every_tensor_tf_wrote(prefix: str, loaded: dict[str, Loaded]) -> None:
    bundle = BUNDLES[prefix]
    fixture = loaded[prefix]
    names = list(fixture.values)
    assert set(names) == set(fixture.entries)
    whole = [e for e in bundle["entries"] if e["kind"] != "slice"]
    if bundle.get("entries_are_samples"):
        assert len(names) == bundle["entry_count"]
    else:
        assert len(names) == len(whole)  # slice pieces are not tensors of their own
    for entry in bundle["entries"]:
        key = entry_key(entry, names)
        if entry["kind"] == "slice":
            assert name_of(key) not in fixture.values
            assert name_of(bytes.fromhex(entry["slice_of_hex"])) in fixture.values
            check_value(fixture.slice_values[key], entry)
            continue
        info = fixture.entries[name_of(key)]
        assert info.key == key
        check_info(info, entry)
        check_value(fixture.values[name_of(key)], entry)


def test_many_keys_every_entry(loaded: dict[str, Loaded]) -> None:
    """The manifest holds samples plus a digest of all 4000 entries; rebuild the digest."""
    bundle = BUNDLES["many_keys/ckpt"]
    fixture = loaded["many_keys/ckpt"]
    lines = []
    for info in sorted(fixture.entries.values(), key=lambda i: i.key):
        payload_sha = hashlib.sha256(fixture.values[info.name].tobytes()).hexdigest()
        lines.append(
            f"{info.key.hex()} {info.tf_dtype.name} {info.shard} {info.offset} {info.size}"
            f" {info.crc32c} {payload_sha}\n"
        )
    listing = "".join(lines).encode()
    assert hashlib.sha256(listing).hexdigest() == bundle["entries_listing_sha256"]
    for i in range(bundle["entry_count"]):
        value = fixture.values[hashlib.sha256(f"key{i}".encode()).hexdigest()]
        assert value.shape == () and value.dtype == np.int32 and int(value) == i


def test_non_utf8_and_nul_names(loaded: dict[str, Loaded]) -> None:
    values = loaded["names/ckpt"].values
    assert values["\udcff\udcfe-not-utf8"].tolist() == 99.0
    assert values["nul\x00inside"].tolist() == 3.0
    assert values["emoji/😀"].tolist() == 2.0
    assert [len(n) for n in values if n.startswith("long/")] == [5005]


@pytest.mark.anyio
async def test_async_load_by_names_matches(loaded: dict[str, Loaded]) -> None:
    """``load(names=...)`` goes through lazy index lookups instead of the loaded index."""
    for prefix in ("huge_key/ckpt", "sharded_policy/ckpt-1", "names/ckpt", "multi_task/ckpt-1"):
        fixture = loaded[prefix]
        got = await streamckpt.load(prefix_path(prefix), names=list(fixture.values))
        assert list(got) == list(fixture.values)
        for name, value in got.items():
            assert value.dtype == fixture.values[name].dtype
            assert value.tobytes() == fixture.values[name].tobytes() or value.dtype == object
            if value.dtype == object:
                assert value.tolist() == fixture.values[name].tolist()


# -- (c) partial reads agree with numpy indexing ----------------------------------------------


def manifest_value(prefix: str, name: str) -> np.ndarray[Any, Any]:
    """The full value TensorFlow read, rebuilt from the manifest alone."""
    (entry,) = [
        e
        for e in BUNDLES[prefix]["entries"]
        if e["kind"] != "slice" and e["key_hex"] == name.encode().hex()
    ]
    shape = tuple(entry["shape"])
    if entry["dtype"] == "DT_STRING":
        flat = np.empty(math.prod(shape), dtype=object)
        flat[:] = [bytes.fromhex(h) for h in np.array(entry["value_hex"]).reshape(-1).tolist()]
        return flat.reshape(shape)
    dtype = EXPECTED_NUMPY[entry["dtype"]]
    return np.frombuffer(bytes.fromhex(entry["value_hex"]), dtype=dtype).reshape(shape)


INDEX_CASES = [
    ("dtypes/ckpt", "float32", np.s_[1]),
    ("dtypes/ckpt", "float32", np.s_[-1, ::3]),
    ("dtypes/ckpt", "float32", np.s_[..., 5]),
    ("dtypes/ckpt", "float32", np.s_[:, ::-2]),
    ("dtypes/ckpt", "float64", np.s_[0, 2:7:2]),
    ("dtypes/ckpt", "bfloat16", np.s_[-1, 1::2]),
    ("dtypes/ckpt", "complex128", np.s_[::-1, -2]),
    ("dtypes/ckpt", "bool", np.s_[1, -3:]),
    ("dtypes/ckpt", "uint64", np.s_[..., -1]),
    ("dtypes_exotic/ckpt", "int4", np.s_[::2]),
    ("scalars_empty/ckpt", "rank4/float32", np.s_[0, ..., -1]),
    ("scalars_empty/ckpt", "rank4/float32", np.s_[..., 1:3, ::-1]),
    ("scalars_empty/ckpt", "rank4/float32", np.s_[:, 1, ::2, 3]),
    ("scalars_empty/ckpt", "scalar/float64", np.s_[...]),
    ("scalars_empty/ckpt", "scalar/float64", np.s_[()]),
    ("scalars_empty/ckpt", "empty/float32_3x0", np.s_[-1]),
    ("scalars_empty/ckpt", "empty/float32_3x0", np.s_[1:, ::-1]),
    ("strings/ckpt", "matrix", np.s_[1, ::-1]),
    ("strings/ckpt", "vector", np.s_[-2]),
    ("partitioned_v1/model-7", "emb", np.s_[1:5:3, -1]),
    ("partitioned_v1/model-7", "w2", np.s_[..., 2:4]),
    ("sharded_policy/ckpt-1", "a/.ATTRIBUTES/VARIABLE_VALUE", np.s_[3:9, 1]),
    ("multi_task/ckpt-1", "c/.ATTRIBUTES/VARIABLE_VALUE", np.s_[-1]),
    ("keras_adam/ckpt-1", "optimizer/_variables/2/.ATTRIBUTES/VARIABLE_VALUE", np.s_[1:, 1::2]),
]


def assert_same(got: np.ndarray[Any, Any], expected: Any) -> None:
    """Equal dtype, shape and bytes; a numpy scalar result counts as a 0-d array."""
    assert isinstance(got, np.ndarray)
    if not isinstance(expected, np.ndarray):
        expected = np.array(expected, dtype=got.dtype if got.dtype == object else None)
    assert got.shape == expected.shape
    assert got.dtype == expected.dtype
    if expected.dtype == object:
        assert got.tolist() == expected.tolist()
    else:
        assert np.ascontiguousarray(got).tobytes() == np.ascontiguousarray(expected).tobytes()


@pytest.mark.anyio
@pytest.mark.parametrize(("prefix", "name", "index"), INDEX_CASES)
async def test_partial_reads_of_fixtures(prefix: str, name: str, index: Any) -> None:
    expected = manifest_value(prefix, name)[index]
    path = prefix_path(prefix)
    assert_same(await streamckpt.read_tensor(path, name, index=index), expected)
    async with streamckpt.open(path) as ckpt:
        assert_same(await ckpt.read(name, index=index), expected)
        assert_same(await ckpt.read(name), manifest_value(prefix, name))


@pytest.mark.anyio
async def test_partial_read_out_of_bounds_is_an_index_error() -> None:
    with pytest.raises(IndexError):
        await streamckpt.read_tensor(prefix_path("dtypes/ckpt"), "float32", index=np.s_[2])
    with pytest.raises(IndexError):
        await streamckpt.read_tensor(prefix_path("dtypes/ckpt"), "float32", index=np.s_[0, -9])


RANDOM_DTYPES = [
    np.dtype("<f4"),
    np.dtype("<i2"),
    np.dtype("u1"),
    np.dtype("<c8"),
    np.dtype("<f8"),
    np.dtype(ml_dtypes.bfloat16),
    np.dtype("?"),
]


@st.composite
def tensor_and_indexes(draw: st.DrawFn) -> tuple[np.ndarray[Any, Any], list[Any]]:
    dtype = draw(st.sampled_from(RANDOM_DTYPES))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6))
    # Distinct (modulo the dtype's range) values, so a misplaced element shows.
    count = math.prod(shape)
    seed = draw(st.integers(0, 1000))
    array = ((np.arange(count) * 7 + seed) % 251).astype(dtype).reshape(shape)
    # A bare None is the API's "no index" (whole tensor), not numpy's newaxis.
    index = hnp.basic_indices(shape, allow_newaxis=True, allow_ellipsis=True)
    indexes = draw(st.lists(index.filter(lambda i: i is not None), min_size=1, max_size=3))
    return array, indexes


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as directory:
        yield Path(directory)


@settings(max_examples=50, deadline=None)
@given(case=tensor_and_indexes())
def test_random_partial_reads(case: tuple[np.ndarray[Any, Any], list[Any]], scratch: Path) -> None:
    array, indexes = case
    prefix = scratch / "random"
    streamckpt.sync.save(str(prefix), {"t": array}, overwrite=True)
    with streamckpt.sync.open(str(prefix), load_index=False) as ckpt:
        for index in indexes:
            assert_same(ckpt.read("t", index=index), array[index])
    assert_same(streamckpt.sync.read_tensor(str(prefix), "t", index=indexes[0]), array[indexes[0]])
