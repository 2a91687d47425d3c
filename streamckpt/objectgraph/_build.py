"""The object graph of a Python tree, as ``tf.train.Checkpoint.save`` would write it.

The graph's nodes are :func:`tree_nodes`, which a restore walks too (so both see the same
tree); :func:`build_object_graph` names every leaf and serializes the graph.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from streamckpt.errors import NamingError, UnsupportedError
from streamckpt.objectgraph._names import SAVE_COUNTER, VARIABLE_VALUE, checkpoint_key
from streamckpt.proto.trackable_object_graph_pb2 import TrackableObjectGraph
from streamckpt.tree import (
    Child,
    ChildrenOf,
    Leaf,
    Node,
    children,
    is_leaf,
    is_namedtuple,
    is_skipped_value,
    walk,
)

__all__ = ["build_object_graph", "tracked_children", "tree_nodes"]


def tracked_children(node: Any, path: tuple[str, ...]) -> list[Child]:
    """The children TensorFlow's data-structure wrappers would track, in their order."""
    found = children(node, path)
    if found is None:
        shown = "/".join(path) or "the root"
        raise UnsupportedError(
            f"{type(node).__name__} at {shown!r} is neither a leaf nor a container"
        )
    kept = [child for child in found if not is_skipped_value(child.value)]
    if is_namedtuple(node):
        # TensorFlow's tuple wrapper tracks a namedtuple's fields by name and by position.
        kept += [
            child._replace(name=str(index))
            for index, child in enumerate(found)
            if not is_skipped_value(child.value)
        ]
    return kept


def tree_nodes(
    root: Any,
    top: Sequence[Child],
    *,
    children_of: ChildrenOf | None = None,
    leaf: Callable[[Any], bool] = is_leaf,
    with_sites: bool = False,
) -> list[Node]:
    """The tree under a root whose children are ``top``, as TensorFlow's graph nodes.

    Node 0 is the root; ids are the breadth-first visiting order, and an object reached twice
    (by identity; immutable scalars never are) is one node. Saving builds the graph from these
    nodes, and a restore matches them with the graph it reads, so both see the same tree.
    ``with_sites`` records every edge into a node (a restore writes leaves in place through
    them; a save has no use for them).
    """
    return walk(
        root,
        top,
        children_of=children_of or tracked_children,
        leaf=leaf,
        order="breadth",
        share=True,
        with_sites=with_sites,
    )


def _graph_children(node: Any, path: tuple[str, ...]) -> list[Child]:
    """``tracked_children``, refusing what a TensorFlow checkpoint cannot name."""
    if isinstance(node, dict):
        for key in node:
            if not isinstance(key, str):
                raise UnsupportedError(
                    f"dict key {key!r} at {'/'.join(path)!r} is not a str; TensorFlow "
                    "checkpoints name dict entries by string keys only"
                )
    return tracked_children(node, path)


def build_object_graph(
    root_children: Mapping[str, Any], *, save_counter: int | None = None
) -> tuple[dict[str, Leaf], bytes]:
    """Checkpoint keys with their leaves, and the serialized object graph, for a tree.

    The root plays the part of ``tf.train.Checkpoint(**root_children)``. ``save_counter``,
    when given, is added as the int64 scalar ``tf.train.Checkpoint.save`` writes. Leaves are
    returned as they are (see :func:`streamckpt.naming.to_numpy`); each one gets the
    attribute ``VARIABLE_VALUE`` and, as its TF1-style ``full_name``, its unescaped path joined
    with ``/`` (TensorFlow writes the variable's own name there and ignores it on restore).
    """
    for name in root_children:
        if not isinstance(name, str):
            raise UnsupportedError(f"root child name {name!r} is not a str")
    if save_counter is not None and SAVE_COUNTER in root_children:
        raise NamingError(f"{SAVE_COUNTER!r} is reserved for the save counter")
    top = [
        Child(name, root_children[name], "item", name)
        for name in sorted(root_children)
        if not is_skipped_value(root_children[name])
    ]
    if save_counter is not None:
        top.append(Child(SAVE_COUNTER, np.asarray(save_counter, dtype=np.int64), "fixed", None))
    nodes = tree_nodes(root_children, top, children_of=_graph_children)
    values_by_key = {checkpoint_key(n.path): n.value for n in nodes if n.is_leaf}
    return values_by_key, _serialize(nodes)


def _serialize(nodes: Sequence[Node]) -> bytes:
    has_values = _nodes_with_values(
        [[child_id for _, child_id in n.children] for n in nodes],
        [n.is_leaf for n in nodes],
    )
    graph = TrackableObjectGraph()
    for node_id, node in enumerate(nodes):
        proto = graph.nodes.add()
        for local_name, child_id in node.children:
            proto.children.add(node_id=child_id, local_name=local_name)
        if node.is_leaf:
            proto.attributes.add(
                name=VARIABLE_VALUE,
                full_name="/".join(node.path),
                checkpoint_key=checkpoint_key(node.path),
            )
        proto.has_checkpoint_values.value = node_id in has_values
    return graph.SerializeToString(deterministic=True)


def _nodes_with_values(children: Sequence[Sequence[int]], holds_value: Sequence[bool]) -> set[int]:
    """Nodes that hold a value or reach one; linear even when the graph has cycles."""
    parents: list[list[int]] = [[] for _ in children]
    for parent, child_ids in enumerate(children):
        for child_id in child_ids:
            parents[child_id].append(parent)
    marked = {node_id for node_id, holds in enumerate(holds_value) if holds}
    queue = collections.deque(marked)
    while queue:
        for parent in parents[queue.popleft()]:
            if parent not in marked:
                marked.add(parent)
                queue.append(parent)
    return marked
