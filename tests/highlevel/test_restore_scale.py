"""A restore costs about what a load of the same tensors costs: linear in leaves.

It once rebuilt the reader's entries for every leaf: 1,000 leaves took 6.5 s and 4,000 took
135 s, against 0.06 s for a plain load. Counted, not timed (a timed bound is noise on a busy
2-core machine): the Python and C calls a restore makes are counted for N and for 4N leaves,
and must grow about 4x, where any per-leaf pass over all entries makes them grow 16x.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np

import streamckpt.sync as sc


def _calls_to_restore(root: Path, leaves: int) -> int:
    model = {f"layer{i}": {"w": np.full(4, i, np.float32)} for i in range(leaves)}
    path = sc.Checkpoint(model=model).save(root / f"c{leaves}")
    target = sc.Checkpoint(
        model={f"layer{i}": {"w": np.zeros(4, np.float32)} for i in range(leaves)}
    )
    sc.load(path)  # first-use imports and caches are not the restore's cost
    count = 0

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        nonlocal count
        count += 1

    sys.setprofile(profile)
    try:
        status = target.restore(path)
    finally:
        sys.setprofile(None)
    status.assert_consumed()
    assert target.model[f"layer{leaves - 1}"]["w"].tolist() == [leaves - 1.0] * 4
    return count


def test_restoring_4x_the_leaves_makes_about_4x_the_calls(tmp_path: Path) -> None:
    small = _calls_to_restore(tmp_path, 500)
    large = _calls_to_restore(tmp_path, 2000)
    assert large < 6 * small, (small, large)
