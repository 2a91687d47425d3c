"""TensorFlow's object-based checkpoint names and the ``_CHECKPOINTABLE_OBJECT_GRAPH`` proto.

``tf.train.Checkpoint`` names a value by the path of local names from the root object to the
object that owns it, and records the whole object graph beside the tensors, so that a restore
can match objects even when Python attribute names alone would be ambiguous. This module
builds that graph from a nested Python tree and reads it back; it does no I/O.

Invariants (format spec, section 8; checked against TensorFlow 2.21 by the tests):

* Node 0 is the root; node ids are the breadth-first visiting order. The root's children are
  sorted by name (``tf.train.Checkpoint(**kwargs)`` sorts its keyword arguments), with
  ``save_counter`` appended last. Below the root, children keep their declared order:
  ``dict`` insertion order, list and tuple indices ``"0"``, ``"1"``, ..., a namedtuple's field
  names followed by its indices as aliases of the same nodes, dataclass fields, object
  attributes in assignment order. Unlike ``tf.Module``, objects' attributes whose names start
  with ``_`` are skipped, as in :mod:`streamckpt.naming`; ``None`` and code are skipped.
* An object reached twice (by identity) is one node; its key uses the first breadth-first
  path. Immutable scalars are never shared, since Python interns small ones.
* Every node carries ``has_checkpoint_values``, true when it or anything below it holds a
  value, and written even when false, as TensorFlow does.
* Keys are ``<escaped path>/.ATTRIBUTES/<escaped attribute>``; escaping turns ``.`` into
  ``..`` and then ``/`` into ``.S``, so it can be undone unambiguously.

The package: ``_names`` (escaping, keys), ``_build`` (a tree's graph, as a save writes it),
``_read`` (a stored graph read back, and the nested view of its values).
"""

from streamckpt.objectgraph._build import build_object_graph, tracked_children, tree_nodes
from streamckpt.objectgraph._names import (
    ATTRIBUTES,
    OBJECT_GRAPH_KEY,
    OPTIMIZER_SLOT,
    SAVE_COUNTER,
    VARIABLE_VALUE,
    checkpoint_key,
    escape_local_name,
    object_path_key,
    unescape_local_name,
)
from streamckpt.objectgraph._read import (
    GraphNode,
    ObjectGraph,
    SavedAttribute,
    SlotVariable,
    keys_to_nested,
    object_graph_of,
    parse_object_graph,
    read_graph,
)

__all__ = [
    "ATTRIBUTES",
    "OBJECT_GRAPH_KEY",
    "OPTIMIZER_SLOT",
    "SAVE_COUNTER",
    "VARIABLE_VALUE",
    "GraphNode",
    "ObjectGraph",
    "SavedAttribute",
    "SlotVariable",
    "build_object_graph",
    "checkpoint_key",
    "escape_local_name",
    "keys_to_nested",
    "object_graph_of",
    "object_path_key",
    "parse_object_graph",
    "read_graph",
    "tracked_children",
    "tree_nodes",
    "unescape_local_name",
]
