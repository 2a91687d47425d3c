"""The README's code blocks are checked, so that what it shows works as shown.

Conventions a README block must follow:

- Every ```python block is compiled (top-level ``await`` is allowed, as in an async REPL or a
  notebook) and its spelling of the API is checked: a call of an async function of
  ``streamckpt`` (``save``, ``load``, ``read_tensor``, ``load_nested``, ``latest_checkpoint``,
  ...) is awaited, ``streamckpt.open(...)`` is entered with ``async with``, and nothing reached
  through ``streamckpt.sync`` (however it is imported) is awaited or entered with
  ``async with``. Only module-level functions are checked, not methods of objects.
- A ```python block also runs, in a fresh interpreter in an empty temporary directory, when it
  is self-contained: every name it reads is bound in the block (imports, assignments,
  definitions) or a builtin, it names no remote URL (``gs://``, ``s3://``, ``http``), and its
  first line is not ``# not run``. A top-level ``await`` in a run block runs under asyncio.
- In a ```bash block every command line that runs ``streamckpt`` must parse with the real
  command's parser (its commands and options exist), and every ``pip install`` may name only
  extras that pyproject.toml defines. A bash block whose first line is ``# run`` also runs,
  with ``bash -e`` in an empty temporary directory, this environment's ``streamckpt`` first on
  ``PATH``, and must exit 0.
- Other blocks (```text, a bare ```) are not checked.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import inspect
import io
import os
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

import streamckpt
import streamckpt.sync
from streamckpt.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
_REMOTE = re.compile(r"\b(gs|s3|gcs|https?)://")
_RUNNER = """\
import ast, asyncio, sys
source = open(sys.argv[1]).read()
code = compile(source, "README block", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
result = eval(code, {"__name__": "__main__"})
if asyncio.iscoroutine(result):
    asyncio.run(result)
"""


@dataclass(frozen=True)
class Block:
    language: str
    line: int  # of the opening fence
    text: str

    def __str__(self) -> str:
        return f"README.md:{self.line}"


def blocks(language: str) -> list[Block]:
    found = []
    lines = README.read_text().splitlines()
    number = 0
    while number < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[number])
        if fence:
            end = next(i for i in range(number + 1, len(lines)) if lines[i].startswith("```"))
            if fence.group(1) == language:
                found.append(Block(language, number + 1, "\n".join(lines[number + 1 : end])))
            number = end
        number += 1
    return found


def _compile(block: Block) -> ast.Module:
    tree = compile(
        block.text,
        str(block),
        "exec",
        flags=ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT,
    )
    assert isinstance(tree, ast.Module)
    compile(tree, str(block), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    return tree


_ASYNC = {
    name for name in streamckpt.__all__ if inspect.iscoroutinefunction(getattr(streamckpt, name))
}


def _spelling_problems(tree: ast.Module) -> list[str]:
    """Calls of the async API not awaited, and calls of the blocking API awaited."""
    async_module, sync_module = {"streamckpt"}, set()  # names bound to the two modules
    bound: dict[str, str] = {}  # a name from ``from ... import`` -> "async" / "sync"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "streamckpt.sync" and alias.asname:
                    sync_module.add(alias.asname)
                elif alias.name == "streamckpt" and alias.asname:
                    async_module.add(alias.asname)
        elif isinstance(node, ast.ImportFrom) and node.module in ("streamckpt", "streamckpt.sync"):
            for alias in node.names:
                if alias.name == "sync":
                    sync_module.add(alias.asname or alias.name)
                elif node.module == "streamckpt.sync":
                    bound[alias.asname or alias.name] = f"sync.{alias.name}"
                else:
                    bound[alias.asname or alias.name] = f"async.{alias.name}"

    def target(func: ast.expr) -> str | None:
        if isinstance(func, ast.Name):
            return bound.get(func.id)
        if isinstance(func, ast.Attribute):
            owner = func.value
            if isinstance(owner, ast.Name) and owner.id in sync_module:
                return f"sync.{func.attr}"
            if isinstance(owner, ast.Name) and owner.id in async_module:
                return f"async.{func.attr}"
            if (
                isinstance(owner, ast.Attribute)
                and owner.attr == "sync"
                and isinstance(owner.value, ast.Name)
                and owner.value.id in async_module
            ):
                return f"sync.{func.attr}"
        return None

    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    problems = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or (called := target(node.func)) is None:
            continue
        kind, name = called.split(".", 1)
        parent = parents.get(node)
        awaited = isinstance(parent, ast.Await)
        async_with = isinstance(parent, ast.withitem) and isinstance(
            parents.get(parent), ast.AsyncWith
        )
        where = f"line {node.lineno}: {ast.unparse(node)[:60]}"
        if kind == "async" and name == "open" and not async_with:
            problems.append(f"{where}: streamckpt.open is entered with `async with`")
        elif kind == "async" and name in _ASYNC and not awaited:
            problems.append(f"{where}: streamckpt.{name} is async and must be awaited")
        elif kind == "sync" and (awaited or async_with):
            problems.append(f"{where}: streamckpt.sync.{name} blocks; it is not awaited")
    return problems


def _free_names(tree: ast.Module) -> set[str]:
    bound: set[str] = set()
    loaded: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (loaded if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    return loaded - bound - set(dir(builtins))


def _runs(block: Block, tree: ast.Module) -> bool:
    first = block.text.lstrip().splitlines()[0] if block.text.strip() else ""
    return first.strip() != "# not run" and not _REMOTE.search(block.text) and not _free_names(tree)


def _environment() -> dict[str, str]:
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path}


@pytest.mark.parametrize("block", blocks("python"), ids=str)
def test_python_block(block: Block, tmp_path: Path) -> None:
    tree = _compile(block)
    assert not _spelling_problems(tree), _spelling_problems(tree)
    if not _runs(block, tree):
        return
    (tmp_path / "block.py").write_text(block.text)
    (tmp_path / "runner.py").write_text(_RUNNER)
    result = subprocess.run(
        [sys.executable, "runner.py", "block.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def _commands(text: str) -> list[list[str]]:
    """Each simple command of a bash block, as words (up to a redirection)."""
    commands = []
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        words = shlex.split(line, comments=True)
        current: list[str] = []
        for word in [*words, "&&"]:
            if word in ("&&", "||", ";", "|"):
                if current:
                    commands.append(current)
                current = []
            elif not (current and current[-1] in (">", ">>", "<")):
                current.append(word)
        commands = [[w for w in c if w not in (">", ">>", "<")] for c in commands]
    return commands


def _extras() -> set[str]:
    document = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return set(document["project"]["optional-dependencies"])


@pytest.mark.parametrize("block", blocks("bash"), ids=str)
def test_bash_block(block: Block, tmp_path: Path) -> None:
    for words in _commands(block.text):
        if Path(words[0]).name == "streamckpt":
            with (
                contextlib.redirect_stdout(io.StringIO()),
                contextlib.redirect_stderr(io.StringIO()) as errors,
            ):
                try:
                    build_parser().parse_args(words[1:])
                except SystemExit as stop:  # --help / --version exit 0
                    assert stop.code == 0, f"{block}: {shlex.join(words)}: {errors.getvalue()}"
        if "pip" in Path(words[0]).name and "install" in words:
            for word in words:
                for extras in re.findall(r"\[([\w,-]+)\]", word):
                    unknown = set(extras.split(",")) - _extras()
                    assert not unknown, f"{block}: no such extra {unknown}"
    if block.text.splitlines()[0].strip() != "# run":
        return
    result = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", block.text],
        cwd=tmp_path,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, f"{block}:\n{result.stdout}\n{result.stderr}"


def test_blocks_are_found() -> None:
    assert blocks("python") and blocks("bash")
    assert any(b.text.startswith("# run") for b in blocks("bash"))


def test_the_spelling_check_catches_a_missing_await() -> None:
    wrong = Block("python", 0, "import streamckpt\nx = streamckpt.load_nested(path)\n")
    assert _spelling_problems(_compile(wrong))
    also_wrong = Block("python", 0, "import streamckpt.sync as sc\nawait sc.load(p)\n")
    assert _spelling_problems(_compile(also_wrong))
    right = Block(
        "python",
        0,
        "import streamckpt\nimport streamckpt.sync\n"
        "x = await streamckpt.load_nested(p)\ny = streamckpt.sync.load(p)\n"
        "async with streamckpt.open(p) as r:\n    pass\n",
    )
    assert not _spelling_problems(_compile(right))
