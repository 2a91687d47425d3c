"""Two steps the processes of a job take together, above the collectives of a coordinator.

- :func:`from_primary`: the primary decides or reads something once and every process gets
  it (a manager's choice of checkpoint, replicated values read once).
- :func:`all_or_none`: after each process did its own part, none goes on alone when another
  failed (a restore of the chosen checkpoint on every process).

Both end every process the same way: with the result, or with an error. The process that
failed raises its own error; the others raise :class:`CoordinationError` naming its rank, so
that no process trains on while a peer holds other weights.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar, cast

from streamckpt.distributed._protocol import PRIMARY, Coordinator
from streamckpt.errors import CoordinationError

__all__ = ["all_or_none", "from_primary"]

T = TypeVar("T")


async def from_primary(
    coordinator: Coordinator, compute: Callable[[], Awaitable[T]], *, name: str, what: str
) -> T:
    """``compute()`` run on the primary alone, its result sent to every process.

    Its failure fails every process: the primary raises it, the others a
    :class:`CoordinationError` "the primary could not ``what``" naming rank 0. ``compute``
    is never called on the other processes.
    """
    mine: object = None
    if coordinator.rank == PRIMARY:
        try:
            mine = await compute()
        except Exception as exc:
            mine = exc
    got = await coordinator.broadcast(mine, name=name, root=PRIMARY)
    if isinstance(mine, BaseException):
        raise mine
    if isinstance(got, BaseException):
        raise CoordinationError(f"the primary could not {what}: {got!r}", ranks=[PRIMARY])
    return cast(T, got)


async def all_or_none(
    coordinator: Coordinator, failure: Exception | None, *, name: str, what: str
) -> None:
    """Return only if no process failed its part; ``failure`` is this process's, or None.

    A process that failed raises its own ``failure``; the others raise a
    :class:`CoordinationError` "``what`` failed on rank(s) ..." naming every failed rank and
    the first one's error.
    """
    outcomes = await coordinator.all_gather(None if failure is None else repr(failure), name=name)
    if failure is not None:
        raise failure
    failed = [rank for rank, outcome in enumerate(outcomes) if outcome is not None]
    if failed:
        raise CoordinationError(
            f"{what} failed on rank(s) {failed}: {outcomes[failed[0]]}", ranks=failed
        )
