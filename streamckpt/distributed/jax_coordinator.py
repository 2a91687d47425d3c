"""Collectives over ``jax.distributed``: the key-value store of its coordination service.

Multi-controller JAX has no collective for Python objects (its collectives move arrays, and
only inside compiled programs), but every process holds a client of the coordination
service that ``jax.distributed.initialize`` started, and its key-value store is what we
need: each process sets ``streamckpt/<coordinator>/<seq>/<rank>`` to its pickled message,
then reads every rank's key with a blocking get bounded by what is left of the timeout.
A get that runs out looks up which keys are still missing: those ranks are named.

Every collective waits for every rank's key (a broadcast's others set an empty one): the end
of collective ``k`` on one process proves every process has set ``k``, so has finished
reading ``k - 1``, and each removes its own key of ``k - 1`` there. The service keeps the
last collective's keys, a few bytes per process, until the job ends.

Keys are unique per collective: ``<coordinator>`` counts the JaxCoordinators this process
has made, ``<seq>`` the collectives of this one, and every process makes the same
coordinators and calls the same collectives in the same order.

A process that dies is noticed by the coordination service only after its heartbeat
timeout (``jax.distributed.initialize(heartbeat_timeout_seconds=)``, 100 s by default);
until then the others see an absent process, named once their own timeout runs out. What
JAX does after that (it may stop every process of the job) is its own policy.
"""

from __future__ import annotations

import contextlib
import itertools
import pickle
import time
from typing import TYPE_CHECKING, Any, TypeVar

import anyio.to_thread
from jax._src import distributed
from jax.errors import JaxRuntimeError

from streamckpt.distributed._protocol import DEFAULT_TIMEOUT
from streamckpt.errors import CoordinationError

if TYPE_CHECKING:
    from streamckpt.storage import Store

__all__ = ["JaxCoordinator"]

T = TypeVar("T")

_INSTANCES = itertools.count()


class JaxCoordinator:
    """The processes of a multi-controller JAX job (after ``jax.distributed.initialize``).

    Every process constructs its coordinators in the same order (their keys are numbered).
    """

    def __init__(self, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        state = distributed.global_state
        if state.client is None:
            raise RuntimeError(
                "JaxCoordinator needs jax.distributed.initialize() to have run in this process"
            )
        if timeout <= 0:
            raise ValueError(f"the timeout must be positive, not {timeout}")
        self._client: Any = state.client
        self._rank = int(state.process_id)
        self._world_size = int(state.num_processes)
        self._timeout = float(timeout)
        self._prefix = f"streamckpt/{next(_INSTANCES)}"
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

    def bind(self, store: Store, directory: str) -> JaxCoordinator:
        return self

    async def all_gather(self, value: object, *, name: str) -> list[object]:
        payload = pickle.dumps(value)
        messages = await self._collective(name, payload)
        return [pickle.loads(message) for message in messages]

    async def broadcast(self, value: object, *, name: str, root: int = 0) -> object:
        if not 0 <= root < self._world_size:
            raise ValueError(f"root {root} is not a rank of {self._world_size}")
        payload = pickle.dumps(value) if self._rank == root else b""
        messages = await self._collective(name, payload)
        return pickle.loads(messages[root])

    async def barrier(self, *, name: str) -> None:
        await self._collective(name, b"")

    def _key(self, seq: int, rank: int) -> str:
        return f"{self._prefix}/{seq}/{rank}"

    async def _collective(self, name: str, payload: bytes) -> list[bytes]:
        seq = self._seq
        self._seq += 1
        # The name travels with the message: processes at different collectives are told.
        message = pickle.dumps((name, payload))
        # Not abandoned on cancellation: the gets end with the timeout at the latest.
        return await anyio.to_thread.run_sync(self._exchange, name, seq, message)

    def _exchange(self, name: str, seq: int, message: bytes) -> list[bytes]:
        client = self._client
        deadline = time.monotonic() + self._timeout
        what = f"collective {name!r} (#{seq})"
        try:
            client.key_value_set_bytes(self._key(seq, self._rank), message)
        except JaxRuntimeError as exc:
            raise CoordinationError(f"{what}: the coordination service failed ({exc})") from exc
        got: list[bytes] = []
        for rank in range(self._world_size):
            remaining_ms = max(1, int((deadline - time.monotonic()) * 1000))
            try:
                got.append(client.blocking_key_value_get_bytes(self._key(seq, rank), remaining_ms))
            except JaxRuntimeError as exc:
                missing = self._missing(seq, rank)
                if not missing:  # not a timeout: the service itself failed
                    raise CoordinationError(
                        f"{what}: the coordination service failed ({exc})"
                    ) from exc
                raise CoordinationError(
                    f"{what}: rank(s) {missing} did not arrive within {self._timeout:g} s",
                    ranks=missing,
                ) from exc
        if seq > 0:
            self._delete(self._key(seq - 1, self._rank))
        payloads = []
        for rank, data in enumerate(got):
            other, payload = pickle.loads(data)
            if other != name:
                raise CoordinationError(
                    f"rank {rank} is at collective {other!r} while rank {self._rank} is at "
                    f"{name!r}: the processes call different collectives",
                    ranks=[rank],
                )
            payloads.append(payload)
        return payloads

    def _missing(self, seq: int, first: int) -> list[int]:
        """The ranks from ``first`` on whose key of ``seq`` is not there (empty: can't tell)."""
        missing = []
        for rank in range(first, self._world_size):
            try:
                self._client.key_value_try_get_bytes(self._key(seq, rank))
            except JaxRuntimeError as exc:
                if not str(exc).startswith("NOT_FOUND"):
                    return []
                missing.append(rank)
        return missing

    def _delete(self, key: str) -> None:
        # a key left behind costs a few bytes; the collective is done either way
        with contextlib.suppress(JaxRuntimeError):
            self._client.key_value_delete(key)
