"""A local save and load with each of their system calls failing in turn, with each errno.

For every call a save makes (open, write, fsync, close, link/rename, unlink, mkdir: counted in
a dry run, then failed one at a time with EIO, ENOSPC, EDQUOT, EACCES and EROFS), the save
ends within a bound in one of two ways: a ``StreamCkptError`` naming the URI (and the shard,
for a shard's file) that keeps the errno, or a checkpoint that loads bit-exact. Never success
after a failed fsync, never an index left over shards that are gone, no temp or claim files
and no file descriptors left, and an earlier checkpoint in the same directory intact. Loads
get the same table. The failing shim is ``support.injection.SyscallFaults`` under the real
local store: every other call reaches the disk.
"""

from __future__ import annotations

import errno
import glob
import os
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from support.injection import SyscallFaults, open_fds, patch_local_os
from support.pagecache import evict

import streamckpt
import streamckpt.fileio
import streamckpt.pipeline.local_load
import streamckpt.pipeline.local_read
import streamckpt.pipeline.read_ahead
import streamckpt.storage.local
import streamckpt.sync
from streamckpt.errors import StreamCkptError

pytestmark = pytest.mark.anyio

ERRNOS = (errno.EIO, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS)
SAVE_KINDS = ("open", "write", "fsync", "close", "link", "unlink", "mkdir")
LOAD_KINDS = ("open", "read", "close")
BOUND_S = 20.0  # a case that takes longer hangs; a healthy one takes milliseconds


def tensors(seed: int) -> dict[str, np.ndarray[Any, Any]]:
    """Two shards of several tensors each, large enough for more than one write per shard."""
    rng = np.random.default_rng(seed)
    return {
        f"layer{i}/w": rng.integers(0, 2**31, size=40_000 + 997 * i, dtype=np.int32)
        for i in range(6)
    }


async def assert_exact(prefix: str, expected: dict[str, np.ndarray[Any, Any]]) -> None:
    loaded = await streamckpt.load(prefix)
    assert sorted(loaded) == sorted(expected)
    for name, value in expected.items():
        assert loaded[name].tobytes() == value.tobytes(), name


def leftovers(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if ".tmp-" in n or n.endswith(".claim"))


def chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(seen) < 10:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


async def save_with(
    faults: SyscallFaults, monkeypatch: pytest.MonkeyPatch, prefix: str, **kwargs: Any
) -> Any:
    patch_local_os(monkeypatch, faults)
    try:
        with anyio.fail_after(BOUND_S):
            return await streamckpt.save(
                prefix, tensors(2), num_shards=2, chunk_bytes=64 << 10, **kwargs
            )
    finally:
        patch_local_os(monkeypatch, os)


async def count_calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **kwargs: Any) -> int:
    """How many calls of the kinds under test one save makes (a dry run, nothing failing)."""
    root = tmp_path / "dry"
    root.mkdir()
    await streamckpt.save(str(root / "ckpt-1"), tensors(1), num_shards=2)
    if kwargs.get("overwrite"):
        await streamckpt.save(str(root / "ckpt-2"), tensors(3), num_shards=3)
    faults = SyscallFaults(fail_at=None, error=errno.EIO, kinds=SAVE_KINDS)
    await save_with(faults, monkeypatch, str(root / "ckpt-2"), **kwargs)
    return len(faults.calls)


@pytest.mark.parametrize("direct_io", [False, True], ids=["cached", "direct"])
@pytest.mark.parametrize("overwrite", [False, True], ids=["new", "overwrite"])
async def test_a_failing_system_call_fails_the_save_cleanly_or_not_at_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overwrite: bool, direct_io: bool
) -> None:
    """Both ways to the disk: through the cache (a waited save) and O_DIRECT (background)."""
    options = {"direct_io": direct_io}
    total = await count_calls(tmp_path, monkeypatch, overwrite=overwrite, storage_options=options)
    assert total >= 20  # opens, writes, fsyncs, closes, the link, the claim: every site
    outcomes: dict[str, int] = {}
    sites: dict[str, set[str]] = {}  # the calls whose failure ended each way
    for error in ERRNOS:
        for k in range(1, total + 1):
            root = tmp_path / f"{errno.errorcode[error]}-{k}"
            root.mkdir()
            earlier, prefix = str(root / "ckpt-1"), str(root / "ckpt-2")
            await streamckpt.save(earlier, tensors(1), num_shards=2)
            if overwrite:
                await streamckpt.save(prefix, tensors(3), num_shards=3)
            fds = open_fds()
            faults = SyscallFaults(fail_at=k, error=error, kinds=SAVE_KINDS)
            case = f"{errno.errorcode[error]} at call {k} of {total}"
            failure: StreamCkptError | None = None
            try:
                await save_with(
                    faults, monkeypatch, prefix, overwrite=overwrite, storage_options=options
                )
            except StreamCkptError as exc:
                failure = exc
            fired = faults.fired
            assert fired is not None, case
            case += f": {fired.name}({fired.path})"
            index_there = await anyio.Path(prefix + ".index").exists()
            if failure is None:
                assert fired.name not in ("fsync", "fdatasync"), f"success after {case}"
                await assert_exact(prefix, tensors(2))
                outcome = "saved"
            else:
                assert failure.uri is not None, case
                if ".data-" in fired.path and fired.name != "unlink":
                    assert failure.shard is not None or ".data-" in failure.uri, (case, failure)
                if any(
                    item is not failure and isinstance(item, OSError) and item.errno == error
                    for item in chain(failure)
                ):
                    assert failure.errno == error, (case, failure)
                if index_there:
                    # a failure after the commit point: the checkpoint is whole, and says so
                    if overwrite and "committed" not in failure.message:
                        await assert_exact(prefix, tensors(3))
                        outcome = "failed, old kept"
                    else:
                        assert "committed" in failure.message, (case, failure)
                        await assert_exact(prefix, tensors(2))
                        outcome = "failed after commit, whole"
                else:
                    outcome = "failed"
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            sites.setdefault(outcome, set()).add(fired.name)
            assert leftovers(root) == [], case
            ours = [
                n for n in os.listdir(root) if n.startswith("ckpt-2.data-") and "-of-00002" in n
            ]
            if not index_there:
                # A failed save removes its shards. (A failed overwrite may leave the data
                # files of the checkpoint it had unpublished: the next save reclaims them.)
                assert ours == [], (case, ours)
            assert open_fds() <= fds, case
            await assert_exact(earlier, tensors(1))
    print(f"{5 * total} faults ({total} calls x {len(ERRNOS)} errnos): {outcomes} {sites}")
    assert outcomes.get("failed", 0) > 0
    # each way's own data writes were among the failed calls
    failed_at = set().union(*(names for end, names in sites.items() if end.startswith("failed")))
    assert ("write" if direct_io else "writev") in failed_at, sites


