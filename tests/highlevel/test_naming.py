"""Swift-style flat names for Python trees: flatten, unflatten, assign_into, name maps."""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamckpt.errors import (
    NameMismatchError,
    NamingError,
    StreamCkptError,
    TensorNotFoundError,
    UnsupportedError,
)
from streamckpt.naming import (
    assign_into,
    flatten,
    identity_map,
    is_leaf,
    lookup_map,
    to_numpy,
    unflatten,
)

Pair = collections.namedtuple("Pair", "first second")


@dataclasses.dataclass
class Conv:
    filter: np.ndarray
    bias: np.ndarray


@dataclasses.dataclass(frozen=True)
class FrozenDense:
    kernel: np.ndarray
    units: int


class Attention:
    def __init__(self, dim: int) -> None:
        self.query = np.ones((dim, dim), np.float32)
        self.key = np.full((dim, dim), 2.0, np.float32)
        self.scale = 1.0 / math.sqrt(dim)
        self._cache = np.zeros(3)  # private: never named
        self.activation = np.tanh  # code, not data: skipped
        self.helper = len  # builtin function: holds no data


class Model:
    def __init__(self) -> None:
        self.conv1 = Conv(np.arange(6.0).reshape(2, 3), np.zeros(3))
        self.layers = [{"kernel": np.eye(2)}, {"kernel": np.eye(2) * 2}]
        self.attn = [Attention(2), Attention(2)]
        self.step = 7
        self.nothing = None


def model_tree() -> Model:
    return Model()


# ---------------------------------------------------------------------------------------------
# flatten


def test_flatten_names_follow_the_path() -> None:
    flat = flatten(model_tree())
    assert list(flat) == [
        "conv1/filter",
        "conv1/bias",
        "layers/0/kernel",
        "layers/1/kernel",
        "attn/0/query",
        "attn/0/key",
        "attn/0/scale",
        "attn/1/query",
        "attn/1/key",
        "attn/1/scale",
        "step",
    ]


def test_flatten_returns_the_leaves_themselves() -> None:
    model = model_tree()
    flat = flatten(model)
    assert flat["conv1/filter"] is model.conv1.filter
    assert flat["step"] == 7


def test_ignored_paths_by_type_name_and_by_path() -> None:
    flat = flatten(model_tree(), ignored_paths=["Attention.scale", "layers/1", "Conv.bias"])
    assert "attn/0/scale" not in flat and "attn/1/scale" not in flat
    assert "layers/1/kernel" not in flat and "layers/0/kernel" in flat
    assert "conv1/bias" not in flat and "conv1/filter" in flat
    # A type entry matches only objects of that type: a dict key 'scale' stays.
    assert "x/scale" in flatten({"x": {"scale": 1.0}}, ignored_paths=["Attention.scale"])


def test_ignored_paths_rejects_a_bare_string() -> None:
    with pytest.raises(TypeError):
        flatten({"a": 1}, ignored_paths="a")


def test_custom_separator() -> None:
    flat = flatten({"enc": [{"w": np.zeros(1)}]}, separator=".")
    assert list(flat) == ["enc.0.w"]
    assert flatten({"enc": {"w": 1}}, separator="::", ignored_paths=["enc::w"]) == {}


def test_containers_of_every_kind() -> None:
    tree = {
        "pair": Pair(np.zeros(1), (1, 2)),
        "frozen": FrozenDense(np.ones(2), 4),
        3: [b"raw", "text", True, 2.5, 1j, np.float32(1.5)],
        "empty": {},
        "empty_list": [],
    }
    assert list(flatten(tree)) == [
        "pair/first",
        "pair/second/0",
        "pair/second/1",
        "frozen/kernel",
        "frozen/units",
        "3/0",
        "3/1",
        "3/2",
        "3/3",
        "3/4",
        "3/5",
    ]


def test_name_collisions_are_an_error() -> None:
    with pytest.raises(NamingError, match="both get the name"):
        flatten({"a/b": 1, "a": {"b": 2}})
    with pytest.raises(NamingError):
        flatten({"a": 1, "b": 2}, name_map=lambda name: "same")


