"""What a distributed save needs from the job's own engine: a few small collectives.

A coordinator never carries tensor data: only plans (names, dtypes, shapes, boxes, sizes),
per-process results (index entries and checksums) and outcomes, each a few bytes per tensor.
Every process of the job calls the same collectives in the same order with the same
``name``; the name is there for diagnostics (a timeout says which step it was) and for the
storage coordinator, which turns it into file names.

Rules every implementation keeps (``tests/distributed/test_coordinators.py`` holds them):

* every wait has a timeout (the coordinator's ``timeout``, in seconds); a wait that runs out
  raises :class:`~streamckpt.errors.CoordinationError` naming the ranks that did not arrive
  where the engine can tell, within the timeout plus a small margin, never a hang;
* values are picklable Python objects, delivered in rank order; ``all_gather`` returns the
  same list on every process, ``broadcast`` returns the root's value on every process;
* a collective is a cancellation point only as far as the engine allows: a process cancelled
  inside one leaves the others to time out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from streamckpt.storage import Store

__all__ = ["DEFAULT_TIMEOUT", "PRIMARY", "Coordinator"]

#: The rank that decides for the job: it writes the index and chooses what a resume restores.
PRIMARY = 0

#: Seconds any one collective may wait for the slowest process before it fails.
DEFAULT_TIMEOUT = 300.0


@runtime_checkable
class Coordinator(Protocol):
    """The processes of one job, as a save or a restore sees them."""

    @property
    def rank(self) -> int:
        """The number of this process, ``0 <= rank < world_size``; rank 0 is the primary."""
        ...

    @property
    def world_size(self) -> int:
        """How many processes take part."""
        ...

    @property
    def timeout(self) -> float:
        """Seconds any one collective waits before it raises ``CoordinationError``."""
        ...

    def bind(self, store: Store, directory: str) -> Coordinator:
        """The coordinator to use for a checkpoint in ``directory`` of ``store``.

        One that keeps its messages in the checkpoint's own store gets it here (and returns
        a bound copy); one that talks through an engine returns itself.
        """
        ...

    async def all_gather(self, value: object, *, name: str) -> list[object]:
        """Every process's ``value``, in rank order, on every process."""
        ...

    async def broadcast(self, value: object, *, name: str, root: int = 0) -> object:
        """``root``'s ``value`` on every process (the others' ``value`` is ignored)."""
        ...

    async def barrier(self, *, name: str) -> None:
        """Return once every process has reached the barrier of this ``name``."""
        ...