# The modules whose ``os`` a load calls: the local store opens and stats, ``fileio`` reads
# (probes the page cache, opens O_DIRECT, preads); the blocking local load opens and stats.
LOAD_MODULES = {
    "async": (streamckpt.storage.local, streamckpt.fileio),
    "blocking": (streamckpt.pipeline.local_read, streamckpt.fileio),
    # the blocking load reading the data files whole while the index decodes (threads)
    "ahead": (streamckpt.pipeline.local_read, streamckpt.pipeline.read_ahead, streamckpt.fileio),
}


def big_tensors() -> dict[str, np.ndarray[Any, Any]]:
    """Merged reads of several 2 MiB chunks a shard: the chunked, direct reads are made."""
    rng = np.random.default_rng(9)
    return {f"t{i}": rng.integers(0, 2**31, 700_000 + 997 * i, dtype=np.int32) for i in range(4)}


def load_in(way: str, prefix: str) -> dict[str, np.ndarray[Any, Any]]:
    if way in ("blocking", "ahead"):
        return streamckpt.sync.load(prefix)

    async def bounded() -> dict[str, np.ndarray[Any, Any]]:
        with anyio.fail_after(BOUND_S):
            return await streamckpt.load(prefix)

    streamckpt.clear_index_cache()
    return anyio.run(bounded)


def with_os(monkeypatch: pytest.MonkeyPatch, way: str, stand_in: Any) -> None:
    for module in LOAD_MODULES[way]:
        monkeypatch.setattr(module, "os", stand_in)


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="evicts with posix_fadvise")
@pytest.mark.parametrize("way", list(LOAD_MODULES))
def test_a_failing_system_call_fails_the_load_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, way: str
) -> None:
    """Every call of a cold load (index reads, page-cache probes, O_DIRECT opens and reads)
    fails in turn: a ``StreamCkptError`` naming the URI with the errno, no descriptor left."""
    prefix = str(tmp_path / "ckpt")
    expected = big_tensors()
    streamckpt.sync.save(prefix, expected, num_shards=2)
    if way == "ahead":
        monkeypatch.setattr(streamckpt.pipeline.local_load, "READ_AHEAD_INDEX_BYTES", 0)
        monkeypatch.setattr(streamckpt.pipeline.read_ahead, "CHUNK", 1 << 20)  # several a file
    dry = SyscallFaults(fail_at=None, error=errno.EIO, kinds=LOAD_KINDS)
    evict(tmp_path)
    with_os(monkeypatch, way, dry)
    load_in(way, prefix)
    with_os(monkeypatch, way, os)
    total = len(dry.calls)
    assert total >= 6
    assert sum(call.name == "preadv" for call in dry.calls) >= 4  # the reads are counted
    if way == "ahead":  # every file read whole, a chunk a call: the threads' reads counted
        shard_reads = [c for c in dry.calls if c.name == "preadv" and ".data-" in c.path]
        assert len(shard_reads) >= sum(
            -(-os.path.getsize(p) // (1 << 20)) for p in glob.glob(prefix + ".data-*")
        ), shard_reads
    for error in ERRNOS:
        for k in range(1, total + 1):
            fds = open_fds()
            evict(tmp_path)
            faults = SyscallFaults(fail_at=k, error=error, kinds=LOAD_KINDS)
            with_os(monkeypatch, way, faults)
            case = f"{way}: {errno.errorcode[error]} at call {k} of {total}"
            try:
                loaded = load_in(way, prefix)
            except StreamCkptError as exc:
                assert exc.uri is not None, (case, exc)
                assert exc.errno == error or not isinstance(exc, OSError), (case, exc)
            else:
                # nothing failed, or the index's stat that only versions the index cache
                # (a failed one means no caching: the index is then read and checked)
                fired = faults.fired
                assert fired is None or (fired.name, fired.path) == ("stat", prefix + ".index")
                assert all(loaded[n].tobytes() == v.tobytes() for n, v in expected.items())
            finally:
                with_os(monkeypatch, way, os)
            assert open_fds() <= fds, case
