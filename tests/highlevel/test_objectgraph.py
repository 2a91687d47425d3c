"""TensorFlow object-based names and the _CHECKPOINTABLE_OBJECT_GRAPH proto.

The golden fixtures pin what TensorFlow 2.21 wrote; the tests marked ``tf`` check the same
claims against a live TensorFlow, both ways: our graph for a tree equals TF's for the same
tree, and TF restores a bundle that carries our graph.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import TF_FIXTURES, load_manifest

from streamckpt.errors import CorruptCheckpointError, NamingError, StreamCkptError, UnsupportedError
from streamckpt.format.crc import crc32c, mask
from streamckpt.format.varint import decode_varint
from streamckpt.naming import to_numpy
from streamckpt.objectgraph import (
    OBJECT_GRAPH_KEY,
    ObjectGraph,
    SlotVariable,
    build_object_graph,
    checkpoint_key,
    escape_local_name,
    keys_to_nested,
    object_graph_of,
    object_path_key,
    parse_object_graph,
    read_graph,
    unescape_local_name,
)
from streamckpt.proto.trackable_object_graph_pb2 import TrackableObjectGraph

Pair = collections.namedtuple("Pair", "x y")

# ---------------------------------------------------------------------------------------------
# Fixture access: the manifest locates each tensor; the bytes come from the data file.

_FIXTURES = {f["name"]: f for f in load_manifest()["fixtures"]}


def _bundle(prefix: str) -> dict[str, Any]:
    for bundle in _FIXTURES[prefix.split("/")[0]]["bundles"]:
        if bundle["prefix"] == prefix:
            return bundle
    raise KeyError(prefix)


def _payload(prefix: str, entry: dict[str, Any], num_shards: int = 1) -> bytes:
    path = TF_FIXTURES / f"{prefix}.data-{entry['shard_id']:05d}-of-{num_shards:05d}"
    with open(path, "rb") as f:
        f.seek(entry["offset"])
        return f.read(entry["size"])


def _string_scalar(payload: bytes) -> bytes:
    """The one element of a DT_STRING scalar: varint length, masked length CRC, bytes."""
    length, pos = decode_varint(payload, 0)
    assert int.from_bytes(payload[pos : pos + 4], "little") == mask(
        crc32c(length.to_bytes(4, "little"))
    )
    value = payload[pos + 4 :]
    assert len(value) == length
    return value


def fixture_graph_bytes(prefix: str) -> bytes:
    bundle = _bundle(prefix)
    entry = next(e for e in bundle["entries"] if e["key"] == OBJECT_GRAPH_KEY)
    graph = _string_scalar(_payload(prefix, entry))
    assert graph.hex() == entry["value_hex"]
    return graph


def fixture_keys(prefix: str) -> set[str]:
    return {e["key"] for e in _bundle(prefix)["entries"]} - {OBJECT_GRAPH_KEY}


def fixture_values(prefix: str) -> dict[str, np.ndarray]:
    """Numeric tensors of a single-shard fixture, decoded from the data file."""
    dtypes = {"DT_FLOAT": "<f4", "DT_INT64": "<i8", "DT_INT32": "<i4", "DT_BOOL": "?"}
    values = {}
    for entry in _bundle(prefix)["entries"]:
        if entry["dtype"] in dtypes:
            raw = _payload(prefix, entry)
            values[entry["key"]] = np.frombuffer(raw, dtypes[entry["dtype"]]).reshape(
                entry["shape"]
            )
    return values


GRAPH_PREFIXES = [
    "object_basic/ckpt-1",
    "object_basic/written",
    "object_basic/minimal",
    "keras_adam/ckpt-1",
    "slots_v1opt/ckpt-1",
    "manager/ckpt-2",
    "manager/ckpt-3",
]


def with_path_full_names(graph_bytes: bytes) -> bytes:
    """TF's graph with each full_name replaced by our choice (the object path), re-serialized.

    full_name is the only field where we knowingly differ from TensorFlow; after this, equal
    bytes mean equal node order, children, local names, keys and has_checkpoint_values.
    """
    parsed = parse_object_graph(graph_bytes)
    proto = TrackableObjectGraph()
    proto.ParseFromString(graph_bytes)
    for node_id, path in enumerate(parsed.node_paths):
        for attr in proto.nodes[node_id].attributes:
            assert path is not None
            attr.full_name = "/".join(path)
    return proto.SerializeToString(deterministic=True)


# ---------------------------------------------------------------------------------------------
# Escaping and keys.


@pytest.mark.parametrize(
    ("name", "escaped"),
    [
        ("a/b.c", "a.Sb..c"),
        ("plain", "plain"),
        ("..", "...."),
        ("/", ".S"),
        (".S", "..S"),
        ("", ""),
        ("é/ü", "é.Sü"),
    ],
)
def test_escape_examples(name: str, escaped: str) -> None:
    assert escape_local_name(name) == escaped
    assert unescape_local_name(escaped) == name


@given(st.text(alphabet=st.sampled_from("ab./S\x00é"), max_size=12))
def test_escape_round_trip_and_never_a_slash(name: str) -> None:
    escaped = escape_local_name(name)
    assert "/" not in escaped
    assert unescape_local_name(escaped) == name


@pytest.mark.parametrize("bad", [".", "a.", ".x", "a.Sb.c", "..."])
def test_unescape_rejects_dangling_dots(bad: str) -> None:
    with pytest.raises(CorruptCheckpointError):
        unescape_local_name(bad)


def test_keys() -> None:
    assert object_path_key(("inner", "table", "a/b.c")) == "inner/table/a.Sb..c"
    assert checkpoint_key(("inner", "w")) == "inner/w/.ATTRIBUTES/VARIABLE_VALUE"
    assert checkpoint_key(("t",), "table-keys") == "t/.ATTRIBUTES/table-keys"


# ---------------------------------------------------------------------------------------------
# Parsing the golden fixtures.


@pytest.mark.parametrize("prefix", GRAPH_PREFIXES)
def test_fixture_graph_accounts_for_every_key(prefix: str) -> None:
    graph = parse_object_graph(fixture_graph_bytes(prefix))
    assert graph.checkpoint_keys == fixture_keys(prefix)
    for attr in graph.attributes:
        assert attr.checkpoint_key == checkpoint_key(attr.object_path, attr.attribute_name)


@pytest.mark.parametrize("prefix", GRAPH_PREFIXES)
def test_read_graph_holds_every_field_the_proto_has(prefix: str) -> None:
    """The one pass over the proto (``read_graph``) that every later pass walks: each node's
    children, attributes and slot references, in order, as TensorFlow wrote them."""
    graph_bytes = fixture_graph_bytes(prefix)
    proto = TrackableObjectGraph()
    proto.ParseFromString(graph_bytes)
    nodes = read_graph(graph_bytes)
    assert len(nodes) == len(proto.nodes)
    for node, wanted in zip(nodes, proto.nodes, strict=True):
        assert node.children == tuple((r.local_name, r.node_id) for r in wanted.children)
        assert node.attributes == tuple(
            (a.name, a.full_name, a.checkpoint_key) for a in wanted.attributes
        )
        assert node.slot_variables == tuple(
            (r.original_variable_node_id, r.slot_variable_node_id, r.slot_name)
            for r in wanted.slot_variables
        )
    assert object_graph_of(nodes) == parse_object_graph(graph_bytes)
    if prefix.startswith("slots"):
        assert any(node.slot_variables for node in nodes)


def test_object_basic_paths_and_nesting() -> None:
    graph = parse_object_graph(fixture_graph_bytes("object_basic/ckpt-1"))
    paths = {a.checkpoint_key: a.object_path for a in graph.attributes}
    assert paths["inner/table/a.Sb..c/.ATTRIBUTES/VARIABLE_VALUE"] == ("inner", "table", "a/b.c")
    assert graph.node_paths[:5] == ((), ("inner",), ("step",), ("text",), ("save_counter",))
    values = fixture_values("object_basic/ckpt-1")
    nested = keys_to_nested(graph, values)
    assert list(nested) == ["inner", "step", "save_counter"]  # 'text' is a DT_STRING: not read
    assert list(nested["inner"]) == ["w", "table", "items"]
    np.testing.assert_array_equal(nested["inner"]["w"], [[1.0, 2.0], [3.0, 4.0]])
    assert nested["inner"]["table"]["a/b.c"] == 7
    np.testing.assert_array_equal(nested["inner"]["table"]["plain"], [True, False])
    np.testing.assert_array_equal(nested["inner"]["items"]["1"], [1, 2, 3])
    assert nested["step"] == 42 and nested["save_counter"] == 1


def test_manager_values_through_the_graph() -> None:
    graph = parse_object_graph(fixture_graph_bytes("manager/ckpt-3"))
    nested = keys_to_nested(graph, fixture_values("manager/ckpt-3"))
    assert nested.keys() == {"step", "v", "save_counter"}
    np.testing.assert_array_equal(nested["v"], [4.0, 5.0, 6.0])
    assert nested["step"] == 3 and nested["save_counter"] == 3


def test_keras_adam_first_breadth_first_path_wins() -> None:
    graph = parse_object_graph(fixture_graph_bytes("keras_adam/ckpt-1"))
    nested = keys_to_nested(graph, fixture_values("keras_adam/ckpt-1"))
    # The model's weights are reached through the optimizer before the model's own layers.
    assert "model" not in nested
    assert list(nested["optimizer"]["_trainable_variables"]) == ["0", "1", "2", "3"]
    assert nested["optimizer"]["_trainable_variables"]["0"].shape == (3, 4)
    assert list(nested["optimizer"]["_variables"]) == [str(i) for i in range(2, 10)]
    assert nested["optimizer"]["_iterations"] == 1
    kernel = next(a for a in graph.attributes if a.full_name == "mlp/hidden/kernel")
    assert kernel.object_path == ("optimizer", "_trainable_variables", "0")


def test_slots_v1opt_slot_variables() -> None:
    graph = parse_object_graph(fixture_graph_bytes("slots_v1opt/ckpt-1"))
    assert graph.slot_variables == (
        SlotVariable(
            "w/.OPTIMIZER_SLOT/optimizer/m/.ATTRIBUTES/VARIABLE_VALUE",
            ("w",),
            ("optimizer",),
            "m",
            "VARIABLE_VALUE",
            6,
        ),
        SlotVariable(
            "w/.OPTIMIZER_SLOT/optimizer/v/.ATTRIBUTES/VARIABLE_VALUE",
            ("w",),
            ("optimizer",),
            "v",
            "VARIABLE_VALUE",
            7,
        ),
    )
    assert graph.node_paths[6] is None and graph.node_paths[7] is None
    nested = keys_to_nested(graph, fixture_values("slots_v1opt/ckpt-1"))
    assert set(nested) == {"w", "optimizer", "save_counter"}
    assert set(nested["optimizer"]) == {"beta1_power", "beta2_power", ".OPTIMIZER_SLOT"}
    slots = nested["optimizer"][".OPTIMIZER_SLOT"]
    assert set(slots) == {"w"} and set(slots["w"]) == {"m", "v"}
    assert slots["w"]["m"].shape == nested["w"].shape == (1, 3)


# ---------------------------------------------------------------------------------------------
# Building, checked byte for byte against the fixtures.


def test_build_matches_object_basic() -> None:
    values = fixture_values("object_basic/ckpt-1")

    def v(path: str) -> np.ndarray:
        return values[f"{path}/.ATTRIBUTES/VARIABLE_VALUE"]

    root = {
        "text": b"object-based",
        "step": v("step"),
        "inner": {  # a tf.Module: attributes in assignment order
            "w": v("inner/w"),
            "table": {"a/b.c": v("inner/table/a.Sb..c"), "plain": v("inner/table/plain")},
            "items": [v("inner/items/0"), v("inner/items/1")],
        },
    }
    keyed, graph = build_object_graph(root, save_counter=1)
    assert with_path_full_names(fixture_graph_bytes("object_basic/ckpt-1")) == graph
    assert keyed.keys() == fixture_keys("object_basic/ckpt-1")
    assert keyed["text/.ATTRIBUTES/VARIABLE_VALUE"] == b"object-based"
    assert keyed["save_counter/.ATTRIBUTES/VARIABLE_VALUE"].dtype == np.int64


@pytest.mark.parametrize(
    ("prefix", "root", "counter"),
    [
        ("object_basic/written", {"only": np.array([9.0], np.float32)}, None),
        ("manager/ckpt-3", {"v": np.zeros(3, np.float32), "step": np.int64(3)}, 3),
    ],
)
def test_build_matches_fixture(prefix: str, root: dict[str, Any], counter: int | None) -> None:
    keyed, graph = build_object_graph(root, save_counter=counter)
    assert with_path_full_names(fixture_graph_bytes(prefix)) == graph
    assert keyed.keys() == fixture_keys(prefix)


def test_build_empty_is_byte_identical_to_tf() -> None:
    keyed, graph = build_object_graph({})
    assert keyed == {}
    assert graph == fixture_graph_bytes("object_basic/minimal") == bytes.fromhex("0a022a00")


def test_build_names_shared_objects_by_the_shortest_path() -> None:
    arr = np.zeros(2)
    keyed, graph_bytes = build_object_graph({"a": {"x": {"y": arr}}, "b": [arr], "z": arr})
    assert list(keyed) == ["z/.ATTRIBUTES/VARIABLE_VALUE"]  # depth 1 beats a/x/y and b/0
    graph = parse_object_graph(graph_bytes)
    assert graph.attributes[0].object_path == ("z",)
    proto = TrackableObjectGraph()
    proto.ParseFromString(graph_bytes)
    references = [c.node_id for n in proto.nodes for c in n.children if c.local_name in "0yz"]
    assert len(set(references)) == 1 and len(references) == 3


def test_build_same_depth_tie_goes_to_the_earlier_name() -> None:
    arr = np.zeros(1)
    keyed, _ = build_object_graph({"b": {"deep": arr}, "a": [arr]})
    assert list(keyed) == ["a/0/.ATTRIBUTES/VARIABLE_VALUE"]


def test_build_scalars_are_never_shared() -> None:
    keyed, _ = build_object_graph({"a": 1, "b": 1, "c": "s", "d": "s"})
    assert len(keyed) == 4


def test_build_cycles_and_empty_containers() -> None:
    inner: dict[str, Any] = {"w": np.ones(1), "empty": [], "none": None}
    inner["self"] = inner
    keyed, graph_bytes = build_object_graph({"m": inner})
    assert list(keyed) == ["m/w/.ATTRIBUTES/VARIABLE_VALUE"]
    proto = TrackableObjectGraph()
    proto.ParseFromString(graph_bytes)
    assert [(c.node_id, c.local_name) for c in proto.nodes[1].children] == [
        (2, "w"),
        (3, "empty"),
        (1, "self"),
    ]
    assert [n.has_checkpoint_values.value for n in proto.nodes] == [True, True, True, False]
    assert all(n.HasField("has_checkpoint_values") for n in proto.nodes)


def test_build_namedtuple_children_by_field_and_by_index() -> None:
    keyed, graph_bytes = build_object_graph({"p": Pair(np.zeros(1), np.ones(1))})
    assert sorted(keyed) == ["p/x/.ATTRIBUTES/VARIABLE_VALUE", "p/y/.ATTRIBUTES/VARIABLE_VALUE"]
    proto = TrackableObjectGraph()
    proto.ParseFromString(graph_bytes)
    assert [(c.node_id, c.local_name) for c in proto.nodes[1].children] == [
        (2, "x"),
        (3, "y"),
        (2, "0"),
        (3, "1"),
    ]


def test_build_rejects_what_tf_cannot_name() -> None:
    with pytest.raises(UnsupportedError, match="not a str"):
        build_object_graph({"m": {1: np.zeros(1)}})
    with pytest.raises(NamingError, match="save_counter"):
        build_object_graph({"save_counter": np.zeros(1)}, save_counter=1)


names = st.text(alphabet=st.sampled_from("ab./S"), min_size=1, max_size=4)
leaves = st.builds(lambda n: np.full(n, 1.5, np.float32), st.integers(0, 3))
trees = st.recursive(
    leaves,
    lambda inner: st.dictionaries(names, inner, max_size=3) | st.lists(inner, max_size=3),
    max_leaves=12,
)


def _expected_nested(tree: Any) -> Any:
    """What keys_to_nested gives back: lists become dicts by index, empty containers vanish."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    if not isinstance(tree, (dict, list)):
        return tree
    out = {}
    for key, value in items:
        converted = _expected_nested(value)
        if not (isinstance(converted, dict) and not converted):
            out[str(key)] = converted
    return out