def test_cycles_and_strange_values_are_unsupported() -> None:
    loop: dict[str, Any] = {"x": 1}
    loop["self"] = loop
    with pytest.raises(UnsupportedError, match="cycle"):
        flatten(loop)
    with pytest.raises(UnsupportedError, match="neither a leaf nor a container"):
        flatten({"f": iter([])})
    with pytest.raises(UnsupportedError, match="not a str or int"):
        flatten({(1, 2): 3})
    with pytest.raises(UnsupportedError, match="root"):
        flatten(np.zeros(3))


def test_shared_leaves_get_one_name_per_path() -> None:
    shared = np.zeros(2)
    assert list(flatten({"a": shared, "b": [shared]})) == ["a", "b/0"]


# ---------------------------------------------------------------------------------------------
# name maps


def test_name_map_callable() -> None:
    flat = flatten({"w": 1}, name_map=lambda name: f"model/{name}")
    assert flat == {"model/w": 1}
    assert unflatten(flat, {"w": 0}, name_map=lambda name: f"model/{name}") == {"w": 1}


def test_lookup_map_unknown_name_is_a_key_error() -> None:
    table = lookup_map({"a": "A"})
    assert table("a") == "A"
    with pytest.raises(NameMismatchError) as info:
        table("b")
    assert isinstance(info.value, KeyError)
    assert isinstance(info.value, TensorNotFoundError)
    assert isinstance(info.value, StreamCkptError)
    assert "'b'" in str(info.value)
    assert lookup_map({"a": "A"}, default=identity_map)("b") == "b"


def test_flatten_reports_every_unmapped_name() -> None:
    with pytest.raises(NameMismatchError) as info:
        flatten({"a": 1, "b": 2, "c": 3}, name_map=lookup_map({"a": "A"}))
    assert info.value.unmapped == ("b", "c")


def test_lookup_map_reads_another_naming_scheme() -> None:
    # A checkpoint written by a model that calls its parts encoder/layer_N/w ...
    written = {
        "encoder": {"layer_0": {"w": np.full((2, 2), 1.0)}, "layer_1": {"w": np.full(2, 2.0)}},
        "head": {"w": np.full(3, 3.0)},
    }
    checkpoint = flatten(written)
    assert sorted(checkpoint) == ["encoder/layer_0/w", "encoder/layer_1/w", "head/w"]

    # ... read into a model that calls them enc.blocks.N.weight and out.weight.
    @dataclasses.dataclass
    class Block:
        weight: np.ndarray

    reader = {
        "enc": {"blocks": [Block(np.zeros((2, 2))), Block(np.zeros(2))]},
        "out": {"weight": np.zeros(3)},
    }
    table = lookup_map(
        {
            "enc.blocks.0.weight": "encoder/layer_0/w",
            "enc.blocks.1.weight": "encoder/layer_1/w",
            "out.weight": "head/w",
        }
    )
    restored = unflatten(checkpoint, reader, separator=".", name_map=table)
    assert isinstance(restored["enc"]["blocks"][0], Block)
    np.testing.assert_array_equal(restored["enc"]["blocks"][1].weight, [2.0, 2.0])
    np.testing.assert_array_equal(restored["out"]["weight"], [3.0, 3.0, 3.0])
    # The same table writes the reader's model under the writer's names.
    assert sorted(flatten(restored, separator=".", name_map=table)) == sorted(checkpoint)


# ---------------------------------------------------------------------------------------------
# unflatten


def test_unflatten_keeps_container_types_and_template() -> None:
    template = {
        "pair": Pair(np.zeros(1), (0, 0)),
        "frozen": FrozenDense(np.zeros(2), 0),
        "od": collections.OrderedDict(z=0.0, a=0.0),
        "obj": Attention(1),
    }
    flat = {name: np.full(np.shape(leaf), 5) for name, leaf in flatten(template).items()}
    out = unflatten(flat, template)
    assert type(out["pair"]) is Pair and type(out["pair"].second) is tuple
    assert type(out["frozen"]) is FrozenDense and out["frozen"].units == 5
    assert type(out["od"]) is collections.OrderedDict and list(out["od"]) == ["z", "a"]
    assert type(out["obj"]) is Attention and out["obj"].activation is np.tanh
    assert out["obj"]._cache is template["obj"]._cache  # private attributes ride along
    assert out["obj"].query[0, 0] == 5 and template["obj"].query[0, 0] == 1  # template intact
    assert template["frozen"].units == 0


