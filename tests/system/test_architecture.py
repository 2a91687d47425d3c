"""The layering rules of the package, checked on its source (see design.md and style.md)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import streamckpt
import streamckpt.errors
import streamckpt.sync

PACKAGE = Path(streamckpt.__file__).parent


def _modules() -> Iterator[tuple[str, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        if "proto" in relative.parts:
            continue
        name = ".".join(relative.parts).removesuffix(".__init__")
        yield name, ast.parse(path.read_text(), str(path))


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node, except those under ``if TYPE_CHECKING:`` (never imported at run time)."""
    pending = [tree]
    while pending:
        node = pending.pop()
        yield node
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
            pending.extend(node.orelse)
            continue
        pending.extend(ast.iter_child_nodes(node))


def _imports(tree: ast.Module, module: str) -> Iterator[tuple[str, list[str]]]:
    """(imported module, names) for every import anywhere in the module, functions included."""
    package = module if module.count(".") == 0 else module.rsplit(".", 1)[0]
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            yield base, [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []


def test_no_module_imports_another_modules_private_names() -> None:
    offences = []
    for module, tree in _modules():
        for imported, names in _imports(tree, module):
            if not imported.startswith("streamckpt"):
                continue
            for name in names:
                if name.startswith("_") and not name.startswith("__"):
                    offences.append(f"{module} imports {imported}.{name}")
    assert offences == []


def test_no_import_cycles() -> None:
    """Imports inside functions count too: they hid the old checkpoint <-> sync cycle."""
    known = {name for name, _ in _modules()}
    graph: dict[str, set[str]] = {}
    for module, tree in _modules():
        targets = set()
        for imported, names in _imports(tree, module):
            candidates = [f"{imported}.{n}" for n in names] + [imported]
            for candidate in candidates:
                if candidate in known and candidate != module:
                    targets.add(candidate)
                    break
        # a package's own submodules importing each other through it is not a cycle
        graph[module] = {t for t in targets if not module.startswith(t + ".")}
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                cycles.append([*stack[stack.index(target) :], target])
            elif target not in state:
                visit(target, [*stack, target])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_cli_uses_only_public_api() -> None:
    public = {
        "streamckpt": set(streamckpt.__all__),
        "streamckpt.sync": set(streamckpt.sync.__all__),
        "streamckpt.errors": set(streamckpt.errors.__all__),
    }
    modules = sorted((PACKAGE / "cli").glob("*.py"))
    assert modules
    for path in modules:
        tree = ast.parse(path.read_text())
        for imported, names in _imports(tree, f"streamckpt.cli.{path.stem}"):
            if not imported.startswith("streamckpt") or imported.startswith("streamckpt.cli"):
                continue
            assert imported in public, (path.name, imported)
            assert set(names) <= public[imported] | {"sync", "errors"}, (path.name, names)
        private_attributes = [
            node.attr
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ]
        assert private_attributes == [], path.name
