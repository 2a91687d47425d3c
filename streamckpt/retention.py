"""Which checkpoints a manager keeps, preserves or deletes: pure decisions, no I/O.

Rules:

* TensorFlow's sweep: the newest ``max_to_keep`` stay listed; each older one, oldest first, is
  preserved for ever (dropped from the list, never deleted) when it is at least
  ``keep_checkpoint_every_n_hours`` newer than the last preserved one, else deleted.
* The ``keep_best`` best by a metric stay listed and are never deleted.
* A path from a state file is only used (restored, deleted) when it names a checkpoint inside
  the manager's own directory (:func:`is_contained`): a state file that lists ``../victim/x``
  or an absolute path elsewhere cannot make the manager touch files outside its directory.
"""

from __future__ import annotations

import math
import os
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "ManagedEntry",
    "RetentionPlan",
    "basename",
    "best_paths",
    "is_absolute",
    "is_contained",
    "join_user",
    "plan_retention",
]


@dataclass(frozen=True, slots=True)
class ManagedEntry:
    """One checkpoint in the manager's active set; ``path`` as spelled in the state file."""

    path: str
    timestamp: float
    metrics: Mapping[str, float] | None = None


@dataclass(frozen=True, slots=True)
class RetentionPlan:
    """What a sweep does: paths to keep listed (oldest first), preserve unlisted, delete."""

    kept: tuple[ManagedEntry, ...]
    preserved: tuple[str, ...]
    deleted: tuple[str, ...]
    last_preserved_timestamp: float


def best_paths(
    entries: Sequence[ManagedEntry],
    *,
    best_metric: str | None,
    mode: Literal["min", "max"],
    keep_best: int,
) -> set[str]:
    """The ``keep_best`` best entries by ``best_metric``; ties go to the newer, NaN never ranks."""
    if best_metric is None:
        return set()
    ranked: list[tuple[float, int, str]] = []
    for order, entry in enumerate(entries):
        value = (entry.metrics or {}).get(best_metric)
        if value is None or math.isnan(value):
            continue
        ranked.append((value if mode == "min" else -value, -order, entry.path))
    ranked.sort()
    return {path for _, _, path in ranked[:keep_best]}


def plan_retention(
    entries: Sequence[ManagedEntry],
    *,
    max_to_keep: int | None,
    keep_checkpoint_every_n_hours: float | None,
    last_preserved_timestamp: float,
    protected: set[str],
) -> RetentionPlan:
    """TensorFlow's sweep, with ``protected`` paths (the best ones) kept in the list."""
    if not max_to_keep:
        return RetentionPlan(tuple(entries), (), (), last_preserved_timestamp)
    recent = {e.path for e in entries[-max_to_keep:]}
    kept: list[ManagedEntry] = []
    preserved: list[str] = []
    deleted: list[str] = []
    for entry in entries:
        if entry.path in recent or entry.path in protected:
            kept.append(entry)
        elif keep_checkpoint_every_n_hours and (
            entry.timestamp - keep_checkpoint_every_n_hours * 3600.0 >= last_preserved_timestamp
        ):
            last_preserved_timestamp = entry.timestamp
            preserved.append(entry.path)
        else:
            deleted.append(entry.path)
    return RetentionPlan(tuple(kept), tuple(preserved), tuple(deleted), last_preserved_timestamp)


def is_absolute(path: str) -> bool:
    return "://" in path or path.startswith("/") or posixpath.isabs(path.replace("\\", "/"))


def basename(path: str) -> str:
    return path.replace("\\", "/").rsplit("/", 1)[-1]


def join_user(directory: str, path: str, *, urls: bool) -> str:
    """A state-file path as the caller spells paths: relative ones joined to the directory."""
    if is_absolute(path):
        return path
    if urls:
        return directory.rstrip("/") + "/" + path
    return os.path.join(directory, path)


def is_contained(directory: str, path: str) -> bool:
    """Whether the store path ``path`` names a file directly inside the store path ``directory``.

    Both are normalised first, so ``dir/../victim/x`` and ``/elsewhere/x`` are outside.
    """
    name = basename(path)
    if name in ("", ".", ".."):
        return False
    return posixpath.normpath(posixpath.dirname(path)) == posixpath.normpath(directory)
