"""``distributed.together``: one decides for all, none goes on alone (in-process ranks).

What a broken helper would get wrong: a process left holding no result or another one, the
work run on every process instead of the primary alone, a failure seen by one process while
the others go on, or an error that does not name the rank that failed.
"""

from __future__ import annotations

from typing import Any

import pytest
from support.local_group import LocalGroup, run_ranks

from streamckpt.distributed.together import all_or_none, from_primary
from streamckpt.errors import CoordinationError

pytestmark = pytest.mark.anyio


async def test_every_process_gets_what_the_primary_alone_computed() -> None:
    ran: list[int] = []

    async def work(rank: int, coordinator: Any) -> object:
        async def compute() -> dict[str, int]:
            ran.append(rank)
            return {"chosen": 7}

        return await from_primary(coordinator, compute, name="choose", what="choose")

    assert await run_ranks(LocalGroup(3), work) == [{"chosen": 7}] * 3
    assert ran == [0]


async def test_the_primarys_failure_fails_every_process() -> None:
    async def work(rank: int, coordinator: Any) -> object:
        async def compute() -> None:
            raise OSError("the bucket said 503")

        return await from_primary(coordinator, compute, name="read", what="read the values")

    primary, *others = await run_ranks(LocalGroup(3), work)
    assert isinstance(primary, OSError) and str(primary) == "the bucket said 503"
    for error in others:
        assert isinstance(error, CoordinationError) and error.ranks == (0,)
        assert "the primary could not read the values" in str(error) and "503" in str(error)


async def test_all_or_none_returns_only_when_every_part_succeeded() -> None:
    async def work(rank: int, coordinator: Any) -> str:
        await all_or_none(coordinator, None, name="done", what="restoring c-1")
        return "on"

    assert await run_ranks(LocalGroup(3), work) == ["on"] * 3


async def test_one_failed_part_stops_every_process_and_names_each_failed_rank() -> None:
    async def work(rank: int, coordinator: Any) -> str:
        failure = ValueError(f"rank {rank} does not fit") if rank in (1, 3) else None
        await all_or_none(coordinator, failure, name="done", what="restoring c-1")
        return "on"

    results = await run_ranks(LocalGroup(4), work)
    for rank in (1, 3):  # each failed process raises its own error
        assert isinstance(results[rank], ValueError)
        assert str(results[rank]) == f"rank {rank} does not fit"
    for rank in (0, 2):
        error = results[rank]
        assert isinstance(error, CoordinationError) and error.ranks == (1, 3)
        assert "restoring c-1 failed on rank(s) [1, 3]" in str(error)
        assert "rank 1 does not fit" in str(error)