def _assert_nested_equal(a: Any, b: Any) -> None:
    if isinstance(b, dict):
        assert isinstance(a, dict) and a.keys() == b.keys()
        for key in b:
            _assert_nested_equal(a[key], b[key])
    else:
        np.testing.assert_array_equal(a, b)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(names, trees, max_size=4), st.none() | st.integers(0, 2**40))
def test_build_parse_round_trip(root: dict[str, Any], counter: int | None) -> None:
    keyed, graph_bytes = build_object_graph(root, save_counter=counter)
    graph = parse_object_graph(graph_bytes)
    assert graph.checkpoint_keys == keyed.keys()
    assert graph.slot_variables == ()
    expected = _expected_nested(root)
    if counter is not None:
        expected["save_counter"] = counter
    _assert_nested_equal(keys_to_nested(graph, keyed), expected)


# ---------------------------------------------------------------------------------------------
# Malformed graphs.


def _graph(*nodes: dict[str, Any]) -> bytes:
    return TrackableObjectGraph(nodes=list(nodes)).SerializeToString()


def _attr(key: str, name: str = "VARIABLE_VALUE") -> dict[str, str]:
    return {"name": name, "full_name": key, "checkpoint_key": key}


@pytest.mark.parametrize(
    ("graph_bytes", "message"),
    [
        (b"", "no root"),
        (b"\x0a\x05\x0a\x03", "not a TrackableObjectGraph"),
        (_graph({"children": [{"node_id": 5, "local_name": "x"}]}), "refers to node 5"),
        (_graph({"children": [{"node_id": -1, "local_name": "x"}]}), "refers to node -1"),
        (
            _graph(
                {
                    "children": [
                        {"node_id": 1, "local_name": "a"},
                        {"node_id": 2, "local_name": "b"},
                    ]
                },
                {"attributes": [_attr("k")]},
                {"attributes": [_attr("k")]},
            ),
            "twice",
        ),
        (
            _graph(
                {"slot_variables": [{"original_variable_node_id": 1, "slot_variable_node_id": 1}]},
                {"attributes": [_attr("k")]},
            ),
            "does not reach",
        ),
        (
            _graph(
                {"slot_variables": [{"original_variable_node_id": 0, "slot_variable_node_id": 9}]}
            ),
            "refers to node 9",
        ),
    ],
)
def test_parse_rejects_malformed_graphs(graph_bytes: bytes, message: str) -> None:
    with pytest.raises(CorruptCheckpointError, match=message):
        parse_object_graph(graph_bytes)


