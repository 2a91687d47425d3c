"""In-process coordinators: N "processes" as N tasks of one event loop, for fast tests.

Every value crosses through pickle, as it would between real processes, so an unpicklable
message fails here as it would there. The real engines (torch.distributed, jax, the storage
coordinator) are tested with real processes in ``tests/distributed``; these exist so that
the save's protocol (failures at each step, timeouts, cancellation, plan reuse) can be
attacked in many variations without starting processes.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from typing import Any

import anyio

from streamckpt.errors import CoordinationError
from streamckpt.storage import Store


@dataclass
class _Slot:
    values: dict[int, bytes] = field(default_factory=dict)
    done: anyio.Event = field(default_factory=anyio.Event)


class LocalGroup:
    """The shared mailbox of ``world_size`` in-process coordinators."""

    def __init__(self, world_size: int, *, timeout: float = 10.0) -> None:
        self.world_size = world_size
        self.timeout = timeout
        self.slots: dict[tuple[int, str], _Slot] = {}
        self.calls: list[tuple[int, str]] = []  # (rank, name) of every collective entered
        self.members = [LocalCoordinator(self, rank) for rank in range(world_size)]

    def __getitem__(self, rank: int) -> LocalCoordinator:
        return self.members[rank]


class LocalCoordinator:
    def __init__(self, group: LocalGroup, rank: int) -> None:
        self.group = group
        self._rank = rank
        self._seq = 0

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self.group.world_size

    @property
    def timeout(self) -> float:
        return self.group.timeout

    def bind(self, store: Store, directory: str) -> LocalCoordinator:
        return self

    async def _exchange(self, value: object, name: str) -> dict[int, bytes]:
        key = (self._seq, name)
        self._seq += 1
        self.group.calls.append((self._rank, name))
        slot = self.group.slots.setdefault(key, _Slot())
        slot.values[self._rank] = pickle.dumps(value)
        if len(slot.values) == self.world_size:
            slot.done.set()
        with anyio.move_on_after(self.timeout):
            await slot.done.wait()
        if not slot.done.is_set():
            missing = sorted(set(range(self.world_size)) - set(slot.values))
            raise CoordinationError(
                f"collective {name!r} timed out after {self.timeout} s waiting for ranks {missing}",
                ranks=missing,
            )
        return slot.values

    async def all_gather(self, value: object, *, name: str) -> list[object]:
        values = await self._exchange(value, name)
        return [pickle.loads(values[r]) for r in range(self.world_size)]

    async def broadcast(self, value: object, *, name: str, root: int = 0) -> object:
        values = await self._exchange(value if self._rank == root else None, name)
        return pickle.loads(values[root])

    async def barrier(self, *, name: str) -> None:
        await self._exchange(None, name)


async def run_ranks(group: LocalGroup, work: Any, *, absent: int | None = None) -> list[Any]:
    """``await work(rank, coordinator)`` for every rank at once; results or exceptions.

    Rank ``absent`` never runs (a process that never arrives): its result stays None.
    """
    results: list[Any] = [None] * group.world_size

    async def one(rank: int) -> None:
        try:
            results[rank] = await work(rank, group[rank])
        except Exception as exc:
            results[rank] = exc

    async with anyio.create_task_group() as tg:
        for rank in range(group.world_size):
            if rank != absent:
                tg.start_soon(one, rank)
    return results
