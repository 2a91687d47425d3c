"""Flat names for the leaves of nested Python trees, in the style of Swift for TensorFlow.

Swift's ``Checkpointable`` protocol names every tensor of a model by the path of properties
that leads to it (``conv1/filter``, ``layers/0/kernel``), lets a type leave some properties out
(``ignoredTensorPaths``), and maps names through a table so that one model can read a
checkpoint written with another naming scheme. This module does the same for Python trees.

Invariants:

* A tree is made of containers and leaves. Containers: ``dict`` (``str`` or ``int`` keys, in
  insertion order), ``list`` and ``tuple`` (indices; a namedtuple uses its field names),
  dataclasses (their fields) and plain objects (``vars(obj)``, names starting with ``_``
  skipped). Leaves: see :func:`is_leaf`. ``None``, functions, methods, classes, modules and
  numpy ufuncs hold no data and are skipped wherever they occur.
* Names are built from the *model's* path first (the part ``ignored_paths`` matches), then
  passed through ``name_map`` to give the checkpoint's name. Every operation here uses that
  one direction, so a single map serves both saving and loading.
* Nothing here does I/O, and :func:`flatten` / :func:`unflatten` never copy array data.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Literal, TypeAlias

import numpy as np

from streamckpt.errors import (
    NameMismatchError,
    NamingError,
    UnsupportedError,
)

__all__ = [
    "LookupMap",
    "NameMap",
    "assign_into",
    "flatten",
    "identity_map",
    "is_leaf",
    "lookup_map",
    "to_numpy",
    "unflatten",
]

Leaf: TypeAlias = Any
NameMap: TypeAlias = Callable[[str], str]

_SCALAR_LEAF_TYPES = (bool, int, float, complex, str, bytes, np.generic)
# Objects that describe code rather than hold data; a model object usually has a few
# (an activation function, a class reference) and they must not stop flattening.
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


def identity_map(name: str) -> str:
    """The name map of a checkpoint written by the same model that reads it."""
    return name


@dataclasses.dataclass(frozen=True, slots=True)
class LookupMap:
    """A name map given as a table from model names to checkpoint names.

    An unknown name is an error unless ``default`` is given: a renamed model should fail
    loudly rather than silently leave a layer at its initial values.
    """

    table: Mapping[str, str]
    default: NameMap | None = None

    def __call__(self, name: str) -> str:
        mapped = self.table.get(name)
        if mapped is not None:
            return mapped
        if self.default is not None:
            return self.default(name)
        raise NameMismatchError(f"the name table has no entry for {name!r}", unmapped=(name,))


def lookup_map(table: Mapping[str, str], *, default: NameMap | None = None) -> LookupMap:
    """A name map reading ``table``; pass ``default=identity_map`` to let other names through."""
    return LookupMap(dict(table), default)


def is_leaf(x: Any) -> bool:
    """Whether ``x`` is a value to save rather than a container to walk into.

    Leaves are numpy arrays and scalars, Python ``bool`` / ``int`` / ``float`` / ``complex`` /
    ``str`` / ``bytes``, anything with ``__array__`` or ``__dlpack__`` (torch, jax, tf
    tensors), and anything with both ``shape`` and ``dtype`` attributes, so that a template of
    shape descriptions (``jax.ShapeDtypeStruct``) can stand in for a model in :func:`unflatten`.
    """
    if isinstance(x, (np.ndarray, *_SCALAR_LEAF_TYPES)):
        return True
    if x is None or isinstance(x, (dict, list, tuple, *_NON_DATA_TYPES)):
        return False
    kind = type(x)
    if hasattr(kind, "__array__") or hasattr(kind, "__dlpack__"):
        return True
    return hasattr(x, "shape") and hasattr(x, "dtype")


def to_numpy(x: Leaf) -> np.ndarray[Any, Any]:
    """The leaf as a numpy array, sharing memory with it wherever the leaf allows.

    Python numbers follow numpy's defaults: ``int`` becomes int64 (uint64 above its range),
    ``float`` float64 and ``bool`` bool. TensorFlow would make a float32 variable of a Python
    float; we keep float64 so that no precision is lost silently. ``str`` is encoded as UTF-8,
    and ``str`` / ``bytes`` become 0-d object arrays holding ``bytes``, the form TensorFlow's
    numpy conversion gives string tensors (an ``S`` array would drop trailing NUL bytes).
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
    if hasattr(kind, "__dlpack__"):
        try:
            return np.from_dlpack(x)
        except (BufferError, TypeError, ValueError, RuntimeError) as exc:
            # A device tensor or a dtype numpy's DLPack import lacks (bfloat16): __array__
            # may still know how to bring it to the host.
            if not hasattr(kind, "__array__"):
                raise UnsupportedError(f"cannot view {kind.__name__} as numpy: {exc}") from exc
    if hasattr(kind, "__array__"):
        return np.asarray(x)
    raise UnsupportedError(f"{kind.__name__} is not an array-like leaf")