def test_parse_tolerates_cycles_orphans_and_unknown_fields() -> None:
    graph_bytes = _graph(
        {"children": [{"node_id": 1, "local_name": "a"}]},
        {"children": [{"node_id": 0, "local_name": "up"}], "attributes": [_attr("a/k")]},
        {"attributes": [_attr("orphan")]},
    )
    graph = parse_object_graph(graph_bytes + b"\xf8\x07\x01")  # unknown field 127 = 1
    assert graph.node_paths == ((), ("a",), None)
    assert graph.checkpoint_keys == {"a/k"}


def test_keys_to_nested_other_attributes_and_mixed_nodes() -> None:
    graph_bytes = _graph(
        {"children": [{"node_id": 1, "local_name": "table"}, {"node_id": 2, "local_name": "v"}]},
        {"attributes": [_attr("t/keys", "table-keys"), _attr("t/values", "table-values")]},
        {"children": [{"node_id": 3, "local_name": "inner"}], "attributes": [_attr("v")]},
        {"attributes": [_attr("v/inner")]},
    )
    graph = parse_object_graph(graph_bytes)
    values = {"t/keys": 1, "t/values": 2, "v": 3, "v/inner": 4, "unrelated": 5}
    assert keys_to_nested(graph, values) == {
        "table": {".ATTRIBUTES": {"table-keys": 1, "table-values": 2}},
        "v": {"inner": 4, ".ATTRIBUTES": {"VARIABLE_VALUE": 3}},
    }
    # A partial read gives a partial tree, and then 'v' is a plain leaf again.
    assert keys_to_nested(graph, {"v": 3}) == {"v": 3}


