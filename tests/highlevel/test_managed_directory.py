"""ManagedDirectory: the manager's files and the view read from them never drift apart.

A real local directory; a failing write is injected by wrapping the real store's method.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from streamckpt.errors import StorageError
from streamckpt.manager._directory import ManagedDirectory
from streamckpt.retention import ManagedEntry

pytestmark = pytest.mark.anyio

ENTRIES = [ManagedEntry("ckpt-1", 100.0, {"loss": 2.0}), ManagedEntry("ckpt-2", 200.0, None)]


def clock() -> float:
    return 1000.0


async def test_what_is_published_is_what_a_fresh_reader_sees(tmp_path: Path) -> None:
    first = ManagedDirectory(tmp_path)
    await first.reload(clock)
    assert (first.entries, first.latest) == ([], None)
    await first.publish(
        ENTRIES, metrics_of=ENTRIES, last_preserved_timestamp=50.0, best=("loss", "min", 1)
    )
    assert (first.entries, first.latest, first.last_preserved) == (ENTRIES, "ckpt-2", 50.0)
    second = ManagedDirectory(tmp_path)
    await second.reload(clock)
    assert (second.entries, second.latest, second.last_preserved) == (ENTRIES, "ckpt-2", 50.0)


async def test_a_failed_publication_leaves_the_view_and_the_files_as_they_were(
    tmp_path: Path,
) -> None:
    directory = ManagedDirectory(tmp_path)
    await directory.reload(clock)
    await directory.publish(
        ENTRIES[:1], metrics_of=ENTRIES[:1], last_preserved_timestamp=50.0, best=None
    )
    state_before = (tmp_path / "checkpoint").read_bytes()
    real = directory.store.write_atomic

    async def failing(path: str, data: bytes, **kwargs: Any) -> None:
        if path == directory.state_path:
            raise StorageError("injected: the state file cannot be written")
        await real(path, data, **kwargs)

    directory.store.write_atomic = failing  # type: ignore[method-assign]
    with pytest.raises(StorageError, match="injected"):
        await directory.publish(
            ENTRIES, metrics_of=ENTRIES, last_preserved_timestamp=60.0, best=None
        )
    assert (directory.entries, directory.latest, directory.last_preserved) == (
        ENTRIES[:1],
        "ckpt-1",
        50.0,
    )
    assert (tmp_path / "checkpoint").read_bytes() == state_before


async def test_deletions_are_recorded_before_and_finished_after(tmp_path: Path) -> None:
    """What is marked survives in its own file until deleted (a sweep cut short resumes)."""
    directory = ManagedDirectory(tmp_path)
    await directory.reload(clock)
    for name in ("ckpt-1", "ckpt-2"):
        (tmp_path / f"{name}.index").write_bytes(b"x")
        (tmp_path / f"{name}.data-00000-of-00001").write_bytes(b"y")
    await directory.mark_deleting(["ckpt-1"])
    again = ManagedDirectory(tmp_path)
    await again.reload(clock)
    assert again.deleting == ["ckpt-1"]
    await directory.finish_deleting()
    assert sorted(os.listdir(tmp_path)) == [
        "ckpt-2.data-00000-of-00001",
        "ckpt-2.index",
    ]
    assert directory.deleting == []


async def test_nothing_outside_the_directory_is_deleted(tmp_path: Path) -> None:
    inside, outside = tmp_path / "run", tmp_path / "elsewhere"
    inside.mkdir()
    outside.mkdir()
    (outside / "ckpt-9.index").write_bytes(b"x")
    directory = ManagedDirectory(inside)
    await directory.delete([str(outside / "ckpt-9"), "../elsewhere/ckpt-9"])
    assert (outside / "ckpt-9.index").exists()


async def test_forget_changes_the_view_only(tmp_path: Path) -> None:
    directory = ManagedDirectory(tmp_path)
    await directory.reload(clock)
    await directory.publish(ENTRIES, metrics_of=ENTRIES, last_preserved_timestamp=50.0, best=None)
    state = (tmp_path / "checkpoint").read_bytes()
    directory.forget({"ckpt-2"}, "ckpt-1")
    assert (directory.entries, directory.latest) == (ENTRIES[:1], "ckpt-1")
    assert (tmp_path / "checkpoint").read_bytes() == state
