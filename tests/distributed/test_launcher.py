"""The multi-process launcher that the distributed tests stand on."""

from __future__ import annotations

from support.processes import run_workers, values


def test_every_rank_runs_and_returns() -> None:
    got = values(run_workers("workers_smoke:echo", 3, kwargs={"word": "hi"}, timeout=60))
    assert got == [(0, 3, "hi"), (1, 3, "hi"), (2, 3, "hi")]


def test_a_failing_rank_is_reported() -> None:
    results = run_workers("workers_smoke:fail", 2, timeout=60)
    assert results[0].ok
    assert not results[1].ok and isinstance(results[1].error, ValueError)
