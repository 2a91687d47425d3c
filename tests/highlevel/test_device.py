"""Device arrays reach the host through transfers started up front and waited for per tensor.

On this machine there is no GPU: the CUDA branch of ``streamckpt.device`` is measured on a GPU
machine when one is lent (see the README). What is tested here is the mechanism every device
path goes through: a :class:`HostTransfer` whose bytes arrive later is planned by its size,
waited for only when its own tensor is streamed (so earlier tensors are written meanwhile),
and a background save returns before it completes; and jax arrays (jax's CPU backend is a
device backend too) take that path for real.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import streamckpt
import streamckpt.sync
from streamckpt.device import HostTransfer, is_device_array, start_transfers

pytestmark = pytest.mark.anyio


def slow_transfer(array: np.ndarray[Any, Any], release: threading.Event) -> HostTransfer:
    """A transfer whose bytes arrive only once ``release`` is set (at most 20 s)."""

    def finish() -> np.ndarray[Any, Any]:
        if not release.wait(20):
            raise TimeoutError("the transfer was never released")
        return array

    return HostTransfer(tuple(array.shape), array.dtype, finish)


def test_earlier_tensors_are_written_while_a_transfer_is_in_flight(tmp_path: Path) -> None:
    early = np.arange(1 << 18, dtype=np.float32)  # 1 MiB, first in the shard (name order)
    late = np.arange(1 << 16, dtype=np.int64)
    release = threading.Event()
    written_before_release: list[int] = []
    total = [0]

    def progress(count: int) -> None:
        total[0] += count
        if total[0] >= early.nbytes and not release.is_set():
            written_before_release.append(total[0])
            release.set()  # only a save that wrote `a_early` first gets here

    streamckpt.sync.save(
        tmp_path / "ckpt",
        {"a_early": early, "b_late": slow_transfer(late, release)},
        progress=progress,
        chunk_bytes=1 << 16,
    )
    assert written_before_release and written_before_release[0] >= early.nbytes
    loaded = streamckpt.sync.load(tmp_path / "ckpt")
    assert np.array_equal(loaded["a_early"], early)
    assert np.array_equal(loaded["b_late"], late)


def test_a_background_save_returns_before_the_transfers_complete(tmp_path: Path) -> None:
    release = threading.Event()
    value = np.linspace(0, 1, 1000)
    with streamckpt.Checkpoint(model={"w": slow_transfer(value, release)}) as ckpt:
        handle = ckpt.save_async(tmp_path / "ckpt")
        assert not handle.done()  # returned with the transfer still in flight
        release.set()
        path = handle.result()
    nested = streamckpt.sync.load_nested(path)
    assert np.array_equal(nested["model"]["w"], value)


def test_a_failed_transfer_fails_the_save_and_leaves_nothing(tmp_path: Path) -> None:
    def finish() -> np.ndarray[Any, Any]:
        raise RuntimeError("the device was lost")

    broken = HostTransfer((4,), np.dtype(np.float32), finish)
    with pytest.raises(RuntimeError, match="device was lost"):
        streamckpt.sync.save(tmp_path / "ckpt", {"a": np.ones(3), "b": broken})
    assert list(tmp_path.iterdir()) == []


def test_jax_arrays_take_the_transfer_path(tmp_path: Path) -> None:
    jnp = pytest.importorskip("jax.numpy")
    values = {
        "x": jnp.arange(12, dtype=jnp.float32).reshape(3, 4),
        "y": jnp.ones((5,), dtype=jnp.bfloat16),
        "n": np.arange(3),
    }
    started = start_transfers(values)
    assert isinstance(started["x"], HostTransfer) and isinstance(started["y"], HostTransfer)
    assert started["n"] is values["n"] and not is_device_array(values["n"])
    with streamckpt.Checkpoint(**values) as ckpt:
        path = ckpt.save_async(tmp_path / "ckpt").result()
    loaded = streamckpt.sync.load_nested(path)
    assert np.array_equal(loaded["x"], np.arange(12, dtype=np.float32).reshape(3, 4))
    assert loaded["y"].dtype.name == "bfloat16" and np.array_equal(
        loaded["y"].astype(np.float32), np.ones(5, np.float32)
    )
