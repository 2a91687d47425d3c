"""Python trees of arrays: what a leaf is, what a container holds, and the one walk over them.

Flat naming (:mod:`streamckpt.naming`) and the object graph (:mod:`streamckpt.objectgraph`)
both see a tree through this module, so a leaf, a container and a child mean the same to both.

Rules:

* A tree is made of containers and leaves. Containers: ``dict`` (``str`` or ``int`` keys, in
  insertion order), ``list`` and ``tuple`` (indices; a namedtuple uses its field names),
  dataclasses (their fields) and plain objects (``vars(obj)``, names starting with ``_``
  skipped). Leaves: see :func:`is_leaf`. ``None``, functions, methods, classes, modules and
  numpy ufuncs hold no data and are skipped wherever they occur.
* :func:`walk` is the only traversal. Its ``order`` gives node ids: breadth first is
  TensorFlow's object-graph numbering, depth first is the order of flat names. With ``share``
  an object reached twice (by identity; immutable scalars never are) is one node, as in
  TensorFlow's graph; without it, every path is its own node and a cycle is an error.
* Every edge into a node can be kept as a :class:`LeafSite` (container and slot), which is
  what lets a restore write a value back where the leaf sits.
* Nothing here does I/O, and nothing copies array data except :func:`prepare_write`'s casts.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import types
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple, TypeAlias

import numpy as np

from streamckpt.errors import NamingError, UnsupportedError
from streamckpt.sharding import Slice

__all__ = [
    "Child",
    "ChildrenOf",
    "Leaf",
    "LeafSite",
    "Node",
    "children",
    "is_leaf",
    "is_namedtuple",
    "is_skipped_value",
    "prepare_write",
    "replace_leaf",
    "shape_of",
    "to_numpy",
    "walk",
    "write_in_place",
]

Leaf: TypeAlias = Any

_SCALAR_LEAF_TYPES = (bool, int, float, complex, str, bytes, np.generic)
# Immutable values are never "the same object" in a graph: two equal ints are two leaves.
_IMMUTABLE_SCALARS = _SCALAR_LEAF_TYPES
# Objects that describe code rather than hold data; a model object usually has a few
# (an activation function, a class reference) and they must not stop a walk.
_NON_DATA_TYPES = (
    type,
    types.ModuleType,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    types.BuiltinMethodType,
    functools.partial,
    np.ufunc,
)


# ---------------------------------------------------------------------------------------------
# Leaves.


def is_leaf(x: Any) -> bool:
    """Whether ``x`` is a value to save rather than a container to walk into.

    Leaves are numpy arrays and scalars, Python ``bool`` / ``int`` / ``float`` / ``complex`` /
    ``str`` / ``bytes``, anything with ``__array__`` or ``__dlpack__`` (torch, jax, tf
    tensors), and anything with both ``shape`` and ``dtype`` attributes, so that a template of
    shape descriptions (``jax.ShapeDtypeStruct``) can stand in for a model. A
    :class:`~streamckpt.sharding.Slice`, or a non-empty list of them, is one leaf: a process's
    piece(s) of one tensor.
    """
    if isinstance(x, (np.ndarray, Slice, *_SCALAR_LEAF_TYPES)):
        return True
    if isinstance(x, list) and x and all(isinstance(item, Slice) for item in x):
        return True  # one process's pieces of one tensor
    if x is None or isinstance(x, (dict, list, tuple, *_NON_DATA_TYPES)):
        return False
    kind = type(x)
    if hasattr(kind, "__array__") or hasattr(kind, "__dlpack__"):
        return True
    return hasattr(x, "shape") and hasattr(x, "dtype")


def is_skipped_value(x: Any) -> bool:
    """Whether a child holds no data at all (None, code) and is left out everywhere."""
    return x is None or isinstance(x, _NON_DATA_TYPES)


def to_numpy(x: Leaf) -> np.ndarray[Any, Any]:
    """The leaf as a numpy array, sharing memory with it wherever the leaf allows.

    Python numbers follow numpy's defaults: ``int`` becomes int64 (uint64 above its range),
    ``float`` float64 and ``bool`` bool. TensorFlow would make a float32 variable of a Python
    float; we keep float64 so that no precision is lost silently. ``str`` is encoded as UTF-8,
    and ``str`` / ``bytes`` become 0-d object arrays holding ``bytes``, the form TensorFlow's
    numpy conversion gives string tensors (an ``S`` array would drop trailing NUL bytes).
    torch tensors of dtypes numpy lacks (bfloat16, float8) are viewed bit for bit as the
    matching ``ml_dtypes`` type, without a copy for CPU tensors.
    """
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, (bool, int, float, complex, np.generic)):
        arr = np.asarray(x)
        if arr.dtype == object:
            raise UnsupportedError(f"integer {x} does not fit in 64 bits")
        return arr
    if isinstance(x, (str, bytes)):
        holder = np.empty((), dtype=object)
        holder[()] = x.encode() if isinstance(x, str) else x
        return holder
    kind = type(x)
    if kind.__module__.startswith("torch"):
        from streamckpt.frameworks import torch_to_numpy

        return torch_to_numpy(x)
    if hasattr(kind, "__dlpack__"):
        try:
            return np.from_dlpack(x)
        except (BufferError, TypeError, ValueError, RuntimeError) as exc:
            # A device tensor or a dtype numpy's DLPack import lacks (bfloat16): __array__
            # may still know how to bring it to the host.
            if not hasattr(kind, "__array__"):
                raise UnsupportedError(f"cannot view {kind.__name__} as numpy: {exc}") from exc
    if hasattr(kind, "__array__"):
        try:
            return np.asarray(x)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise UnsupportedError(f"cannot view {kind.__name__} as numpy: {exc}") from exc
    raise UnsupportedError(f"{kind.__name__} is not an array-like leaf")


def shape_of(x: Any) -> tuple[int, ...] | None:
    """A leaf's shape, or None when it has no concrete one to check against."""
    if isinstance(x, (bool, int, float, complex, str, bytes)):
        return ()
    shape = getattr(x, "shape", None)
    try:
        return None if shape is None else tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        return None  # a symbolic or partly unknown shape: nothing to check against


