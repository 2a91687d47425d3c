"""A restore costs about what a load of the same tensors costs: linear in leaves.

It once rebuilt the reader's entries for every leaf: 1,000 leaves took 6.5 s and 4,000 took
135 s, against 0.06 s for a plain load. The bound here is generous for a noisy 2-core machine
and still fails by far on that quadratic behaviour.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

import streamckpt.sync as sc

LEAVES = 10_000


def test_restoring_10000_leaves_costs_about_a_load(tmp_path: Path) -> None:
    model = {f"layer{i}": {"w": np.full(4, i, np.float32)} for i in range(LEAVES)}
    path = sc.Checkpoint(model=model).save(tmp_path / "c")
    target = sc.Checkpoint(
        model={f"layer{i}": {"w": np.zeros(4, np.float32)} for i in range(LEAVES)}
    )

    loads, restores = [], []
    for _ in range(2):
        started = time.perf_counter()
        loaded = sc.load(path)
        loads.append(time.perf_counter() - started)
        started = time.perf_counter()
        target.restore(path).assert_consumed()
        restores.append(time.perf_counter() - started)

    assert len(loaded) == LEAVES + 2  # the leaves, save_counter and the object graph
    assert target.model["layer9999"]["w"].tolist() == [9999.0] * 4
    assert min(restores) < 6 * min(loads) + 1.0, (restores, loads)
