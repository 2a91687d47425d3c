"""Flat names for the leaves of nested Python trees, in the style of Swift for TensorFlow.

Swift's ``Checkpointable`` protocol names every tensor of a model by the path of properties
that leads to it (``conv1/filter``, ``layers/0/kernel``), lets a type leave some properties out
(``ignoredTensorPaths``), and maps names through a table so that one model can read a
checkpoint written with another naming scheme. This module does the same for Python trees.

Invariants:

* Trees, leaves and containers are :mod:`streamckpt.tree`'s; names follow its depth-first
  walk, one name per path (an array reached by two paths is saved under both).
* Names are built from the *model's* path first (the part ``ignored_paths`` matches), then
  passed through ``name_map`` to give the checkpoint's name. Every operation here uses that
  one direction, so a single map serves both saving and loading.
* Nothing here does I/O, and :func:`flatten` / :func:`unflatten` never copy array data.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeAlias

from streamckpt.errors import (
    NameMismatchError,
    NamingError,
    UnsupportedError,
)
from streamckpt.tree import (
    Child,
    Leaf,
    LeafSite,
    Node,
    children,
    is_leaf,
    is_namedtuple,
    is_skipped_value,
    prepare_write,
    replace_leaf,
    shape_of,
    to_numpy,
    walk,
    write_in_place,
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

NameMap: TypeAlias = Callable[[str], str]


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


def _walk_nodes(tree: Any, rules: _Rules) -> list[Node]:
    """The tree's nodes, depth first in child order, each path its own node."""
    top = children(tree, ()) if not is_leaf(tree) else None
    if top is None:
        raise UnsupportedError(f"the root of a tree must be a container, not {type(tree).__name__}")

    def children_of(node: Any, path: tuple[str, ...]) -> list[Child]:
        found = children(node, path)
        if found is None:
            raise UnsupportedError(
                f"{type(node).__name__} at {rules.path_name(path)!r} is neither "
                "a leaf nor a container; list it in ignored_paths to leave it out"
            )
        return [
            child
            for child in found
            if not is_skipped_value(child.value)
            and not rules.skips(node, child.name, (*path, child.name))
        ]

    return walk(
        tree,
        children_of(tree, ()),
        children_of=children_of,
        order="depth",
        share=False,
        with_sites=True,
    )


def _walk(tree: Any, rules: _Rules) -> Iterator[LeafSite]:
    """Every leaf of ``tree`` with its path and where it sits, depth first in child order."""
    for node in _walk_nodes(tree, rules):
        if node.is_leaf:
            yield node.sites[0]


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
        _check_shape(site, value, rules.path_name(site.path))
    values_by_path = {site.path: value for site, _, value in plan}
    return _rebuild(template, rules, values_by_path)


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
    writes = [
        (site, name, prepare_write(site, value, rules.path_name(site.path)))
        for site, name, value in plan
    ]
    for site, _, (in_place, value) in writes:
        if in_place:
            write_in_place(site.leaf, value)
        else:
            replace_leaf(site, value)
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
) -> list[tuple[LeafSite, str, Any]]:
    """Pair each template leaf with its value: (site, checkpoint name, value)."""
    plan: list[tuple[LeafSite, str, Any]] = []
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


def _check_shape(site: LeafSite, value: Any, name: str) -> None:
    expected, got = shape_of(site.leaf), shape_of(value)
    if expected is not None and got is not None and expected != got:
        raise NamingError(
            f"value for {name!r} has shape {list(got)}, the tree expects {list(expected)}",
            tensor=name,
        )


def _rebuild(template: Any, rules: _Rules, values: Mapping[tuple[str, ...], Any]) -> Any:
    """A copy of ``template`` with the leaves at the paths of ``values`` replaced.

    Containers on the way are shallow-copied (children the walk skips stay as they are);
    children are rebuilt before their parents, so the walk's depth-first order runs backwards.
    """
    nodes = _walk_nodes(template, rules)
    rebuilt: list[Any] = [None] * len(nodes)
    for node_id in range(len(nodes) - 1, -1, -1):
        node = nodes[node_id]
        if node.is_leaf:
            rebuilt[node_id] = values.get(node.path, node.value)
            continue
        slots = [
            (nodes[child_id].sites[0].child, rebuilt[child_id]) for _, child_id in node.children
        ]
        rebuilt[node_id] = _copy_with(node.value, slots)
    return rebuilt[0]


def _copy_with(container: Any, slots: Iterable[tuple[Child | None, Any]]) -> Any:
    """A shallow copy of ``container`` whose given slots hold new values."""
    if isinstance(container, tuple):
        items = list(container)
        for child, value in slots:
            assert child is not None
            items[child.slot_key] = value
        return type(container)(*items) if is_namedtuple(container) else type(container)(items)
    clone = copy.copy(container)
    for child, value in slots:
        assert child is not None
        if child.slot_kind == "item":
            clone[child.slot_key] = value
        elif child.slot_kind == "attr":
            vars(clone)[child.slot_key] = value
        else:
            object.__setattr__(clone, child.slot_key, value)
    return clone