# ---------------------------------------------------------------------------------------------
# Walking a tree.


@dataclasses.dataclass(frozen=True, slots=True)
class _Rules:
    separator: str
    ignored: frozenset[str]

    def path_name(self, path: tuple[str, ...]) -> str:
        return self.separator.join(path)

    def skips(self, container: Any, child: str, path: tuple[str, ...]) -> bool:
        if self.path_name(path) in self.ignored:
            return True
        kind = type(container)
        return (
            f"{kind.__name__}.{child}" in self.ignored
            or f"{kind.__qualname__}.{child}" in self.ignored
        )


# How a child sits in its container, so assign_into can replace it: container[key] = value
# ("item"), vars(container)[key] = value ("attr"), setattr ("field"), or not at all ("fixed").
_SlotKind = Literal["item", "attr", "field", "fixed"]


@dataclasses.dataclass(frozen=True, slots=True)
class _Child:
    name: str
    value: Any
    slot_kind: _SlotKind
    slot_key: Any


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and isinstance(getattr(type(x), "_fields", None), tuple)


def _is_dataclass_instance(x: Any) -> bool:
    return dataclasses.is_dataclass(x) and not isinstance(x, type)


def _children(node: Any, path: tuple[str, ...]) -> list[_Child] | None:
    """The children of a container in their natural order, or None for a non-container."""
    if isinstance(node, dict):
        children = []
        for key, value in node.items():
            if isinstance(key, bool) or not isinstance(key, (str, int)):
                raise UnsupportedError(
                    f"dict key {key!r} at {'/'.join(path) or 'the root'} is not a str or int"
                )
            children.append(_Child(str(key), value, "item", key))
        return children
    if _is_namedtuple(node):
        return [
            _Child(field, value, "fixed", i)
            for i, (field, value) in enumerate(zip(type(node)._fields, node, strict=True))
        ]
    if isinstance(node, tuple):
        return [_Child(str(i), value, "fixed", i) for i, value in enumerate(node)]
    if isinstance(node, list):
        return [_Child(str(i), value, "item", i) for i, value in enumerate(node)]
    if _is_dataclass_instance(node):
        frozen = type(node).__dataclass_params__.frozen
        kind: _SlotKind = "fixed" if frozen else "field"
        return [
            _Child(field.name, getattr(node, field.name), kind, field.name)
            for field in dataclasses.fields(node)
        ]
    if hasattr(node, "__dict__"):
        return [
            _Child(name, value, "attr", name)
            for name, value in vars(node).items()
            if not name.startswith("_")
        ]
    return None


def _is_skipped_value(x: Any) -> bool:
    return x is None or isinstance(x, _NON_DATA_TYPES)


@dataclasses.dataclass(frozen=True, slots=True)
class _LeafSite:
    path: tuple[str, ...]
    leaf: Any
    container: Any
    child: _Child | None


def _walk(tree: Any, rules: _Rules) -> Iterator[_LeafSite]:
    """Every leaf of ``tree`` with its path and where it sits, depth first in child order."""
    if is_leaf(tree) or _children(tree, ()) is None:
        raise UnsupportedError(f"the root of a tree must be a container, not {type(tree).__name__}")
    yield from _walk_container(tree, (), rules, set())


def _walk_container(
    node: Any, path: tuple[str, ...], rules: _Rules, active: set[int]
) -> Iterator[_LeafSite]:
    if id(node) in active:
        raise UnsupportedError(f"the tree contains a cycle at {rules.path_name(path)!r}")
    children = _children(node, path)
    assert children is not None
    active.add(id(node))
    for child in children:
        child_path = (*path, child.name)
        if _is_skipped_value(child.value) or rules.skips(node, child.name, child_path):
            continue
        if is_leaf(child.value):
            yield _LeafSite(child_path, child.value, node, child)
        elif _children(child.value, child_path) is not None:
            yield from _walk_container(child.value, child_path, rules, active)
        else:
            raise UnsupportedError(
                f"{type(child.value).__name__} at {rules.path_name(child_path)!r} is neither "
                "a leaf nor a container; list it in ignored_paths to leave it out"
            )
    active.discard(id(node))


