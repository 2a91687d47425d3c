"""Round-trip closure: whatever valid input ``save`` accepts, ``load`` gives back exactly.

Every dtype (numeric through numpy and ml_dtypes, the quantized ones and DT_VARIANT through
``streamckpt.Typed``, strings), zero and one element, empty strings and odd names (any
bytes, not UTF-8, NUL, names that parse as slice keys), in memory://. Equality is bit for bit:
NaN payloads and negative zeros must survive.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import anyio
import fsspec
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import streamckpt
from streamckpt import DataType, Typed
from streamckpt.format.bundle import name_to_key
from streamckpt.format.slices import Extent, TensorSlice, encode_slice_key

# dtypes any bit pattern of their width is a valid value of
BIT_PATTERN_DTYPES = [
    np.dtype(t)
    for t in (
        "<f2", "<f4", "<f8", "<c8", "<c16", "i1", "<i2", "<i4", "<i8", "u1", "<u2", "<u4", "<u8",
        ml_dtypes.bfloat16, ml_dtypes.float8_e5m2, ml_dtypes.float8_e4m3fn,
        ml_dtypes.float8_e4m3fnuz, ml_dtypes.float8_e4m3b11fnuz, ml_dtypes.float8_e5m2fnuz,
    )
]  # fmt: skip
# sub-byte kinds: one byte per element, only the codes of their width are values
SMALL_INT_DTYPES = {
    np.dtype(ml_dtypes.int4): (-8, 7),
    np.dtype(ml_dtypes.uint4): (0, 15),
    np.dtype(ml_dtypes.int2): (-2, 1),
    np.dtype(ml_dtypes.uint2): (0, 3),
}
QUANTIZED = {
    DataType.DT_QINT8: np.dtype("i1"),
    DataType.DT_QUINT8: np.dtype("u1"),
    DataType.DT_QINT16: np.dtype("<i2"),
    DataType.DT_QUINT16: np.dtype("<u2"),
    DataType.DT_QINT32: np.dtype("<i4"),
}

shapes = st.lists(st.integers(0, 3), max_size=3).map(tuple) | st.sampled_from([(), (1,), (0,)])
names = st.binary(min_size=1, max_size=10) | st.sampled_from(
    [b"\x00", b"\xff\xfe", b"a/b/.ATTRIBUTES/VARIABLE_VALUE", b"\x00\x00\x01",
     encode_slice_key(b"w", TensorSlice((Extent(0, 1),)))]
)  # fmt: skip


@dataclass(frozen=True)
class Case:
    value: Any  # what is saved
    expected: np.ndarray[Any, Any]  # what must come back


@st.composite
def cases(draw: st.DrawFn) -> Case:
    shape = draw(shapes)
    count = int(np.prod(shape, dtype=np.int64))
    kind = draw(st.sampled_from(["bits", "bits", "small", "bool", "float4", "quantized", "string",
                                 "variant", "scalar"]))  # fmt: skip
    if kind == "bits":
        dtype = draw(st.sampled_from(BIT_PATTERN_DTYPES))
        raw = draw(st.binary(min_size=count * dtype.itemsize, max_size=count * dtype.itemsize))
        array = np.frombuffer(raw, dtype=dtype).reshape(shape)
        return Case(array, array)
    if kind == "small":
        dtype, (low, high) = draw(st.sampled_from(sorted(SMALL_INT_DTYPES.items(), key=str)))
        ints = draw(st.lists(st.integers(low, high), min_size=count, max_size=count))
        array = np.array(ints, dtype=np.int8).astype(dtype).reshape(shape)
        return Case(array, array)
    if kind == "bool":
        array = np.array(draw(st.lists(st.booleans(), min_size=count, max_size=count)), dtype=bool)
        return Case(array.reshape(shape), array.reshape(shape))
    if kind == "float4":
        codes = draw(st.lists(st.integers(0, 15), min_size=count, max_size=count))
        array = np.array(codes, dtype=np.uint8).view(ml_dtypes.float4_e2m1fn).reshape(shape)
        return Case(array, array)
    if kind == "quantized":
        tf_dtype, dtype = draw(st.sampled_from(sorted(QUANTIZED.items())))
        raw = draw(st.binary(min_size=count * dtype.itemsize, max_size=count * dtype.itemsize))
        array = np.frombuffer(raw, dtype=dtype).reshape(shape)
        return Case(Typed(array, tf_dtype), array)
    if kind in ("string", "variant"):
        elements = draw(
            st.lists(st.binary(max_size=300) | st.just(b""), min_size=count, max_size=count)
        )
        array = np.empty(count, dtype=object)
        array[:] = elements
        array = array.reshape(shape)
        value = array if kind == "string" else Typed(array, DataType.DT_VARIANT)
        return Case(value, array)
    scalar = draw(st.integers(-(2**63), 2**63 - 1) | st.text(max_size=5) | st.binary(max_size=5))
    expected = np.array(
        scalar.encode() if isinstance(scalar, str) else scalar,
        dtype=object if isinstance(scalar, str | bytes) else np.int64,
    )
    return Case(scalar, expected)


def assert_exact(got: np.ndarray[Any, Any], expected: np.ndarray[Any, Any], name: bytes) -> None:
    assert got.dtype == expected.dtype, (name, got.dtype, expected.dtype)
    assert got.shape == expected.shape, (name, got.shape, expected.shape)
    if expected.dtype == object:
        assert got.reshape(-1).tolist() == expected.reshape(-1).tolist(), name
    else:
        assert got.tobytes() == expected.tobytes(), name


@pytest.fixture(scope="module")
def memory_root() -> Any:
    root = f"/streamckpt-roundtrip-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


@settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(tensors=st.dictionaries(names, cases(), min_size=1, max_size=8), shards=st.integers(1, 3))
def test_what_save_accepts_load_gives_back_exactly(
    memory_root: str, tensors: dict[bytes, Case], shards: int
) -> None:
    prefix = f"memory://{memory_root}/{uuid.uuid4().hex}/ckpt"
    to_save = {name: case.value for name, case in tensors.items()}

    async def round_trip() -> tuple[dict[str, Any], dict[str, Any], list[Any]]:
        await streamckpt.save(prefix, to_save, num_shards=shards)
        loaded = await streamckpt.load(prefix)
        by_name = await streamckpt.load(prefix, names=list(tensors))
        singles = [await streamckpt.read_tensor(prefix, name) for name in tensors]
        return loaded, by_name, singles

    loaded, by_name, singles = anyio.run(round_trip)
    assert {name_to_key(n) for n in loaded} == set(tensors)
    for (name, case), single in zip(tensors.items(), singles, strict=True):
        text = name.decode("utf-8", "surrogateescape")
        assert_exact(loaded[text], case.expected, name)
        assert_exact(by_name[text], case.expected, name)
        assert_exact(single, case.expected, name)


def test_zero_element_variants_round_trip(tmp_path: Any) -> None:
    """A zero-element DT_VARIANT was saved, then refused on load (its payload is empty)."""
    prefix = str(tmp_path / "ckpt")
    empty = np.empty((0, 4), dtype=object)
    anyio.run(lambda: streamckpt.save(prefix, {"v": Typed(empty, DataType.DT_VARIANT)}))
    loaded = anyio.run(lambda: streamckpt.load(prefix))
    assert loaded["v"].dtype == object and loaded["v"].shape == (0, 4)
    single = anyio.run(lambda: streamckpt.read_tensor(prefix, "v"))
    assert single.shape == (0, 4)
