"""A small checkpoint for the command-line tests, built once per module."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import streamckpt.sync


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """emb (128x64 float32), a bfloat16 matrix, an int64 step and a string, in 2 shards."""
    prefix = str(tmp_path_factory.mktemp("cli") / "ckpt-7")
    rng = np.random.default_rng(0)
    streamckpt.sync.save(
        prefix,
        {
            "emb": rng.standard_normal((128, 64), dtype=np.float32),
            "half": (np.arange(6, dtype=np.float32).reshape(2, 3) / 3).astype(ml_dtypes.bfloat16),
            "step": np.int64(1000),
            "name": b"model",
        },
        num_shards=2,
    )
    return prefix