def _rules(separator: str, ignored_paths: Iterable[str]) -> _Rules:
    if not separator:
        raise ValueError("the separator must not be empty")
    if isinstance(ignored_paths, str):
        raise TypeError("ignored_paths takes a collection of strings, not one string")
    return _Rules(separator, frozenset(ignored_paths))


# ---------------------------------------------------------------------------------------------
# Public operations.


def flatten(
    tree: Any,
    *,
    separator: str = "/",
    ignored_paths: Iterable[str] = (),
    name_map: NameMap | None = None,
) -> dict[str, Leaf]:
    """Map each leaf's name to the leaf itself (not a copy), in depth-first child order.

    ``ignored_paths`` holds model paths (``"encoder/cache"``, joined with ``separator``) whose
    whole subtree is left out, and ``"TypeName.attr"`` entries that leave out ``attr`` of every
    object whose type is called ``TypeName``. Two leaves that end up with one name raise
    :class:`NamingError`; names the map does not know raise one :class:`NameMismatchError`
    listing them all.
    """
    rules = _rules(separator, ignored_paths)
    mapping = name_map or identity_map
    flat: dict[str, Leaf] = {}
    owners: dict[str, str] = {}
    unmapped: list[str] = []
    for site in _walk(tree, rules):
        model_name = rules.path_name(site.path)
        try:
            name = mapping(model_name)
        except KeyError:
            unmapped.append(model_name)
            continue
        if name in owners:
            raise NamingError(
                f"leaves {owners[name]!r} and {model_name!r} both get the name {name!r}",
                tensor=name,
            )
        owners[name] = model_name
        flat[name] = site.leaf
    if unmapped:
        raise NameMismatchError(_mismatch_message((), (), unmapped), unmapped=unmapped)
    return flat


def unflatten(
    flat: Mapping[str, Any],
    template: Any,
    *,
    separator: str = "/",
    ignored_paths: Iterable[str] = (),
    name_map: NameMap | None = None,
    strict: bool = True,
) -> Any:
    """A new tree shaped like ``template`` whose leaves are the values ``flat`` holds for them.

    ``template`` is not changed; containers are shallow-copied and the values of ``flat`` are
    placed as they are. A value whose shape differs from its template leaf's raises
    :class:`NamingError`. With ``strict`` every template leaf must find a value and every value
    must be used, else one :class:`NameMismatchError` lists all missing, unexpected and
    unmapped names; without it, leaves that find no value keep the template's.
    """
    rules = _rules(separator, ignored_paths)
    plan = _match(flat, template, rules, name_map or identity_map, strict=strict)
    for site, _, value in plan:
        _check_shape(site, value, rules)
    values_by_path = {site.path: value for site, _, value in plan}
    return _rebuild(template, (), rules, values_by_path)


def assign_into(
    template: Any,
    flat: Mapping[str, Any],
    *,
    separator: str = "/",
    ignored_paths: Iterable[str] = (),
    name_map: NameMap | None = None,
    strict: bool = True,
) -> list[str]:
    """Write the values of ``flat`` into the leaves of ``template``; return the names used.

    Writable numpy arrays are filled in place (``arr[...] = value``), so views held elsewhere
    (an optimizer, a jitted function's buffers) see the new values. Any other leaf is replaced
    in its container: Python and numpy scalars by a scalar of their own type, other leaves
    (framework tensors, read-only arrays) by the numpy value. Every name, shape and dtype is
    checked before anything is written, so a failed call leaves ``template`` untouched. A dtype
    must cast to the leaf's dtype within its kind (float64 into float32 is fine, float into int
    is not).
    """
    rules = _rules(separator, ignored_paths)
    plan = _match(flat, template, rules, name_map or identity_map, strict=strict)
    writes = [(site, name, _prepare_write(site, value, rules)) for site, name, value in plan]
    for site, _, (in_place, value) in writes:
        if in_place:
            site.leaf[...] = value
        else:
            _replace(site, value)
    return [name for _, name, _ in writes]


