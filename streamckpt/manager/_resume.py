"""Which checkpoint a resume restores: the newest one that verifies and then restores.

Kept apart from the manager, which gathers the candidates and says how to verify and restore
one, so that the rule itself is a function of those alone, tested without a directory
(``tests/highlevel/test_resume.py``). The rule:

- candidates are tried newest first; the first that verifies and restores is the one;
- a candidate whose verification gives a reason, or whose restore fails because its files
  are missing or corrupt (:func:`broken_reason`), is skipped with that reason;
- any other error is raised at once: a flaky network or a tree that does not fit must not
  roll training back silently to an older checkpoint.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

from streamckpt.manager._files import SkippedCheckpoint, broken_reason

__all__ = ["restore_newest"]


async def restore_newest(
    candidates: Iterable[str],
    *,
    verify: Callable[[str], Awaitable[str | None]],
    restore: Callable[[str], Awaitable[object]],
) -> tuple[str | None, list[SkippedCheckpoint]]:
    """The candidate restored (None if none could be), and each one skipped before it.

    ``verify(path)`` says why ``path`` cannot be restored, or None; ``restore(path)`` restores
    it, and is called only for a candidate that verified.
    """
    skipped: list[SkippedCheckpoint] = []
    for path in candidates:
        reason = await verify(path)
        if reason is None:
            try:
                await restore(path)
            except Exception as exc:
                reason = f"restore failed: {broken_reason(exc)}"
        if reason is None:
            return path, skipped
        skipped.append(SkippedCheckpoint(path, reason))
    return None, skipped
