"""The coordinator of a job of one process: every collective returns at once.

It lets one process save pieces (``Slice`` lists, a ``jax.Array`` over several local
devices) through the same planner and merge as a job of many, without any engine.
"""

from __future__ import annotations

from streamckpt.distributed._protocol import DEFAULT_TIMEOUT
from streamckpt.storage import Store

__all__ = ["SoloCoordinator"]


class SoloCoordinator:
    """Rank 0 of 1."""

    @property
    def rank(self) -> int:
        return 0

    @property
    def world_size(self) -> int:
        return 1

    @property
    def timeout(self) -> float:
        return DEFAULT_TIMEOUT

    def bind(self, store: Store, directory: str) -> SoloCoordinator:
        return self

    async def all_gather(self, value: object, *, name: str) -> list[object]:
        return [value]

    async def broadcast(self, value: object, *, name: str, root: int = 0) -> object:
        return value

    async def barrier(self, *, name: str) -> None:
        return None


#: One for every single-process save of pieces, so that a repeated one reuses its plan.
SOLO = SoloCoordinator()