# ---------------------------------------------------------------------------------------------
# Matching names, checking values, rebuilding.


def _mismatch_message(
    missing: Iterable[str], unexpected: Iterable[str], unmapped: Iterable[str]
) -> str:
    parts = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("unmapped", unmapped)):
        listed = list(names)
        if listed:
            parts.append(f"{len(listed)} {label}: {', '.join(repr(n) for n in listed)}")
    return "names do not match the tree: " + "; ".join(parts)


def _match(
    flat: Mapping[str, Any],
    template: Any,
    rules: _Rules,
    mapping: NameMap,
    *,
    strict: bool,
) -> list[tuple[_LeafSite, str, Any]]:
    """Pair each template leaf with its value: (site, checkpoint name, value)."""
    plan: list[tuple[_LeafSite, str, Any]] = []
    missing: list[str] = []
    unmapped: list[str] = []
    used: set[str] = set()
    for site in _walk(template, rules):
        model_name = rules.path_name(site.path)
        try:
            name = mapping(model_name)
        except KeyError:
            unmapped.append(model_name)
            continue
        if name in used:
            raise NamingError(f"two leaves of the template map to {name!r}", tensor=name)
        if name not in flat:
            missing.append(name)
            continue
        used.add(name)
        plan.append((site, name, flat[name]))
    unexpected = [name for name in flat if name not in used] if strict else []
    if strict and (missing or unexpected or unmapped):
        raise NameMismatchError(
            _mismatch_message(missing, unexpected, unmapped),
            missing=missing,
            unexpected=unexpected,
            unmapped=unmapped,
        )
    return plan


def _shape_of(x: Any) -> tuple[int, ...] | None:
    if isinstance(x, (bool, int, float, complex, str, bytes)):
        return ()
    shape = getattr(x, "shape", None)
    try:
        return None if shape is None else tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        return None  # a symbolic or partly unknown shape: nothing to check against


def _check_shape(site: _LeafSite, value: Any, rules: _Rules) -> None:
    expected, got = _shape_of(site.leaf), _shape_of(value)
    if expected is not None and got is not None and expected != got:
        name = rules.path_name(site.path)
        raise NamingError(
            f"value for {name!r} has shape {list(got)}, the tree expects {list(expected)}",
            tensor=name,
        )


def _prepare_write(site: _LeafSite, value: Any, rules: _Rules) -> tuple[bool, Any]:
    """(in place?, value to write), after checking shape and dtype against the leaf."""
    name = rules.path_name(site.path)
    source = to_numpy(value)
    target = to_numpy(site.leaf)
    _check_shape(site, source, rules)
    if not np.can_cast(source.dtype, target.dtype, casting="same_kind"):
        raise NamingError(
            f"value for {name!r} has dtype {source.dtype}, which does not cast to the "
            f"tree's {target.dtype}",
            tensor=name,
        )
    leaf = site.leaf
    if isinstance(leaf, np.ndarray) and leaf.flags.writeable:
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


def _replace(site: _LeafSite, value: Any) -> None:
    child = site.child
    assert child is not None
    if child.slot_kind == "item":
        site.container[child.slot_key] = value
    elif child.slot_kind == "attr":
        vars(site.container)[child.slot_key] = value
    else:
        setattr(site.container, child.slot_key, value)


def _rebuild(
    node: Any, path: tuple[str, ...], rules: _Rules, values: Mapping[tuple[str, ...], Any]
) -> Any:
    children = _children(node, path)
    assert children is not None
    replaced: list[tuple[_Child, Any]] = []
    for child in children:
        child_path = (*path, child.name)
        if _is_skipped_value(child.value) or rules.skips(node, child.name, child_path):
            replaced.append((child, child.value))
        elif is_leaf(child.value):
            replaced.append((child, values.get(child_path, child.value)))
        else:
            replaced.append((child, _rebuild(child.value, child_path, rules, values)))
    if isinstance(node, tuple):
        items = [value for _, value in replaced]
        return type(node)(*items) if _is_namedtuple(node) else type(node)(items)
    clone = copy.copy(node)
    for child, value in replaced:
        if child.slot_kind == "item":
            clone[child.slot_key] = value
        elif child.slot_kind == "attr":
            vars(clone)[child.slot_key] = value
        else:
            object.__setattr__(clone, child.slot_key, value)
    return clone
