"""Collectives through small files in a store, for jobs without a collective library.

Layout, all flat in one directory ``D`` (``root``, or ``<directory>/.streamckpt-coordination``
once bound to a checkpoint's store), so that one listing per poll shows everything:

* ``run``: JSON ``{"run": R, "nonces": {rank: nonce}}``, written by rank 0;
* ``join.<rank>``: the nonce of rank ``rank`` (ranks 1..N-1) while it looks for its run;
* ``<R>.<seq>.<rank>.<name>``: the message of ``rank`` for collective ``seq`` of run ``R``.

**Runs, and why a leftover is never taken for a message.** The first collective of a
coordinator starts a run. Rank 0 removes every file of the layout it finds (leftovers of an
earlier, crashed job; those of this process's own earlier runs wait, see below), makes a
fresh random run id ``R``, waits for every other rank's ``join.<rank>``, and publishes
``run`` with their nonces. Rank ``r`` writes a fresh random nonce in ``join.<r>`` (again
whenever it finds it gone: rank 0's clean-up may remove it) and accepts a ``run`` only when
it holds its own nonce. A leftover ``run`` cannot hold a nonce made after it was written,
so every rank accepts only this job's run id; a leftover ``join`` file is removed before
rank 0 reads any (rank 0 lists, removes what it listed, and only then reads: whatever it
reads was written after its listing, by this job). Messages are read only under the
accepted ``R``, fresh from rank 0, so no earlier job's message can match.

**Every collective waits for every rank's file** (a broadcast's others write an empty
one), so that the end of collective ``k`` on any rank proves every rank has posted ``k``,
hence finished ``k - 1``. Each rank then removes its own file of ``k - 1``; rank 0, at the
end of a run's first collective, also removes the ``join`` files and the files of this
process's earlier runs in ``D`` (a second save into the same directory: removing them while
starting the run could pull a message from under a slower rank still reading the previous
run's last collective). After a run's last collective ``D`` keeps ``run`` and one file per
rank of that collective (empty ones for a broadcast's others and a barrier): the next run in
``D`` removes them.

Every wait lists ``D`` with backoff (``poll``: the first pause and the longest one) until
the files it needs are there or the timeout runs out; it then names the ranks whose files
never appeared. The messages are pickles: the store must be one that only the job writes.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import anyio

from streamckpt.distributed._protocol import DEFAULT_TIMEOUT
from streamckpt.errors import CheckpointNotFoundError, CoordinationError, unwrap_task_group
from streamckpt.storage import Store, resolve

__all__ = ["COORDINATION_DIR", "StorageCoordinator"]

#: The directory a bound coordinator keeps its files in, inside the checkpoint's directory.
COORDINATION_DIR = ".streamckpt-coordination"

_RUN = "run"
_JOIN = "join."
_MESSAGE = re.compile(r"^([0-9a-f]{32})\.(\d+)\.(\d+)\.([A-Za-z0-9_-]*)$")

# Run ids this process made as a rank 0: their files are this job's, removed only once the
# next run in the same directory has proved every rank is past them.
_OWN_RUNS: set[str] = set()


def _file_name(path: str) -> str:
    return path.replace("\\", "/").rsplit("/", 1)[-1]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)[:64]


class StorageCoordinator:
    """``world_size`` processes that share only a store.

    Unbound, it keeps its files in ``root`` (a directory URI, reached with
    ``storage_options``); :meth:`bind` gives one that keeps them next to a checkpoint.
    """

    def __init__(
        self,
        *,
        rank: int,
        world_size: int,
        timeout: float = DEFAULT_TIMEOUT,
        root: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
        poll: tuple[float, float] = (0.01, 0.5),
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not a rank of {world_size}")
        if timeout <= 0:
            raise ValueError(f"the timeout must be positive, not {timeout}")
        if not 0 < poll[0] <= poll[1]:
            raise ValueError(f"poll must be (first pause, longest pause), not {poll}")
        self._rank = rank
        self._world_size = world_size
        self._timeout = float(timeout)
        self._poll = poll
        self._store: Store | None = None
        self._dir = ""
        if root is not None:
            self._store, self._dir = resolve(root, storage_options=dict(storage_options or {}))
        self._reset()

    def _reset(self) -> None:
        self._run: str | None = None
        self._seq = 0
        self._previous: str | None = None  # our own file of the last collective
        self._tidied = False  # rank 0: the run's first collective's clean-up is done

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def timeout(self) -> float:
        return self._timeout

    @property
    def location(self) -> tuple[Store | None, str]:
        """The store and directory the files are kept in."""
        return self._store, self._dir

    def bind(self, store: Store, directory: str) -> StorageCoordinator:
        """A copy keeping its files in ``directory/.streamckpt-coordination`` of ``store``.

        The copy starts a run and a sequence of its own (every process binds in the same
        order, so the copies line up); this coordinator's own state is left as it is. One
        copy at a time per directory: a second one's run would replace the first's.
        """
        bound = object.__new__(StorageCoordinator)
        bound.__dict__.update(self.__dict__)
        bound._store = store
        bound._dir = store.join(directory, COORDINATION_DIR) if directory else COORDINATION_DIR
        bound._reset()
        return bound

    async def all_gather(self, value: object, *, name: str) -> list[object]:
        payload = pickle.dumps(value)
        if self._world_size == 1:
            return [pickle.loads(payload)]
        paths = await self._collective(name, payload)
        results: list[object] = [None] * self._world_size
        store = self._need_store()

        async def read(rank: int) -> None:
            results[rank] = pickle.loads(await store.read_all(paths[rank]))

        with unwrap_task_group():
            async with anyio.create_task_group() as tg:
                for rank in range(self._world_size):
                    tg.start_soon(read, rank)
        return results

    async def broadcast(self, value: object, *, name: str, root: int = 0) -> object:
        if not 0 <= root < self._world_size:
            raise ValueError(f"root {root} is not a rank of {self._world_size}")
        payload = pickle.dumps(value) if self._rank == root else b""
        if self._world_size == 1:
            return pickle.loads(payload)
        paths = await self._collective(name, payload)
        if self._rank == root:
            return pickle.loads(payload)
        return pickle.loads(await self._need_store().read_all(paths[root]))

    async def barrier(self, *, name: str) -> None:
        if self._world_size > 1:
            await self._collective(name, b"")

    # -- the steps of one collective --------------------------------------------------------

    def _need_store(self) -> Store:
        if self._store is None:
            raise ValueError("an unbound StorageCoordinator needs root=, or use bind()")
        return self._store

    def _path(self, name: str) -> str:
        return self._need_store().join(self._dir, name) if self._dir else name

    async def _collective(self, name: str, payload: bytes) -> list[str]:
        """Post this rank's file and wait for every rank's; the paths of all, in rank order."""
        store = self._need_store()
        deadline = time.monotonic() + self._timeout
        label = _safe(name)
        seq = self._seq
        self._seq += 1
        if self._run is None:
            await store.make_dirs(self._dir)
            if self._rank == 0:
                self._run = await self._start_run(name, deadline)
            else:
                self._run = await self._join_run(name, deadline)
        own = self._path(f"{self._run}.{seq}.{self._rank}.{label}")
        await store.write_atomic(own, payload, exclusive=False)

        found: dict[int, str] = {}

        async def complete(names: list[str]) -> bool:
            for base in names:
                match = _MESSAGE.match(base)
                if match is None or match[1] != self._run or int(match[2]) != seq:
                    continue
                rank = int(match[3])
                if match[4] != label:
                    raise CoordinationError(
                        f"rank {rank} is at collective {match[4]!r} (#{seq}) while rank "
                        f"{self._rank} is at {name!r}: the processes call different "
                        "collectives",
                        ranks=[rank],
                        uri=store.uri(self._dir),
                    )
                if 0 <= rank < self._world_size:
                    found[rank] = self._path(base)
            return len(found) == self._world_size

        def absent() -> list[int]:
            return sorted(set(range(self._world_size)) - set(found))

        names = await self._poll_until(complete, absent, f"collective {name!r} (#{seq})", deadline)
        if self._previous is not None:
            await store.delete([self._previous])
        self._previous = own
        if self._rank == 0 and not self._tidied:
            await self._tidy(names)
            self._tidied = True
        return [found[rank] for rank in range(self._world_size)]

    async def _poll_until(
        self,
        complete: Callable[[list[str]], Awaitable[bool]],
        absent: Callable[[], list[int]],
        what: str,
        deadline: float,
    ) -> list[str]:
        """The names listed once ``complete``; past the deadline, name the ``absent`` ranks."""
        store = self._need_store()
        pause, longest = self._poll
        while True:
            names = [_file_name(p) for p in await store.list_dir(self._dir)]
            if await complete(names):
                return names
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = absent()
                raise CoordinationError(
                    f"{what}: rank(s) {missing} did not arrive within {self._timeout:g} s",
                    ranks=missing,
                    uri=store.uri(self._dir),
                )
            await anyio.sleep(min(pause, remaining))
            pause = min(pause * 2, longest)

    async def _start_run(self, name: str, deadline: float) -> str:
        """Rank 0: clear leftovers, collect every rank's nonce, publish a fresh run id."""
        store = self._need_store()
        stale = [
            self._path(base)
            for base in map(_file_name, await store.list_dir(self._dir))
            if self._is_layout(base, keep=_OWN_RUNS)
        ]
        if stale:
            await store.delete(stale)
        run = uuid.uuid4().hex
        _OWN_RUNS.add(run)
        nonces: dict[int, str] = {}
        joins = {f"{_JOIN}{rank}": rank for rank in range(1, self._world_size)}

        async def complete(names: list[str]) -> bool:
            for base in names:
                rank = joins.get(base)
                if rank is not None and rank not in nonces:
                    # (removed meanwhile: rewritten, read it on the next poll)
                    with contextlib.suppress(CheckpointNotFoundError):
                        nonces[rank] = (await store.read_all(self._path(base))).decode()
            return len(nonces) == len(joins)

        def absent() -> list[int]:
            return sorted(set(joins.values()) - set(nonces))

        await self._poll_until(complete, absent, f"collective {name!r} (#0), joining", deadline)
        record = {"run": run, "nonces": {str(rank): nonce for rank, nonce in nonces.items()}}
        await store.write_atomic(self._path(_RUN), json.dumps(record).encode(), exclusive=False)
        return run

    async def _join_run(self, name: str, deadline: float) -> str:
        """Rank r > 0: post a fresh nonce until a ``run`` holding it appears."""
        store = self._need_store()
        nonce = uuid.uuid4().hex
        join = f"{_JOIN}{self._rank}"
        accepted: list[str] = []
        listed: list[str] = []

        async def complete(names: list[str]) -> bool:
            listed[:] = names
            if _RUN in names:
                try:
                    record = json.loads(await store.read_all(self._path(_RUN)))
                    if record["nonces"].get(str(self._rank)) == nonce:
                        accepted.append(str(record["run"]))
                        return True
                except CheckpointNotFoundError:
                    pass  # replaced or removed meanwhile
                except (ValueError, KeyError, TypeError, AttributeError):
                    pass  # not a run file of ours: a leftover, rank 0 will replace it
            if join not in names:
                await store.write_atomic(self._path(join), nonce.encode(), exclusive=False)
            return False

        def absent() -> list[int]:
            # Rank 0 publishes once every rank has joined: the ranks that have not are at
            # fault; when all have, rank 0 is.
            late = [r for r in range(1, self._world_size) if f"{_JOIN}{r}" not in listed]
            return [r for r in late if r != self._rank] or [0]

        await self._poll_until(complete, absent, f"collective {name!r} (#0), joining", deadline)
        return accepted[0]

    async def _tidy(self, names: Iterable[str]) -> None:
        """Rank 0, after a run's first collective: every rank is past its join and earlier runs."""
        keep = {self._run} if self._run is not None else set()
        garbage = [
            self._path(base) for base in names if self._is_layout(base, keep=keep) and base != _RUN
        ]
        if garbage:
            await self._need_store().delete(garbage)

    @staticmethod
    def _is_layout(base: str, *, keep: Iterable[str]) -> bool:
        """A file of the layout, not of a run in ``keep``."""
        if base == _RUN or base.startswith(_JOIN):
            return True
        match = _MESSAGE.match(base)
        return match is not None and match[1] not in set(keep)