def test_keys_to_nested_collision_is_unsupported() -> None:
    graph_bytes = _graph(
        {
            "children": [
                {"node_id": 1, "local_name": "v"},
                {"node_id": 2, "local_name": "v"},
            ]
        },
        {"attributes": [_attr("k1")]},
        {"attributes": [_attr("k2")]},
    )
    with pytest.raises(UnsupportedError):
        keys_to_nested(parse_object_graph(graph_bytes), {"k1": 1, "k2": 2})


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_parse_random_bytes_raises_only_our_errors(data: bytes) -> None:
    try:
        graph = parse_object_graph(data)
    except StreamCkptError:
        return
    assert isinstance(graph, ObjectGraph)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_parse_mutated_fixture_raises_only_our_errors(data: st.DataObject) -> None:
    original = bytearray(fixture_graph_bytes("slots_v1opt/ckpt-1"))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(original) - 1))
        original[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(original)))
    try:
        graph = parse_object_graph(bytes(original[:cut]))
    except StreamCkptError:
        return
    keys_to_nested(graph, {key: 0 for key in graph.checkpoint_keys})


# ---------------------------------------------------------------------------------------------
# Real TensorFlow, both ways.


@pytest.fixture(scope="module")
def tf() -> Any:
    return pytest.importorskip("tensorflow")