# ---------------------------------------------------------------------------------------------
# Containers.

# How a child sits in its container, so a restore can replace it: container[key] = value
# ("item"), vars(container)[key] = value ("attr"), setattr ("field"), or not at all ("fixed").
SlotKind = Literal["item", "attr", "field", "fixed"]


class Child(NamedTuple):
    """One child of a container: its local name, its value, and how it sits there.

    A named tuple: a walk makes one per edge, and a tuple is the cheapest record to make.
    """

    name: str
    value: Any
    slot_kind: SlotKind
    slot_key: Any


def is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and isinstance(getattr(type(x), "_fields", None), tuple)


def _is_dataclass_instance(x: Any) -> bool:
    return dataclasses.is_dataclass(x) and not isinstance(x, type)


def children(node: Any, path: tuple[str, ...]) -> list[Child] | None:
    """The children of a container in their natural order, or None for a non-container."""
    if isinstance(node, dict):
        found = []
        for key, value in node.items():
            if isinstance(key, bool) or not isinstance(key, (str, int)):
                raise UnsupportedError(
                    f"dict key {key!r} at {'/'.join(path) or 'the root'} is not a str or int"
                )
            found.append(Child(str(key), value, "item", key))
        return found
    if is_namedtuple(node):
        return [
            Child(field, value, "fixed", i)
            for i, (field, value) in enumerate(zip(type(node)._fields, node, strict=True))
        ]
    if isinstance(node, tuple):
        return [Child(str(i), value, "fixed", i) for i, value in enumerate(node)]
    if isinstance(node, list):
        return [Child(str(i), value, "item", i) for i, value in enumerate(node)]
    if _is_dataclass_instance(node):
        frozen = type(node).__dataclass_params__.frozen
        kind: SlotKind = "fixed" if frozen else "field"
        return [
            Child(field.name, getattr(node, field.name), kind, field.name)
            for field in dataclasses.fields(node)
        ]
    if hasattr(node, "__dict__"):
        return [
            Child(name, value, "attr", name)
            for name, value in vars(node).items()
            if not name.startswith("_")
        ]
    return None


# ---------------------------------------------------------------------------------------------
# The walk.


class LeafSite(NamedTuple):
    """One edge into a node: the path it was reached by, and the slot it sits in."""

    path: tuple[str, ...]
    leaf: Any
    container: Any
    child: Child | None


class Node:
    """One object of a tree, reached first by ``path``; ``children`` are (name, node id)."""

    __slots__ = ("children", "is_leaf", "path", "sites", "value")

    def __init__(self, path: tuple[str, ...], value: Any, is_leaf: bool) -> None:
        self.path = path
        self.value = value
        self.is_leaf = is_leaf
        self.children: list[tuple[str, int]] = []
        self.sites: list[LeafSite] = []  # edges into it

    def __repr__(self) -> str:
        return f"Node({self.path!r}, leaf={self.is_leaf}, children={len(self.children)})"


ChildrenOf: TypeAlias = Callable[[Any, tuple[str, ...]], list[Child]]


