"""Restoring an object-based checkpoint into a Python tree, as ``tf.train.Checkpoint`` does.

Rules:

* **Restore matches objects, not strings.** Like TensorFlow, restore walks the checkpoint's
  object graph and the Python tree together from the root, pairing children by local name. A
  value therefore reaches its object even when the checkpoint keyed it through another path
  (Keras keys model weights through the optimizer).
* **Restore is all or nothing.** Every shape, dtype and writability problem is found from the
  index before any data is read, and reported in one error; then nothing is written. TensorFlow
  raises at the first bad variable and leaves the others half restored.
* **Linear in leaves.** The index's entries are looked up once; matching is one pass over
  each graph.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from streamckpt import api
from streamckpt.distributed import Coordinator
from streamckpt.distributed.leaves import fill, local_boxes
from streamckpt.distributed.together import from_primary
from streamckpt.errors import (
    CorruptCheckpointError,
    ObjectMatchError,
    UnsupportedError,
    ValueMismatchError,
)
from streamckpt.format.dtypes import DataType
from streamckpt.frameworks import is_torch_tensor, torch_numpy_dtype
from streamckpt.objectgraph import (
    OBJECT_GRAPH_KEY,
    SAVE_COUNTER,
    VARIABLE_VALUE,
    GraphNode,
    checkpoint_key,
    keys_to_nested,
    object_graph_of,
    parse_object_graph,
    read_graph,
    tree_nodes,
)
from streamckpt.pipeline.info import TensorInfo
from streamckpt.pipeline.read import CheckpointReader
from streamckpt.sharding import Slice
from streamckpt.storage import PathLike
from streamckpt.tree import (
    Child,
    Node,
    is_leaf,
    is_skipped_value,
    prepare_write,
    replace_leaf,
    to_numpy,
    write_in_place,
)

__all__ = ["RestoreStatus", "load_nested", "read_object_graph", "restore_tree"]

logger = logging.getLogger("streamckpt.checkpoint")


class _Counter:
    """Stands for ``save_counter`` in the Python tree during a restore."""


_COUNTER = _Counter()


def _python_graph(root: Mapping[str, Any], *, with_counter: bool) -> list[Node]:
    """The Python tree as the graph a save of it would write (``save_counter`` stood for)."""
    top = [Child(name, root[name], "item", name) for name in sorted(root)]
    top = [child for child in top if not is_skipped_value(child.value)]
    if with_counter:
        top.append(Child(SAVE_COUNTER, _COUNTER, "fixed", None))
    return tree_nodes(
        root, top, leaf=lambda value: value is _COUNTER or is_leaf(value), with_sites=True
    )


@dataclasses.dataclass(frozen=True, slots=True)
class _Match:
    """Which Python leaf takes which checkpoint key, and what is left over on either side."""

    bound: tuple[tuple[Node, str], ...]
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]


def _match(nodes: Sequence[Node], graph: Sequence[GraphNode]) -> _Match:
    """Pair Python objects with checkpoint nodes from the root down, by local name.

    This is TensorFlow's matching: an object is found through any path the checkpoint records,
    the first pairing of an object or a node wins, and only leaves (variables) count as
    missing. Unexpected are the attributes of checkpoint nodes no leaf took, slot variables
    and orphans among them.
    """
    children_by_node = []
    for graph_node in graph:
        by_name: dict[str, int] = {}
        for local_name, node_id in graph_node.children:
            by_name.setdefault(local_name, node_id)
        children_by_node.append(by_name)
    node_of: dict[int, int] = {0: 0}
    taken = {0}
    queue = collections.deque([0])
    while queue:
        py_id = queue.popleft()
        for local_name, child_id in nodes[py_id].children:
            ckpt_id = children_by_node[node_of[py_id]].get(local_name)
            if child_id in node_of or ckpt_id is None or ckpt_id in taken:
                continue
            node_of[child_id] = ckpt_id
            taken.add(ckpt_id)
            queue.append(child_id)

    bound: list[tuple[Node, str]] = []
    missing: list[str] = []
    used: set[tuple[int, str]] = set()
    for py_id, node in enumerate(nodes):
        if not node.is_leaf:
            continue
        ckpt_id = node_of.get(py_id)
        attrs = graph[ckpt_id].attributes if ckpt_id is not None else ()
        key = next((key for name, _, key in attrs if name == VARIABLE_VALUE), None)
        if key is None or ckpt_id is None:
            missing.append(checkpoint_key(node.path))
        else:
            bound.append((node, key))
            used.add((ckpt_id, key))
    unexpected = [
        key
        for ckpt_id, graph_node in enumerate(graph)
        for _, _, key in graph_node.attributes
        if (ckpt_id, key) not in used
    ]
    return _Match(tuple(bound), tuple(missing), tuple(unexpected))


def _sharded_problem(target: Any, info: TensorInfo) -> str | None:
    """Why a sharded target (Slice, DTensor, sharded jax.Array) cannot take the value."""
    full_shape = tuple(target.full_shape if isinstance(target, Slice) else target.shape)
    if full_shape != info.shape:
        return f"shape {list(info.shape)} in the checkpoint, {list(full_shape)} in the tree"
    value = target.value if isinstance(target, Slice) else target
    dtype = torch_numpy_dtype(value) if is_torch_tensor(value) else np.dtype(value.dtype)
    if info.dtype.kind == "O" or not np.can_cast(info.dtype, dtype, casting="safe"):
        return f"dtype {info.dtype} in the checkpoint does not cast safely to {dtype}"
    return None


def _leaf_problem(node: Node, info: TensorInfo, *, sharded: bool) -> str | None:
    """Why the stored value cannot go into this leaf, or None if it can."""
    if sharded:
        return _sharded_problem(node.value, info)
    if node.value is _COUNTER:
        if info.shape != () or info.dtype.kind not in "iu":
            return f"save_counter must be an integer scalar, found {info.dtype}{list(info.shape)}"
        return None
    target = to_numpy(node.value)
    if tuple(target.shape) != info.shape:
        return f"shape {list(info.shape)} in the checkpoint, {list(target.shape)} in the tree"
    strings = (info.dtype.kind == "O", target.dtype.kind == "O")
    if strings[0] != strings[1] or not np.can_cast(info.dtype, target.dtype, casting="safe"):
        return f"dtype {info.dtype} in the checkpoint does not cast safely to {target.dtype}"
    value = node.value
    in_place = (isinstance(value, np.ndarray) and value.flags.writeable) or is_torch_tensor(value)
    fixed = [site for site in node.sites if site.child is None or site.child.slot_kind == "fixed"]
    if not in_place and fixed:
        return (
            f"the leaf is not a writable numpy array and sits in an immutable "
            f"{type(fixed[0].container).__name__}"
        )
    return None


def _write_leaf(node: Node, value: np.ndarray[Any, Any]) -> None:
    leaf = node.value
    if type(leaf) is np.ndarray and leaf.flags.writeable and leaf.shape == value.shape:
        leaf[...] = value  # _leaf_problem checked the cast; the common case, kept cheap
        return
    writes = [(site, prepare_write(site, value, "/".join(site.path))) for site in node.sites]
    for site, (in_place, prepared) in writes:
        if in_place:
            write_in_place(site.leaf, prepared)
            return  # one object, filled once, whichever path reached it
        replace_leaf(site, prepared)


def _listing(count_label: str, names: Sequence[str]) -> str:
    return f"{len(names)} {count_label}: {', '.join(repr(n) for n in names)}"


class RestoreStatus:
    """What a restore matched, with ``tf.train.Checkpoint``'s assertions over it.

    ``restored`` are the checkpoint keys written into the tree, ``missing`` the keys the
    tree's leaves would be saved under that the checkpoint lacks, ``unexpected`` the checkpoint
    keys nothing took. As in TensorFlow, a status dropped with unexpected values and without
    :meth:`expect_partial` logs them as a warning.
    """

    def __init__(
        self,
        uri: str,
        restored: Sequence[str],
        missing: Sequence[str],
        unexpected: Sequence[str],
    ) -> None:
        self.uri = uri
        self.restored = tuple(restored)
        self.missing = tuple(missing)
        self.unexpected = tuple(unexpected)
        self._quiet = [False]  # shared with the finalizer, which must not hold self
        if self.unexpected:
            weakref.finalize(self, _warn_unused, uri, self.unexpected, self._quiet)

    def _fail(self, missing: Sequence[str], unexpected: Sequence[str]) -> None:
        parts = []
        if missing:
            parts.append(_listing("Python values got no value from the checkpoint", missing))
        if unexpected:
            parts.append(_listing("checkpoint values were not used", unexpected))
        error = ObjectMatchError(
            "the checkpoint and the objects do not match: " + "; ".join(parts),
            missing=missing,
            unexpected=unexpected,
        )
        raise error.with_context(uri=self.uri)

    def assert_consumed(self) -> RestoreStatus:
        """Every Python leaf got a value and every value in the checkpoint was used."""
        if self.missing or self.unexpected:
            self._fail(self.missing, self.unexpected)
        return self

    def assert_existing_objects_matched(self) -> RestoreStatus:
        """Every Python leaf got a value; values the tree has no place for are fine."""
        if self.missing:
            self._fail(self.missing, ())
        return self

    def assert_nontrivial_match(self) -> RestoreStatus:
        """At least one value was restored (``save_counter`` counts, as in TensorFlow)."""
        if not self.restored:
            self._fail(self.missing, self.unexpected)
        return self

    def expect_partial(self) -> RestoreStatus:
        """Silence the warning about unused checkpoint values."""
        self._quiet[0] = True
        return self

    def __repr__(self) -> str:
        return (
            f"<RestoreStatus {self.uri!r}: {len(self.restored)} restored, "
            f"{len(self.missing)} missing, {len(self.unexpected)} unexpected>"
        )


def _warn_unused(uri: str, unexpected: tuple[str, ...], quiet: list[bool]) -> None:
    if not quiet[0]:
        logger.warning(
            "restore of %s left %d checkpoint value(s) unused (call expect_partial() on the "
            "status to silence this): %s",
            uri,
            len(unexpected),
            ", ".join(unexpected),
        )


async def read_object_graph(reader: CheckpointReader) -> bytes:
    """The serialized object graph of an object-based checkpoint."""
    info = reader.entries.get(OBJECT_GRAPH_KEY)
    if info is None:
        raise UnsupportedError(
            f"no {OBJECT_GRAPH_KEY} in the checkpoint: it is name-based (TF1 Saver); read it "
            "with streamckpt.load",
            uri=reader.uri,
        )
    if info.tf_dtype != DataType.DT_STRING or info.shape != ():
        raise CorruptCheckpointError(
            "the object graph is not a string scalar", uri=reader.uri, tensor=OBJECT_GRAPH_KEY
        )
    stored = (await reader.read(OBJECT_GRAPH_KEY))[()]
    return bytes(stored)


def check_keys_present(entries: Mapping[str, TensorInfo], keys: Iterable[str], *, uri: str) -> None:
    """The object graph may only name keys the bundle holds."""
    absent = [key for key in keys if key not in entries]
    if absent:
        raise CorruptCheckpointError(
            "the object graph names keys the bundle lacks: " + ", ".join(map(repr, absent)),
            uri=uri,
        )


Replicated = Literal["read", "broadcast"]


async def _read_whole(
    reader: CheckpointReader,
    keys: list[str],
    coordinator: Coordinator | None,
    replicated: Replicated,
) -> dict[str, np.ndarray[Any, Any]]:
    """Whole values: read here, or read by the primary and sent to every process."""
    if coordinator is None or replicated == "read":
        return await reader.read_many(keys)
    return await from_primary(
        coordinator, lambda: reader.read_many(keys), name="restore-values", what="read the values"
    )


async def restore_tree(
    reader: CheckpointReader,
    root: Mapping[str, Any],
    *,
    expect_counter: bool,
    coordinator: Coordinator | None = None,
    replicated: Replicated = "read",
) -> tuple[RestoreStatus, int | None]:
    """Fill ``root``'s tree from the open checkpoint; return the status and ``save_counter``.

    ``save_counter`` is None when the checkpoint has none and ``expect_counter`` is false.
    Sharded leaves (``Slice``, ``DTensor``, sharded ``jax.Array``) read only their boxes;
    whole leaves are read by every process, or with ``replicated="broadcast"`` by the
    primary only and sent to the others through ``coordinator`` (every process must then
    restore together).
    """
    if replicated not in ("read", "broadcast"):
        raise ValueError(f"replicated must be 'read' or 'broadcast', not {replicated!r}")
    graph_bytes = await read_object_graph(reader)
    graph = read_graph(graph_bytes)
    object_graph_of(graph)  # checks references, escapes and duplicate keys
    root_names = {local_name for local_name, _ in graph[0].children}
    with_counter = expect_counter or SAVE_COUNTER in root_names
    nodes = _python_graph(root, with_counter=with_counter)
    match = _match(nodes, graph)
    entries = reader.entries  # one lookup table for every leaf
    check_keys_present(entries, (key for _, key in match.bound), uri=reader.uri)
    # what each leaf must read, asked once per leaf (it tries every sharded kind in turn)
    bound = [(node, key, local_boxes(node.value)) for node, key in match.bound]
    problems = [
        (key, problem)
        for node, key, node_boxes in sorted(bound, key=lambda leaf: leaf[1])
        if (problem := _leaf_problem(node, entries[key], sharded=node_boxes is not None))
        is not None
    ]
    if problems:
        raise ValueMismatchError(
            f"{len(problems)} checkpoint values do not fit their leaves (nothing was "
            "restored): " + "; ".join(f"{key!r}: {why}" for key, why in problems),
            mismatched=[key for key, _ in problems],
            uri=reader.uri,
        )
    whole = [(node, key) for node, key, node_boxes in bound if node_boxes is None]
    values = await _read_whole(reader, [key for _, key in whole], coordinator, replicated)
    boxes = [(node, key, node_boxes) for node, key, node_boxes in bound if node_boxes is not None]
    pieces = await reader.read_boxes([(key, box) for _, key, bs in boxes for box in bs])
    counter: int | None = None
    for node, key in whole:
        if node.value is _COUNTER:
            counter = int(values[key][()])
        else:
            _write_leaf(node, values[key])
    start = 0
    for node, _, node_boxes in boxes:
        filled = fill(node.value, pieces[start : start + len(node_boxes)])
        start += len(node_boxes)
        if filled is not node.value:  # an immutable jax.Array: a new one takes its place
            for site in node.sites:
                replace_leaf(site, filled)
    status = RestoreStatus(
        reader.uri, [key for _, key in match.bound], match.missing, match.unexpected
    )
    return status, counter


async def load_nested(
    save_path: PathLike,
    *,
    storage_options: dict[str, Any] | None = None,
    filesystem: Any = None,
) -> dict[str, Any]:
    """Every value of an object-based checkpoint, as nested dicts keyed by object path.

    No Python objects are needed: this reads any ``tf.train.Checkpoint`` (Keras models and
    optimizers included). Optimizer slots sit under
    ``<optimizer>[".OPTIMIZER_SLOT"][<variable path>][<slot name>]``; see
    :func:`streamckpt.objectgraph.keys_to_nested` for the layout.
    """
    async with api.open(
        save_path, storage_options=storage_options, filesystem=filesystem
    ) as reader:
        graph = parse_object_graph(await read_object_graph(reader))
        keys = sorted(graph.checkpoint_keys)
        check_keys_present(reader.entries, keys, uri=reader.uri)
        values = await reader.read_many(keys)
    return keys_to_nested(graph, values)
