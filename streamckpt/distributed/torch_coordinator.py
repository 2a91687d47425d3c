"""Collectives over ``torch.distributed``: the job's own process group, a gloo group of ours.

Every collective has two steps:

1. **arrival**: the process sets a key of its own (``<seq>/<rank>``) in the c10d store of
   the group, then polls (``check``) for every rank's key until the coordinator's timeout.
   The keys still missing then are the ranks that never arrived, and the error names them.
   Gloo alone cannot tell (its timeout names no peer), and ``monitored_barrier`` tells only
   rank 0.
2. **exchange**: the values go through gloo (``all_gather_object`` /
   ``broadcast_object_list``) over a group made for this coordinator. Every rank is known to
   be there, so this only fails when a peer dies in between (gloo then reports the closed
   connection, or its timeout, the coordinator's, runs out).

Why a gloo group of our own, also when the job's group is gloo: its timeout is the
coordinator's (a group's timeout is fixed when it is made, and the job's is usually half an
hour), and our collectives run in a worker thread while the training loop may issue its own
on the job's group from another: two threads on one group can interleave their collectives
and deadlock. Making it is a collective: every process of the group constructs the
coordinator together, in the same order as its other process groups.

A key of collective ``k`` is removed by its rank at collective ``k + 2``: by then every rank
has passed the arrival of ``k + 1``, so none still waits on keys of ``k``. The store keeps
the last two collectives' keys, a few bytes per rank.

The store is the one ``init_process_group`` made (its host, rank 0 under ``env://``, or the
launcher's agent under torchrun). When it goes away during an arrival wait (rank 0 gave up
on the same absent ranks and exited first), the error names the ranks still missing at the
last look; gone before any look, it names none: it cannot tell which rank was its host.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import anyio.to_thread
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

from streamckpt.distributed._protocol import DEFAULT_TIMEOUT
from streamckpt.errors import CoordinationError

if TYPE_CHECKING:
    from streamckpt.storage import Store

__all__ = ["TorchCoordinator"]

_PREFIX = "streamckpt/"
# The arrival wait polls the store: from a millisecond, doubling, up to a tenth of a second.
_FIRST_PAUSE = 0.001
_LONGEST_PAUSE = 0.1
T = TypeVar("T")


class TorchCoordinator:
    """The processes of ``group`` (the default process group when ``None``).

    Construct it on every process of the group together (it creates a process group).
    """

    def __init__(self, group: Any = None, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "TorchCoordinator needs an initialised default process group "
                "(torch.distributed.init_process_group)"
            )
        if timeout <= 0:
            raise ValueError(f"the timeout must be positive, not {timeout}")
        self._timeout = float(timeout)
        wait = timedelta(seconds=self._timeout)
        try:
            if group is None:
                self._pg = dist.new_group(backend="gloo", timeout=wait)
            else:
                if group is dist.GroupMember.NON_GROUP_MEMBER:
                    raise ValueError("this process is not a member of the group given")
                # Only the group's members construct the coordinator: they alone synchronise.
                self._pg = dist.new_group(
                    dist.get_process_group_ranks(group),
                    backend="gloo",
                    timeout=wait,
                    use_local_synchronization=True,
                )
        except (RuntimeError, TimeoutError) as exc:
            raise CoordinationError(f"creating the coordinator's gloo group failed: {exc}") from exc
        self._rank = dist.get_rank(self._pg)
        self._world_size = dist.get_world_size(self._pg)
        # The group's own prefixed store: its keys are this coordinator's alone.
        self._store = c10d.PrefixStore(_PREFIX, c10d._get_process_group_store(self._pg))
        self._seq = 0

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def timeout(self) -> float:
        return self._timeout

    def bind(self, store: Store, directory: str) -> TorchCoordinator:
        return self

    async def all_gather(self, value: object, *, name: str) -> list[object]:
        payload = pickle.dumps(value)

        def exchange() -> list[object]:
            gathered: list[Any] = [None] * self._world_size
            dist.all_gather_object(gathered, (name, payload), group=self._pg)
            for rank, (other, _) in enumerate(gathered):
                self._check_name(name, other, rank)
            return [pickle.loads(data) for _, data in gathered]

        return await self._collective(name, exchange)

    async def broadcast(self, value: object, *, name: str, root: int = 0) -> object:
        if not 0 <= root < self._world_size:
            raise ValueError(f"root {root} is not a rank of {self._world_size}")
        payload = pickle.dumps(value) if self._rank == root else b""

        def exchange() -> object:
            box: list[Any] = [(name, payload)]
            dist.broadcast_object_list(box, group=self._pg, group_src=root)
            other, data = box[0]
            self._check_name(name, other, root)
            return pickle.loads(data)

        return await self._collective(name, exchange)

    async def barrier(self, *, name: str) -> None:
        await self._collective(name, lambda: None)

    async def _collective(self, name: str, exchange: Callable[[], T]) -> T:
        seq = self._seq
        self._seq += 1

        def work() -> T:
            self._arrive(seq, name)
            try:
                return exchange()
            except CoordinationError:
                raise
            except RuntimeError as exc:  # torch's DistError family
                raise CoordinationError(
                    f"collective {name!r} (#{seq}) failed after every rank arrived: a peer "
                    f"died or stopped answering ({exc})"
                ) from exc

        # Not abandoned on cancellation: the group must not see a second collective while
        # this one is still in flight; the wait ends with the timeout at the latest.
        return await anyio.to_thread.run_sync(work)

    def _arrive(self, seq: int, name: str) -> None:
        store = self._store
        deadline = time.monotonic() + self._timeout
        pause = _FIRST_PAUSE
        what = f"collective {name!r} (#{seq})"
        waiting: list[str] | None = None  # keys not seen at the last look
        try:
            store.set(f"{seq}/{self._rank}", name)
            if seq >= 2:
                store.delete_key(f"{seq - 2}/{self._rank}")
            keys = [f"{seq}/{rank}" for rank in range(self._world_size)]
            # Polled, not ``store.wait``: a wait that times out tells nothing of which keys
            # are missing, and a look after it may find the store gone (below).
            while True:
                waiting = [key for key in waiting or keys if not store.check([key])]
                remaining = deadline - time.monotonic()
                if not waiting or remaining <= 0:
                    break
                time.sleep(min(pause, remaining))
                pause = min(pause * 2, _LONGEST_PAUSE)
        except RuntimeError as exc:  # torch's DistError family
            # The store's host (rank 0 under env://) may have given up on the same absent
            # ranks and exited: those are still the ones at fault.
            missing = _ranks(waiting or [])
            raise CoordinationError(
                f"{what}: the c10d store became unreachable ({exc})"
                + (f"; rank(s) {missing} had not arrived by then" if missing else ""),
                ranks=missing,
            ) from exc
        if waiting:
            missing = _ranks(waiting)
            raise CoordinationError(
                f"{what}: rank(s) {missing} did not arrive within {self._timeout:g} s",
                ranks=missing,
            )

    def _check_name(self, name: str, other: str, rank: int) -> None:
        if other != name:
            raise CoordinationError(
                f"rank {rank} is at collective {other!r} while rank {self._rank} is at "
                f"{name!r}: the processes call different collectives",
                ranks=[rank],
            )


def _ranks(keys: list[str]) -> list[int]:
    return [int(key.rsplit("/", 1)[1]) for key in keys]