def walk(
    root: Any,
    top: Sequence[Child],
    *,
    children_of: ChildrenOf,
    leaf: Callable[[Any], bool] = is_leaf,
    order: Literal["breadth", "depth"],
    share: bool,
    with_sites: bool = False,
) -> list[Node]:
    """Every object under a root whose children are ``top``, as nodes; node 0 is the root.

    ``children_of(value, path)`` lists a container's children (it filters and refuses as its
    caller's rules say); a value ``leaf`` accepts is not walked into. Ids follow ``order``.
    With ``share`` an object reached again is the node it already is; without it each path
    makes its own node, and an object that contains itself raises UnsupportedError.
    ``with_sites`` records every edge into a node (a restore writes leaves through them).
    """
    nodes = [Node((), root, is_leaf=False)]
    ids_by_identity: dict[int, int] = {}
    # (node id, ids of the objects on its path): without ``share`` the ancestors find cycles
    no_ancestors: frozenset[int] = frozenset()
    pending: collections.deque[tuple[int, frozenset[int]]] = collections.deque(
        [(0, no_ancestors if share else frozenset({id(root)}))]
    )
    take = pending.popleft if order == "breadth" else pending.pop
    while pending:
        node_id, ancestors = take()
        node = nodes[node_id]
        if node.is_leaf:
            continue
        found = top if node_id == 0 else children_of(node.value, node.path)
        expanded: list[tuple[int, frozenset[int]]] = []
        for child in found:
            value = child.value
            child_path = (*node.path, child.name)
            shareable = share and not isinstance(value, _IMMUTABLE_SCALARS)
            child_id = ids_by_identity.get(id(value)) if shareable else None
            if child_id is None:
                is_child_leaf = leaf(value)
                child_id = len(nodes)
                nodes.append(Node(child_path, value, is_child_leaf))
                if shareable:
                    ids_by_identity[id(value)] = child_id
                if share or is_child_leaf:
                    expanded.append((child_id, no_ancestors))
                elif id(value) in ancestors:
                    raise UnsupportedError(f"the tree contains a cycle at {'/'.join(child_path)!r}")
                else:
                    expanded.append((child_id, ancestors | {id(value)}))
            if with_sites:
                nodes[child_id].sites.append(LeafSite(child_path, value, node.value, child))
            node.children.append((child.name, child_id))
        if order == "depth":
            expanded.reverse()  # the stack pops the first child first
        pending.extend(expanded)
    if order == "depth":
        _renumber_depth_first(nodes)
    return nodes


def _renumber_depth_first(nodes: list[Node]) -> None:
    """Reorder ``nodes`` (created as discovered) into depth-first pre-order, in place."""
    order: list[int] = []
    seen: set[int] = set()
    stack = [0]
    while stack:
        node_id = stack.pop()
        if node_id in seen:
            continue
        seen.add(node_id)
        order.append(node_id)
        stack.extend(child_id for _, child_id in reversed(nodes[node_id].children))
    if order == list(range(len(nodes))):
        return
    new_id = {old: new for new, old in enumerate(order)}
    renumbered = [nodes[old] for old in order]
    for node in renumbered:
        node.children = [(name, new_id[child_id]) for name, child_id in node.children]
    nodes[:] = renumbered


# ---------------------------------------------------------------------------------------------
# Writing values back.


def prepare_write(site: LeafSite, value: Any, name: str) -> tuple[bool, Any]:
    """(in place?, value to write) for ``value`` going into the leaf at ``site``.

    Checks shape, and that the dtype casts within its kind; ``name`` is what errors call the
    leaf. Writable numpy arrays and torch tensors are filled in place; any other leaf is
    replaced in its container by a value of its own kind, if that container lets it.
    """
    from streamckpt.frameworks import is_torch_tensor

    source = to_numpy(value)
    target = to_numpy(site.leaf)
    expected, got = shape_of(site.leaf), shape_of(source)
    if expected is not None and got is not None and expected != got:
        raise NamingError(
            f"value for {name!r} has shape {list(got)}, the tree expects {list(expected)}",
            tensor=name,
        )
    if not np.can_cast(source.dtype, target.dtype, casting="same_kind"):
        raise NamingError(
            f"value for {name!r} has dtype {source.dtype}, which does not cast to the "
            f"tree's {target.dtype}",
            tensor=name,
        )
    leaf = site.leaf
    if (isinstance(leaf, np.ndarray) and leaf.flags.writeable) or is_torch_tensor(leaf):
        return True, source
    if site.child is None or site.child.slot_kind == "fixed":
        raise NamingError(
            f"leaf {name!r} cannot be written in place and sits in an immutable "
            f"{type(site.container).__name__}; use unflatten",
            tensor=name,
        )
    if isinstance(leaf, (str, bytes)):
        text: Any = source[()]
        return False, text.decode() if isinstance(leaf, str) else bytes(text)
    if isinstance(leaf, (bool, int, float, complex)):
        return False, type(leaf)(source[()])
    if isinstance(leaf, np.generic):
        return False, source.astype(leaf.dtype)[()]
    return False, source


def write_in_place(leaf: Any, value: np.ndarray[Any, Any]) -> None:
    """Fill a writable array or a torch tensor with ``value`` (checked by prepare_write)."""
    from streamckpt.frameworks import is_torch_tensor, torch_copy_into

    if is_torch_tensor(leaf):
        torch_copy_into(leaf, value)
    else:
        leaf[...] = value


def replace_leaf(site: LeafSite, value: Any) -> None:
    """Put ``value`` where the leaf at ``site`` sits in its container."""
    child = site.child
    assert child is not None
    if child.slot_kind == "item":
        site.container[child.slot_key] = value
    elif child.slot_kind == "attr":
        vars(site.container)[child.slot_key] = value
    else:
        setattr(site.container, child.slot_key, value)