def test_unflatten_strict_lists_every_problem() -> None:
    template = {"a": 0, "b": [0, 0], "c": {"d": 0}}
    flat = {"a": 1, "b/0": 2, "x": 3, "y/z": 4}
    with pytest.raises(NameMismatchError) as info:
        unflatten(flat, template)
    assert info.value.missing == ("b/1", "c/d")
    assert info.value.unexpected == ("x", "y/z")
    for name in ("b/1", "c/d", "x", "y/z"):
        assert repr(name) in str(info.value)
    loose = unflatten(flat, template, strict=False)
    assert loose == {"a": 1, "b": [2, 0], "c": {"d": 0}}


def test_unflatten_strict_reports_unmapped_names_too() -> None:
    with pytest.raises(NameMismatchError) as info:
        unflatten({"A": 1}, {"a": 0, "b": 0}, name_map=lookup_map({"a": "A"}))
    assert info.value.unmapped == ("b",) and info.value.missing == ()


def test_unflatten_ignored_leaves_are_neither_missing_nor_replaced() -> None:
    template = {"w": np.zeros(2), "rng": np.zeros(4)}
    out = unflatten({"w": np.ones(2)}, template, ignored_paths=["rng"])
    assert out["rng"] is template["rng"]


def test_unflatten_checks_shapes() -> None:
    with pytest.raises(NamingError, match=r"shape \[3\].*expects \[2\]"):
        unflatten({"w": np.zeros(3)}, {"w": np.zeros(2)})


def test_unflatten_into_shape_descriptions() -> None:
    @dataclasses.dataclass(frozen=True)
    class Spec:
        shape: tuple[int, ...]
        dtype: str

    template = {"w": Spec((2,), "float32")}
    assert is_leaf(template["w"])
    out = unflatten({"w": np.ones(2, np.float32)}, template)
    np.testing.assert_array_equal(out["w"], [1.0, 1.0])


keys = st.text(alphabet="abcxyz_0123", min_size=1, max_size=4)
arrays = st.builds(
    lambda shape, seed: np.random.default_rng(seed).standard_normal(shape).astype(np.float32),
    st.lists(st.integers(0, 3), max_size=3).map(tuple),
    st.integers(0, 2**16),
)
trees = st.recursive(
    arrays | st.integers(-(2**40), 2**40),
    lambda inner: st.dictionaries(keys, inner, max_size=4) | st.lists(inner, max_size=4),
    max_leaves=20,
)


def _assert_same_tree(a: Any, b: Any) -> None:
    assert type(a) is type(b)
    if isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            _assert_same_tree(a[key], b[key])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same_tree(x, y)
    else:
        np.testing.assert_array_equal(a, b)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(keys, trees, max_size=4), st.sampled_from(["/", ".", "::"]))
def test_flatten_unflatten_round_trip(tree: dict[str, Any], separator: str) -> None:
    flat = flatten(tree, separator=separator)
    _assert_same_tree(unflatten(flat, tree, separator=separator), tree)
    # Fresh values land where their names say.
    doubled = {name: to_numpy(leaf) * 2 for name, leaf in flat.items()}
    out = unflatten(doubled, tree, separator=separator)
    for name, value in flatten(out, separator=separator).items():
        np.testing.assert_array_equal(value, doubled[name])


# ---------------------------------------------------------------------------------------------
# assign_into


def test_assign_into_fills_arrays_in_place() -> None:
    model = model_tree()
    kernel = model.layers[0]["kernel"]
    view = kernel[0]
    flat = {name: to_numpy(leaf) + 1 for name, leaf in flatten(model).items()}
    names = assign_into(model, flat)
    assert names == list(flat)
    assert model.layers[0]["kernel"] is kernel
    np.testing.assert_array_equal(view, [2.0, 1.0])
    assert model.step == 8 and type(model.step) is int
    assert model.attn[0].scale == pytest.approx(1 + 1 / math.sqrt(2))


