"""The names of TensorFlow's object-based checkpoints: local names escaped, keys built from paths.

Escaping turns ``.`` into ``..`` and then ``/`` into ``.S``, so that a path of local names
joins with ``/`` and splits back unambiguously.
"""

from __future__ import annotations

from collections.abc import Sequence

from streamckpt.errors import CorruptCheckpointError

__all__ = [
    "ATTRIBUTES",
    "OBJECT_GRAPH_KEY",
    "OPTIMIZER_SLOT",
    "SAVE_COUNTER",
    "VARIABLE_VALUE",
    "checkpoint_key",
    "escape_local_name",
    "object_path_key",
    "unescape_local_name",
]

OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
ATTRIBUTES = ".ATTRIBUTES"
OPTIMIZER_SLOT = ".OPTIMIZER_SLOT"
VARIABLE_VALUE = "VARIABLE_VALUE"
SAVE_COUNTER = "save_counter"


def escape_local_name(name: str) -> str:
    """Make a local name safe to join with ``/``: ``a/b.c`` becomes ``a.Sb..c``."""
    return name.replace(".", "..").replace("/", ".S")


def unescape_local_name(escaped: str) -> str:
    """Undo :func:`escape_local_name`; a ``.`` not followed by ``.`` or ``S`` is corrupt."""
    out: list[str] = []
    pos = 0
    while True:
        dot = escaped.find(".", pos)
        if dot < 0:
            out.append(escaped[pos:])
            return "".join(out)
        out.append(escaped[pos:dot])
        follower = escaped[dot + 1 : dot + 2]
        if follower == ".":
            out.append(".")
        elif follower == "S":
            out.append("/")
        else:
            raise CorruptCheckpointError(f"bad escape in local name {escaped!r}")
        pos = dot + 2


def object_path_key(path: Sequence[str]) -> str:
    """The key prefix of the object at ``path`` (a sequence of unescaped local names)."""
    return "/".join(escape_local_name(name) for name in path)


def checkpoint_key(path: Sequence[str], attribute: str = VARIABLE_VALUE) -> str:
    """The bundle key of one attribute of the object at ``path``."""
    return f"{object_path_key(path)}/{ATTRIBUTES}/{escape_local_name(attribute)}"
