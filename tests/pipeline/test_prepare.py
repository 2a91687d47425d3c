"""A plain numpy array takes prepare's fast path once its dtype has been met: same payload,
dtype, shape and snapshot rule as the general path, for every kind of array."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamckpt.pipeline import tensors
from streamckpt.pipeline.tensors import prepare

DTYPES = ["f4", "f8", "i1", "u2", "i8", "?", "c8", ">f4", ">i8", ml_dtypes.bfloat16]


def _array(dtype: Any, shape: tuple[int, ...], strided: bool) -> np.ndarray[Any, Any]:
    count = int(np.prod(shape))
    if not strided or not shape:
        return np.arange(count).reshape(shape).astype(dtype)
    wide = np.arange(2 * count).reshape(*shape[:-1], 2 * shape[-1]).astype(dtype)
    return wide[..., ::2]  # not contiguous (unless empty)


@settings(max_examples=150, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    shape=st.lists(st.integers(0, 4), max_size=3).map(tuple),
    strided=st.booleans(),
    copy=st.booleans(),
)
def test_fast_path_equals_general_path(
    dtype: Any, shape: tuple[int, ...], strided: bool, copy: bool
) -> None:
    array = _array(dtype, shape, strided)
    saved = tensors._PLAIN.copy()
    tensors._PLAIN.clear()
    try:
        general = prepare(b"k", array, copy=copy)  # learns the dtype where it is plain
        fast = prepare(b"k", array, copy=copy)
    finally:
        tensors._PLAIN.clear()
        tensors._PLAIN.update(saved)
    assert (fast.dtype, fast.shape, fast.crc32c) == (general.dtype, general.shape, None)
    assert bytes(fast.payload) == bytes(general.payload)
    assert isinstance(fast.shape, tuple) and all(type(d) is int for d in fast.shape)
    if copy and array.size:
        assert not np.shares_memory(np.frombuffer(fast.payload, np.uint8), array)


def test_big_endian_arrays_never_take_the_fast_path() -> None:
    prepare(b"k", np.ones(3, ">f4"), copy=False)
    assert np.dtype(">f4") not in tensors._PLAIN
    assert (
        bytes(prepare(b"k", np.ones(3, ">f4"), copy=False).payload) == np.ones(3, "<f4").tobytes()
    )


def test_strings_are_never_plain() -> None:
    value = np.array([b"a", b"bc"], dtype=object)
    prepare(b"k", value, copy=False)
    assert value.dtype not in tensors._PLAIN


@settings(max_examples=150, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    shape=st.lists(st.integers(0, 4), max_size=3).map(tuple),
    strided=st.booleans(),
    copy=st.booleans(),
    name=st.one_of(st.text(min_size=1, max_size=5), st.binary(min_size=1, max_size=5)),
)
def test_prepare_values_inline_path_equals_prepare(
    dtype: Any, shape: tuple[int, ...], strided: bool, copy: bool, name: str | bytes
) -> None:
    """``prepare_values`` inlines the fast path: the same tensor as ``prepare`` gives."""
    array = _array(dtype, shape, strided)
    key = name if isinstance(name, bytes) else name.encode("utf-8", "surrogateescape")
    prepare(key, array, copy=copy)  # the dtype is met, where it is plain
    (got,) = tensors.prepare_values({name: array}, copy=copy).values()
    want = prepare(key, array, copy=copy)
    assert (got.key, got.dtype, got.shape, got.crc32c) == (want.key, want.dtype, want.shape, None)
    assert bytes(got.payload) == bytes(want.payload) and got.size == want.size
    if copy and array.size:
        assert not np.shares_memory(np.frombuffer(got.payload, np.uint8), array)


def test_prepare_values_refuses_empty_and_duplicate_names() -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        tensors.prepare_values({"": np.ones(2)}, copy=False)
    with pytest.raises(ValueError, match="duplicate"):
        tensors.prepare_values({"a": np.ones(2), b"a": np.ones(2)}, copy=False)
