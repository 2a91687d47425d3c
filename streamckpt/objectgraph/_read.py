"""A serialized object graph read back: its nodes, what it says about the keys, a nested view.

Every reference between nodes is checked (a hostile graph gets a CorruptCheckpointError, never
an IndexError or a loop), and every checkpoint key may be named once.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from google.protobuf.message import DecodeError

from streamckpt.errors import CorruptCheckpointError, UnsupportedError
from streamckpt.objectgraph._names import (
    ATTRIBUTES,
    OBJECT_GRAPH_KEY,
    OPTIMIZER_SLOT,
    VARIABLE_VALUE,
    object_path_key,
)
from streamckpt.proto.trackable_object_graph_pb2 import TrackableObjectGraph

__all__ = [
    "GraphNode",
    "ObjectGraph",
    "SavedAttribute",
    "SlotVariable",
    "keys_to_nested",
    "object_graph_of",
    "parse_object_graph",
    "read_graph",
]


@dataclasses.dataclass(frozen=True, slots=True)
class SavedAttribute:
    """One tensor an object saved: where the object sits, and under which bundle key."""

    checkpoint_key: str
    object_path: tuple[str, ...]
    attribute_name: str
    full_name: str
    node_id: int


@dataclasses.dataclass(frozen=True, slots=True)
class SlotVariable:
    """One optimizer slot (``m``, ``v``, ...) of one variable, as legacy optimizers save them.

    Slot variables are not children of any object; the optimizer's node names them through
    ``slot_variables``, and their keys read
    ``<variable>/.OPTIMIZER_SLOT/<optimizer>/<slot name>/.ATTRIBUTES/VARIABLE_VALUE``.
    """

    checkpoint_key: str
    variable_path: tuple[str, ...]
    optimizer_path: tuple[str, ...]
    slot_name: str
    attribute_name: str
    node_id: int


@dataclasses.dataclass(frozen=True, slots=True)
class ObjectGraph:
    """What a ``_CHECKPOINTABLE_OBJECT_GRAPH`` says about the keys of its checkpoint.

    ``node_paths[i]`` is node ``i``'s shortest breadth-first path of unescaped local names, or
    None when the root does not reach it (slot variables, and orphans no restore can use;
    an orphan's attributes are listed nowhere).
    """

    node_paths: tuple[tuple[str, ...] | None, ...]
    attributes: tuple[SavedAttribute, ...]
    slot_variables: tuple[SlotVariable, ...]

    @property
    def checkpoint_keys(self) -> frozenset[str]:
        """Every bundle key the graph accounts for."""
        return frozenset(a.checkpoint_key for a in self.attributes) | frozenset(
            s.checkpoint_key for s in self.slot_variables
        )


class GraphNode(NamedTuple):
    """One node of a serialized ``TrackableObjectGraph``, as plain values.

    The proto's accessors build a wrapper object on every access (a few µs a node), so a
    graph of 20,000 variables is read once, here, and every later pass (paths, attributes,
    slots, a restore's matching) walks these tuples.
    """

    #: (local name, node id) of each child, in order
    children: tuple[tuple[str, int], ...]
    #: (name, full name, checkpoint key) of each saved attribute
    attributes: tuple[tuple[str, str, str], ...]
    #: (original variable's node id, slot variable's node id, slot name) of each slot
    slot_variables: tuple[tuple[int, int, str], ...]


def read_graph(graph_bytes: bytes) -> list[GraphNode]:
    """The nodes of a serialized ``TrackableObjectGraph``, read in one pass.

    CorruptCheckpointError if it is not one, or has no root. References between nodes are
    checked by :func:`object_graph_of`.
    """
    graph = TrackableObjectGraph()
    try:
        graph.ParseFromString(graph_bytes)
    except DecodeError as exc:
        raise CorruptCheckpointError(
            f"object graph is not a TrackableObjectGraph: {exc}", tensor=OBJECT_GRAPH_KEY
        ) from exc
    if not graph.nodes:
        raise CorruptCheckpointError("object graph has no root node", tensor=OBJECT_GRAPH_KEY)
    return [
        GraphNode(
            tuple([(ref.local_name, ref.node_id) for ref in node.children]),
            tuple([(a.name, a.full_name, a.checkpoint_key) for a in node.attributes]),
            tuple(
                [
                    (ref.original_variable_node_id, ref.slot_variable_node_id, ref.slot_name)
                    for ref in node.slot_variables
                ]
            ),
        )
        for node in graph.nodes
    ]


def parse_object_graph(graph_bytes: bytes) -> ObjectGraph:
    """Read a serialized ``TrackableObjectGraph``; raise CorruptCheckpointError if malformed."""
    return object_graph_of(read_graph(graph_bytes))


def object_graph_of(nodes: Sequence[GraphNode]) -> ObjectGraph:
    """What :func:`read_graph`'s nodes say about the keys; every reference checked."""
    paths = _breadth_first_paths(nodes)
    attributes = [
        SavedAttribute(key, path, name, full_name, node_id)
        for node_id, path in enumerate(paths)
        if path is not None
        for name, full_name, key in nodes[node_id].attributes
    ]
    slots = _slot_variables(nodes, paths)
    _check_unique_keys([a.checkpoint_key for a in attributes] + [s.checkpoint_key for s in slots])
    return ObjectGraph(tuple(paths), tuple(attributes), tuple(slots))


def _node_ref(nodes: Sequence[GraphNode], node_id: int, owner: int) -> int:
    if not 0 <= node_id < len(nodes):
        raise CorruptCheckpointError(
            f"node {owner} refers to node {node_id}, but the graph has {len(nodes)} nodes",
            tensor=OBJECT_GRAPH_KEY,
        )
    return node_id


def _breadth_first_paths(nodes: Sequence[GraphNode]) -> list[tuple[str, ...] | None]:
    paths: list[tuple[str, ...] | None] = [None] * len(nodes)
    paths[0] = ()
    queue = collections.deque([0])
    while queue:
        node_id = queue.popleft()
        path = paths[node_id]
        assert path is not None
        for local_name, child in nodes[node_id].children:
            child_id = _node_ref(nodes, child, node_id)
            if paths[child_id] is None:
                paths[child_id] = (*path, local_name)
                queue.append(child_id)
    return paths


def _slot_variables(
    nodes: Sequence[GraphNode], paths: Sequence[tuple[str, ...] | None]
) -> list[SlotVariable]:
    slots: list[SlotVariable] = []
    for optimizer_id, optimizer_path in enumerate(paths):
        if optimizer_path is None:
            continue
        for original, slot, slot_name in nodes[optimizer_id].slot_variables:
            variable_id = _node_ref(nodes, original, optimizer_id)
            slot_id = _node_ref(nodes, slot, optimizer_id)
            variable_path = paths[variable_id]
            if variable_path is None:
                raise CorruptCheckpointError(
                    f"slot {slot_name!r} of node {optimizer_id} belongs to node "
                    f"{variable_id}, which the root does not reach",
                    tensor=OBJECT_GRAPH_KEY,
                )
            slots.extend(
                SlotVariable(key, variable_path, optimizer_path, slot_name, name, slot_id)
                for name, _full_name, key in nodes[slot_id].attributes
            )
    return slots


def _check_unique_keys(keys: Iterable[str]) -> None:
    seen: set[str] = set()
    for key in keys:
        if key in seen:
            raise CorruptCheckpointError("object graph names one checkpoint key twice", tensor=key)
        seen.add(key)


# ---------------------------------------------------------------------------------------------
# Nested view of a restored checkpoint.


def keys_to_nested(graph: ObjectGraph, values: Mapping[str, Any]) -> dict[str, Any]:
    """Arrange restored values as nested dicts keyed by unescaped local names.

    A variable becomes the value itself at its object path
    (``{"model": {"dense": {"kernel": arr}}}``). Attributes other than ``VARIABLE_VALUE``,
    and a ``VARIABLE_VALUE`` of an object that also has saved children, go under
    ``".ATTRIBUTES"`` in the object's dict, as in the key (``{"table": {".ATTRIBUTES":
    {"table-keys": arr, ...}}}``). Optimizer slots live with the optimizer:
    ``<optimizer>[".OPTIMIZER_SLOT"][<escaped variable path>][<slot name>]``, for instance
    ``{"optimizer": {".OPTIMIZER_SLOT": {"w": {"m": arr, "v": arr}}}}``. Keys of ``values``
    the graph does not name (the graph's own key among them) are left out; keys the graph
    names that ``values`` lacks are skipped, so a partial read gives a partial tree.
    """
    # Each value with the node that owns it, its location, and whether it is a plain variable
    # (which becomes a bare leaf unless something else is saved below its object).
    by_node: dict[int, list[tuple[tuple[str, ...], Any, str, bool]]] = {}
    for attr in graph.attributes:
        if attr.checkpoint_key in values:
            plain = attr.attribute_name == VARIABLE_VALUE
            location = (
                attr.object_path if plain else (*attr.object_path, ATTRIBUTES, attr.attribute_name)
            )
            entry = (location, values[attr.checkpoint_key], attr.checkpoint_key, plain)
            by_node.setdefault(attr.node_id, []).append(entry)
    slots: list[tuple[tuple[str, ...], Any, str, bool]] = []
    for slot in graph.slot_variables:
        if slot.checkpoint_key in values:
            location = (
                *slot.optimizer_path,
                OPTIMIZER_SLOT,
                object_path_key(slot.variable_path),
                slot.slot_name,
            )
            if slot.attribute_name != VARIABLE_VALUE:
                location = (*location, ATTRIBUTES, slot.attribute_name)
            slots.append((location, values[slot.checkpoint_key], slot.checkpoint_key, False))

    everything = [entry for entries in by_node.values() for entry in entries] + slots
    interior = {loc[:depth] for loc, _, _, _ in everything for depth in range(len(loc))}
    nested: dict[str, Any] = {}
    # Node order is breadth-first, so each dict receives its entries in child order.
    for node_id, path in enumerate(graph.node_paths):
        if path and path in interior:
            _dict_at(nested, path, None)
        for location, value, key, plain in by_node.get(node_id, ()):
            if plain and (not location or location in interior):
                location = (*location, ATTRIBUTES, VARIABLE_VALUE)
            _place(nested, location, value, key)
    for location, value, key, _ in slots:
        _place(nested, location, value, key)
    return nested


def _dict_at(nested: dict[str, Any], path: tuple[str, ...], key: str | None) -> dict[str, Any]:
    """The dict at ``path``, made on the way; ``key`` names the value that needs it."""
    level = nested
    for name in path:
        below = level.setdefault(name, {})
        if not isinstance(below, dict):
            raise UnsupportedError(
                f"{'/'.join(path)!r} is both a saved value and an object", tensor=key
            )
        level = below
    return level


def _place(nested: dict[str, Any], location: tuple[str, ...], value: Any, key: str) -> None:
    level = _dict_at(nested, location[:-1], key)
    if location[-1] in level:
        raise UnsupportedError(
            f"key {key!r} lands where another value already sits "
            f"(a local name {ATTRIBUTES!r} or {OPTIMIZER_SLOT!r}?)",
            tensor=key,
        )
    level[location[-1]] = value
