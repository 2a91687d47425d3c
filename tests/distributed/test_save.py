"""The multi-process save's protocol, attacked with in-process "processes" (one event loop).

What a broken protocol would get wrong: an index after any process failed, a hang when one
never arrives, shards left behind, an earlier checkpoint harmed, a plan not reused (or
reused when the structure changed), replicas written twice. Real processes and engines are
``test_multiprocess_save.py``'s.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from support.local_group import LocalGroup, run_ranks

import streamckpt
from streamckpt.distributed.save import last_coordination, save_distributed
from streamckpt.errors import CoordinationError, StorageError, StreamCkptError
from streamckpt.storage import resolve

pytestmark = pytest.mark.anyio

FULL = np.arange(1000 * 48, dtype=np.float32).reshape(1000, 48)


def values_of(rank: int, *, full: np.ndarray[Any, Any] = FULL) -> dict[str, Any]:
    rows = full.shape[0] // 4
    return {
        "emb": streamckpt.Slice(
            full[rows * rank : rows * (rank + 1)], full_shape=full.shape, offset=(rows * rank, 0)
        ),
        "bias": np.full(7, 3.5),
        f"rank{rank}/rng": np.array([rank, rank * 10], dtype=np.int64),
    }


def files(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


async def test_four_processes_write_one_checkpoint(tmp_path: Path) -> None:
    group = LocalGroup(4)
    prefix = str(tmp_path / "ckpt")

    async def work(rank: int, coordinator: Any) -> streamckpt.SaveInfo:
        return await streamckpt.save(prefix, values_of(rank), coordinator=coordinator)

    infos = await run_ranks(group, work)
    assert all(info == infos[0] for info in infos)
    assert infos[0].num_tensors == 6  # emb, bias, 4 x rng
    # bias is written once, by one process: the bytes are the distinct values' bytes
    distinct = FULL.nbytes + 7 * 8 + 4 * 16
    assert infos[0].bytes_written == distinct
    data = [f for f in files(tmp_path) if ".data-" in f]
    assert sum((tmp_path / f).stat().st_size for f in data) == distinct
    assert len(data) == infos[0].num_shards == 4  # every process wrote something
    loaded = await streamckpt.load(prefix)
    assert np.array_equal(loaded["emb"], FULL)
    assert np.array_equal(loaded["bias"], np.full(7, 3.5))
    for rank in range(4):
        assert loaded[f"rank{rank}/rng"].tolist() == [rank, rank * 10]
    async with streamckpt.open(prefix) as ckpt:
        assert len(ckpt.entries["emb"].slices) == 4
        assert not ckpt.entries["bias"].slices


async def test_replicas_spread_over_holders(tmp_path: Path) -> None:
    """Eight equal-size replicated tensors on 4 processes: each process writes two."""
    group = LocalGroup(4)
    prefix = str(tmp_path / "ckpt")
    shared = {f"w{i}": np.full(1000, i, dtype=np.float64) for i in range(8)}

    async def work(rank: int, coordinator: Any) -> streamckpt.SaveInfo:
        return await streamckpt.save(prefix, shared, coordinator=coordinator)

    await run_ranks(group, work)
    sizes = [(tmp_path / f).stat().st_size for f in files(tmp_path) if ".data-" in f]
    assert sizes == [2 * 8000] * 4
    loaded = await streamckpt.load(prefix)
    assert all(np.array_equal(loaded[k], v) for k, v in shared.items())


async def test_a_repeated_save_reuses_the_plan(tmp_path: Path) -> None:
    group = LocalGroup(4)

    async def work(rank: int, coordinator: Any, step: int, extra: bool) -> dict[str, float]:
        values = values_of(rank)
        if extra and rank == 1:
            values["late"] = np.zeros(3)
        await streamckpt.save(str(tmp_path / f"ckpt-{step}"), values, coordinator=coordinator)
        return dict(last_coordination(coordinator))

    first = await run_ranks(group, lambda r, c: work(r, c, 1, False))
    assert [s["plan_reused"] for s in first] == [0.0] * 4
    calls_before = len(group.calls)
    again = await run_ranks(group, lambda r, c: work(r, c, 2, False))
    assert [s["plan_reused"] for s in again] == [1.0] * 4
    steps = [name for _, name in group.calls[calls_before:]]
    assert "plan-items" not in steps  # only the fingerprints travelled
    changed = await run_ranks(group, lambda r, c: work(r, c, 3, True))
    assert [s["plan_reused"] for s in changed] == [0.0] * 4
    loaded = await streamckpt.load(str(tmp_path / "ckpt-3"))
    assert "late" in loaded and np.array_equal(loaded["emb"], FULL)


@pytest.mark.parametrize(
    ("case", "culprit"),
    [
        ("dtype", 2),  # rank 2 gives emb as float64
        ("shape", 3),  # rank 3 says the full shape is (1001, 48)
        ("overlap", 1),  # rank 1's rows overlap rank 2's
        ("bad-value", 2),  # rank 2's value cannot be saved at all
    ],
)
async def test_disagreement_is_refused_before_any_byte(
    tmp_path: Path, case: str, culprit: int
) -> None:
    group = LocalGroup(4)
    prefix = str(tmp_path / "ckpt")

    async def work(rank: int, coordinator: Any) -> Any:
        values = values_of(rank)
        if rank == culprit:
            piece = FULL[250 * rank : 250 * rank + 250]
            if case == "dtype":
                values["emb"] = streamckpt.Slice(
                    piece.astype(np.float64), full_shape=(1000, 48), offset=(250 * rank, 0)
                )
            elif case == "shape":
                values["emb"] = streamckpt.Slice(piece, full_shape=(1001, 48), offset=(750, 0))
            elif case == "overlap":
                values["emb"] = streamckpt.Slice(
                    FULL[240:490], full_shape=(1000, 48), offset=(240, 0)
                )
            else:
                values["odd"] = object()
        return await streamckpt.save(prefix, values, coordinator=coordinator)

    results = await run_ranks(group, work)
    for rank, result in enumerate(results):
        assert isinstance(result, Exception), f"rank {rank} saved"
        if rank != culprit or case != "bad-value":
            assert isinstance(result, CoordinationError), repr(result)
            assert culprit in result.ranks
    assert files(tmp_path) == []  # not a byte, not a claim


class _FailingWrites:
    """A real store whose shard writes fail after their first bytes (one process's disk)."""

    def __init__(self, store: Any) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def write_object(self, path: str, stream: Any, **kwargs: Any) -> Any:
        def failing(writer: Any) -> Any:
            writer.write(memoryview(b"x" * 100))
            raise StorageError("injected: the disk of this process failed")

        return self._store.write_object(path, failing, **kwargs)


async def _save_with(
    group: LocalGroup, prefix: str, *, failing: int | None = None, absent: int | None = None
) -> list[Any]:
    """Every rank but ``absent`` saves (that one never arrives); ``failing``'s disk fails."""

    async def work(rank: int, coordinator: Any) -> Any:
        store, path = resolve(prefix)
        if rank == failing:
            store = _FailingWrites(store)
        return await save_distributed(
            store, path, values_of(rank), coordinator, num_shards=None, overwrite=True
        )

    return await run_ranks(group, work, absent=absent)


@pytest.mark.parametrize("failing", [0, 2])
async def test_a_failed_write_leaves_no_index_and_no_shard(tmp_path: Path, failing: int) -> None:
    group = LocalGroup(4)
    earlier = str(tmp_path / "ckpt-1")
    await run_ranks(group, lambda r, c: streamckpt.save(earlier, values_of(r), coordinator=c))
    before = {f: (tmp_path / f).read_bytes() for f in files(tmp_path)}
    results = await _save_with(group, str(tmp_path / "ckpt-2"), failing=failing)
    assert all(isinstance(r, StreamCkptError) for r in results), results
    assert isinstance(results[failing], StorageError)
    for rank, result in enumerate(results):
        if rank != failing:
            assert isinstance(result, CoordinationError) and result.ranks == (failing,)
    assert {f: (tmp_path / f).read_bytes() for f in files(tmp_path)} == before
    assert np.array_equal((await streamckpt.load(earlier))["emb"], FULL)


async def test_a_process_that_never_arrives_times_out_every_other(tmp_path: Path) -> None:
    group = LocalGroup(4, timeout=1.0)
    with anyio.fail_after(30):  # never a hang
        results = await _save_with(group, str(tmp_path / "ckpt"), absent=3)
    for rank in (0, 1, 2):
        assert isinstance(results[rank], CoordinationError) and results[rank].ranks == (3,)
    assert files(tmp_path) == []


class _Died(BaseException):
    """A process's sudden end: nothing after it runs in that process."""


class _NoCleanUp:
    """A dead process removes nothing: its store's deletes do nothing."""

    def __init__(self, store: Any) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def delete(self, paths: Any) -> None:
        return None


async def test_a_process_that_dies_after_writing_leaves_nothing(tmp_path: Path) -> None:
    """Rank 3 writes its shard, then vanishes before reporting: the primary removes it."""
    group = LocalGroup(4, timeout=1.0)
    prefix = str(tmp_path / "ckpt")
    written: list[str] = []

    async def work(rank: int, coordinator: Any) -> Any:
        store, path = resolve(prefix)
        if rank == 3:
            store = _NoCleanUp(store)
            original = coordinator.all_gather

            async def vanish(value: object, *, name: str) -> list[object]:
                if name == "written":
                    written.extend(f for f in files(tmp_path) if ".data-" in f)
                    raise _Died
                return await original(value, name=name)

            coordinator.all_gather = vanish
        try:
            return await save_distributed(
                store, path, values_of(rank), coordinator, num_shards=None, overwrite=False
            )
        except (_Died, BaseExceptionGroup):  # its own end, however it travels
            return "died"

    with anyio.fail_after(30):
        results = await run_ranks(group, work)
    assert results[3] == "died" and written  # it had written its shard
    for rank in (0, 1, 2):
        assert isinstance(results[rank], CoordinationError) and results[rank].ranks == (3,)
    assert files(tmp_path) == []


async def test_a_cancelled_process_fails_the_save_for_all(tmp_path: Path) -> None:
    group = LocalGroup(4, timeout=5.0)
    prefix = str(tmp_path / "ckpt")
    big = np.ones((4000, 1024), dtype=np.float32)  # 16 MiB per process: time to cancel

    async def work(rank: int, coordinator: Any) -> Any:
        values = {"big": streamckpt.Slice(big, full_shape=(16000, 1024), offset=(4000 * rank, 0))}
        if rank == 1:
            with anyio.move_on_after(0.05):
                return await streamckpt.save(
                    prefix, values, coordinator=coordinator, chunk_bytes=1 << 16
                )
            return "cancelled"
        return await streamckpt.save(prefix, values, coordinator=coordinator, chunk_bytes=1 << 16)

    with anyio.fail_after(30):
        results = await run_ranks(group, work)
    if results[1] != "cancelled":
        pytest.skip(f"the save ended before the cancellation (a fast disk): {results[1]!r}")
    for rank in (0, 2, 3):
        assert isinstance(results[rank], CoordinationError) and 1 in results[rank].ranks
    assert not [f for f in files(tmp_path) if ".data-" in f or f.endswith(".index")]


async def test_a_second_distributed_save_of_a_prefix_fails_fast(tmp_path: Path) -> None:
    group = LocalGroup(2)
    prefix = str(tmp_path / "ckpt")
    await run_ranks(group, lambda r, c: streamckpt.save(prefix, {"a": np.ones(2)}, coordinator=c))
    results = await run_ranks(
        group, lambda r, c: streamckpt.save(prefix, {"a": np.zeros(2)}, coordinator=c)
    )
    assert isinstance(results[0], streamckpt.CheckpointExistsError)
    assert isinstance(results[1], CoordinationError) and results[1].ranks == (0,)
    assert np.array_equal((await streamckpt.load(prefix))["a"], np.ones(2))


async def test_overwrite_replaces_with_a_new_layout(tmp_path: Path) -> None:
    group = LocalGroup(4)
    prefix = str(tmp_path / "ckpt")
    await run_ranks(group, lambda r, c: streamckpt.save(prefix, values_of(r), coordinator=c))
    other = FULL * 2
    two = LocalGroup(2)

    async def work(rank: int, coordinator: Any) -> Any:
        piece = streamckpt.Slice(
            other[:, 24 * rank : 24 * rank + 24], full_shape=(1000, 48), offset=(0, 24 * rank)
        )
        return await streamckpt.save(
            prefix, {"emb": piece}, coordinator=coordinator, overwrite=True
        )

    infos = await run_ranks(two, work)
    assert infos[0].num_shards == 2
    loaded = await streamckpt.load(prefix)
    assert sorted(loaded) == ["emb"] and np.array_equal(loaded["emb"], other)
    assert [f for f in files(tmp_path) if ".data-" in f] == [
        "ckpt.data-00000-of-00002",
        "ckpt.data-00001-of-00002",
    ]


class _SlowWrites:
    """A real store whose shard writes take ``seconds`` longer (a straggler's disk)."""

    def __init__(self, store: Any, seconds: float) -> None:
        self._store = store
        self._seconds = seconds

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def write_object(self, path: str, stream: Any, **kwargs: Any) -> Any:
        def slow(writer: Any) -> Any:
            deadline = time.monotonic() + self._seconds
            while time.monotonic() < deadline:
                anyio.from_thread.check_cancelled()  # as every real write is
                time.sleep(0.02)
            return stream(writer)

        return self._store.write_object(path, slow, **kwargs)


async def test_a_straggler_slower_than_the_timeout_is_waited_for(tmp_path: Path) -> None:
    """Collectives time out after 0.5 s; rank 2 writes for 3 s: heartbeats keep it alive."""
    group = LocalGroup(4, timeout=0.5)
    prefix = str(tmp_path / "ckpt")

    async def work(rank: int, coordinator: Any) -> Any:
        store, path = resolve(prefix)
        if rank == 2:
            store = _SlowWrites(store, 3.0)
        return await save_distributed(
            store, path, values_of(rank), coordinator, num_shards=None, overwrite=False
        )

    results = await run_ranks(group, work)
    assert all(isinstance(r, streamckpt.SaveInfo) for r in results), results
    assert np.array_equal((await streamckpt.load(prefix))["emb"], FULL)
    beats = [name for rank, name in group.calls if rank == 0 and name == "written"]
    assert len(beats) > 2  # it beat while rank 2 wrote


async def test_a_failure_stops_the_others_writes(tmp_path: Path) -> None:
    """Rank 0's disk fails at once; ranks 1-3 would write for 30 s: they stop at a beat."""
    group = LocalGroup(4, timeout=2.0)
    prefix = str(tmp_path / "ckpt")

    async def work(rank: int, coordinator: Any) -> Any:
        store, path = resolve(prefix)
        store = _FailingWrites(store) if rank == 0 else _SlowWrites(store, 30.0)
        return await save_distributed(
            store, path, values_of(rank), coordinator, num_shards=None, overwrite=False
        )

    with anyio.fail_after(25):  # far less than the 30 s the slow writes would take
        results = await run_ranks(group, work)
    assert isinstance(results[0], StorageError)
    for rank in (1, 2, 3):
        assert isinstance(results[rank], CoordinationError) and results[rank].ranks == (0,)
    assert files(tmp_path) == []