def test_assign_into_replaces_scalars_by_their_own_type() -> None:
    tree = {"flag": False, "n": np.int32(1), "s": "old", "b": b"old", "ro": np.zeros(2)}
    tree["ro"].flags.writeable = False
    assign_into(
        tree,
        {
            "flag": np.bool_(True),
            "n": np.array(5, np.int64),
            "s": to_numpy("new"),
            "b": to_numpy(b"n\x00w"),
            "ro": np.ones(2, np.float32),
        },
    )
    assert tree["flag"] is True
    assert type(tree["n"]) is np.int32 and tree["n"] == 5
    assert tree["s"] == "new" and tree["b"] == b"n\x00w"
    np.testing.assert_array_equal(tree["ro"], [1.0, 1.0])


def test_assign_into_checks_everything_before_writing() -> None:
    tree = {"a": np.zeros(2, np.float32), "b": np.zeros(2, np.int32)}
    with pytest.raises(NamingError, match="dtype float64"):
        assign_into(tree, {"a": np.ones(2), "b": np.ones(2)})  # float into int fails
    np.testing.assert_array_equal(tree["a"], [0.0, 0.0])  # 'a' came first, still untouched
    with pytest.raises(NamingError, match="shape"):
        assign_into(tree, {"a": np.ones(3), "b": np.ones(2, np.int32)})


def test_assign_into_cannot_replace_inside_a_tuple() -> None:
    tree = {"t": (1, np.zeros(1))}
    with pytest.raises(NamingError, match="immutable tuple"):
        assign_into(tree, {"t/0": 2, "t/1": np.ones(1)})
    assign_into(tree, {"t/1": np.ones(1)}, strict=False)
    np.testing.assert_array_equal(tree["t"][1], [1.0])


def test_assign_into_strict_and_loose() -> None:
    tree = {"a": np.zeros(1), "b": np.zeros(1)}
    with pytest.raises(NameMismatchError) as info:
        assign_into(tree, {"a": np.ones(1), "c": np.ones(1)})
    assert info.value.missing == ("b",) and info.value.unexpected == ("c",)
    assert tree["a"][0] == 0
    assert assign_into(tree, {"a": np.ones(1), "c": np.ones(1)}, strict=False) == ["a"]
    assert tree["a"][0] == 1


# ---------------------------------------------------------------------------------------------
# is_leaf and to_numpy


class ViaDLPack:
    def __init__(self, array: np.ndarray) -> None:
        self._array = array

    def __dlpack__(self, **kwargs: Any) -> Any:
        return self._array.__dlpack__(**kwargs)

    def __dlpack_device__(self) -> Any:
        return self._array.__dlpack_device__()


class ViaArray:
    def __init__(self, array: np.ndarray) -> None:
        self._array = array

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self._array


class BrokenDLPack(ViaArray):
    def __dlpack__(self, **kwargs: Any) -> Any:
        raise BufferError("device memory")

    def __dlpack_device__(self) -> Any:
        return (2, 0)


def test_is_leaf() -> None:
    for leaf in (np.zeros(1), np.float32(1), 1, 1.0, True, 1j, "s", b"b"):
        assert is_leaf(leaf)
    assert is_leaf(ViaDLPack(np.zeros(1))) and is_leaf(ViaArray(np.zeros(1)))
    for container in ({}, [], (), Pair(1, 2), Attention(1), None, len, np.tanh):
        assert not is_leaf(container)


def test_to_numpy_shares_memory_where_it_can() -> None:
    base = np.arange(4.0)
    assert to_numpy(base) is base
    assert np.shares_memory(to_numpy(ViaDLPack(base)), base)
    assert np.shares_memory(to_numpy(ViaArray(base)), base)
    assert np.shares_memory(to_numpy(BrokenDLPack(base)), base)


def test_to_numpy_scalars() -> None:
    assert to_numpy(3).dtype == np.int64
    assert to_numpy(3.0).dtype == np.float64
    assert to_numpy(True).dtype == np.bool_
    assert to_numpy(np.float16(1)).dtype == np.float16
    text = to_numpy("é\x00")
    assert text.dtype == object and text.shape == () and text[()] == "é\x00".encode()
    with pytest.raises(UnsupportedError, match="64 bits"):
        to_numpy(2**64)
    with pytest.raises(UnsupportedError):
        to_numpy(object())
