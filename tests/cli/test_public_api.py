"""The command line is a client of the public API, like any user's script.

The package version of ``tests/system/test_architecture.py::test_the_cli_uses_only_public_api``:
every module of ``streamckpt/cli/`` imports from ``streamckpt`` only the public modules
(``streamckpt``, ``streamckpt.sync``, ``streamckpt.errors``: names in their ``__all__``) and
its own package, and touches no ``_private`` attribute.
"""

from __future__ import annotations

import ast
from pathlib import Path

import streamckpt
import streamckpt.errors
import streamckpt.sync

CLI = Path(streamckpt.__file__).parent / "cli"
PUBLIC = {
    "streamckpt": set(streamckpt.__all__) | {"sync", "errors"},
    "streamckpt.sync": set(streamckpt.sync.__all__),
    "streamckpt.errors": set(streamckpt.errors.__all__),
}


def test_every_cli_module_uses_only_public_api() -> None:
    offences = []
    modules = sorted(CLI.glob("*.py"))
    assert len(modules) > 3
    for path in modules:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{path.name}: relative import"
                module = node.module or ""
                names = {alias.name for alias in node.names}
            elif isinstance(node, ast.Import):
                offences.extend(
                    f"{path.name}: import {alias.name}"
                    for alias in node.names
                    if alias.name.startswith("streamckpt")
                    and not alias.name.startswith("streamckpt.cli")
                    and alias.name not in PUBLIC
                )
                continue
            else:
                if (
                    isinstance(node, ast.Attribute)
                    and node.attr.startswith("_")
                    and not node.attr.startswith("__")
                ):
                    offences.append(f"{path.name}:{node.lineno}: .{node.attr}")
                continue
            if not module.startswith("streamckpt") or module.startswith("streamckpt.cli"):
                continue
            if module not in PUBLIC:
                offences.append(f"{path.name}: from {module} import {names}")
            elif not names <= PUBLIC[module]:
                offences.append(f"{path.name}: from {module} import {names - PUBLIC[module]}")
    assert offences == []