def _python_tree(rng: np.random.Generator) -> dict[str, Any]:
    """The plain-Python stand-in for the tf.Module tree built by _tf_tree."""

    def arr(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    zeta = arr(2)
    return {
        "net": {
            "zeta": zeta,
            "blocks": [{"w": arr(2, 3), "b": arr(3)}, {"w": arr(3, 1), "b": arr(1)}],
            "table": {"z": arr(1), "a/b.c": arr(2), "nested": {"y": arr(1), "x": [arr(1)]}},
            "pair": Pair(arr(1), arr(2)),
            "tup": (arr(3),),
            "empty_list": [],
            "empty_dict": {},
            "alias": zeta,
        },
        "step": np.array(12, np.int64),
        "extra": arr(4),
    }


def _tf_tree(tf: Any, tree: dict[str, Any]) -> dict[str, Any]:
    """tf.Modules, lists, dicts and tuples of tf.Variables with the values of ``tree``."""

    class Block(tf.Module):  # type: ignore[misc]
        def __init__(self, spec: dict[str, np.ndarray]) -> None:
            super().__init__()
            self.w = tf.Variable(spec["w"])
            self.b = tf.Variable(spec["b"])

    class Net(tf.Module):  # type: ignore[misc]
        def __init__(self, spec: dict[str, Any]) -> None:
            super().__init__()
            table = spec["table"]
            self.zeta = tf.Variable(spec["zeta"])
            self.blocks = [Block(b) for b in spec["blocks"]]
            self.table = {
                "z": tf.Variable(table["z"]),
                "a/b.c": tf.Variable(table["a/b.c"]),
                "nested": {
                    "y": tf.Variable(table["nested"]["y"]),
                    "x": [tf.Variable(table["nested"]["x"][0])],
                },
            }
            self.pair = Pair(tf.Variable(spec["pair"].x), tf.Variable(spec["pair"].y))
            self.tup = (tf.Variable(spec["tup"][0]),)
            self.empty_list: list[Any] = []
            self.empty_dict: dict[str, Any] = {}
            self.alias = self.zeta

    return {
        "net": Net(tree["net"]),
        "step": tf.Variable(tree["step"]),
        "extra": tf.Variable(tree["extra"]),
    }


@pytest.mark.tf
def test_tf_writes_the_graph_we_build(tf: Any, tmp_path: Path) -> None:
    tree = _python_tree(np.random.default_rng(1))
    written = tf.train.Checkpoint(**_tf_tree(tf, tree)).write(str(tmp_path / "w"))
    saved = tf.train.Checkpoint(**_tf_tree(tf, tree)).save(str(tmp_path / "s"))
    for prefix, counter in ((written, None), (saved, 1)):
        reader = tf.train.load_checkpoint(prefix)
        tf_keys = {name for name, _ in tf.train.list_variables(prefix)} - {OBJECT_GRAPH_KEY}
        keyed, graph = build_object_graph(tree, save_counter=counter)
        assert keyed.keys() == tf_keys
        assert with_path_full_names(reader.get_tensor(OBJECT_GRAPH_KEY)) == graph
        for key, value in keyed.items():
            np.testing.assert_array_equal(reader.get_tensor(key), to_numpy(value))
        if counter is None:
            assert "net/alias/.ATTRIBUTES/VARIABLE_VALUE" not in keyed  # zeta's node, once
            assert "net/pair/x/.ATTRIBUTES/VARIABLE_VALUE" in keyed


@pytest.mark.tf
def test_tf_restores_our_graph(tf: Any, tmp_path: Path) -> None:
    tree = _python_tree(np.random.default_rng(2))
    for counter in (None, 5):
        prefix = str(tmp_path / f"ours-{counter}")
        keyed, graph = build_object_graph(tree, save_counter=counter)
        names = [*keyed, OBJECT_GRAPH_KEY]
        tensors = [tf.constant(to_numpy(v)) for v in keyed.values()] + [tf.constant(graph)]
        tf.raw_ops.SaveV2(
            prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names), tensors=tensors
        )
        # Fresh objects with other values; the restore must overwrite every one of them.
        target = _tf_tree(tf, _python_tree(np.random.default_rng(99)))
        checkpoint = tf.train.Checkpoint(**target)
        if counter is None:
            checkpoint.read(prefix).assert_consumed()
        else:
            checkpoint.restore(prefix).assert_consumed()
            assert int(checkpoint.save_counter.numpy()) == counter
        # What TF now holds, written back by TF: the same keys and values we wrote.
        reader = tf.train.load_checkpoint(checkpoint.write(f"{prefix}-back"))
        for key, value in keyed.items():
            np.testing.assert_array_equal(reader.get_tensor(key), to_numpy(value))
