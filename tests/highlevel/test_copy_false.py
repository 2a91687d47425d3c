"""Background saves copy their leaves into one reused buffer, or, with ``copy=False``, not at all.

What is pinned here: ``copy=False`` saves exactly the caller's bytes and streams them from the
caller's own arrays (a change made while the save is held at a gate shows in the checkpoint);
``copy=True`` snapshots every byte of every layout, also when the copy is cut into pieces
that several threads copy (a change after the call returns never shows); the snapshot buffer
of a checkpoint is mapped once and reused; and jax arrays are never copied.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem

import streamckpt.sync
from streamckpt.checkpoint import Checkpoint, SyncCheckpoint
from streamckpt.device import HostTransfer, start_transfers
from streamckpt.manager import CheckpointManager

VV = "/.ATTRIBUTES/VARIABLE_VALUE"
MIB = 1 << 20


class GatedMemoryFS(MemoryFileSystem):  # type: ignore[misc]
    """``memory://`` whose writes wait until the test opens the gate."""

    cachable = False

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        if "w" in mode:
            assert self.gate.wait(10), "the test never opened the gate"
        return super()._open(path, mode, **kwargs)


@pytest.fixture
def gated() -> Iterator[tuple[GatedMemoryFS, str]]:
    fs = GatedMemoryFS()
    yield fs, f"/copy-false-{uuid.uuid4().hex}"
    fs.gate.set()


def odd_layouts() -> dict[str, Any]:
    """Leaves whose bytes a wrong copy would get wrong: NaN payloads, -0.0, every layout."""
    bits = np.array([0x7FC00001, 0xFFC12345, 0x80000000, 0x00000001, 0x7F800000], np.uint32)
    return {
        "nan_payloads": bits.view(np.float32),
        "big_endian": np.arange(12, dtype=">i4").reshape(3, 4),
        "fortran": np.asfortranarray(np.arange(12.0).reshape(3, 4)),
        "strided": np.arange(40, dtype=np.int16)[::3],
        "flags": np.array([True, False, True]),
        "empty": np.zeros((0, 3), np.float32),
        "text": np.array([b"x", b"yz"], dtype=object),
        "scalar": 7,
    }


def large_leaves() -> dict[str, np.ndarray[Any, Any]]:
    """More than the size at which the copy is split among threads, with ragged piece ends."""
    rng = np.random.default_rng(15)
    return {
        "big": rng.standard_normal((9 * MIB + 12) // 4, dtype=np.float32),
        "mid": rng.integers(0, 1 << 62, size=(3 * MIB + 40) // 8, dtype=np.int64),
        "many": {f"t{i:02}": rng.standard_normal(1000 + i, dtype=np.float32) for i in range(40)},
        "last": rng.standard_normal(25 * MIB // 8),
    }


def assert_bit_exact(saved: Any, expected: Any) -> None:
    if isinstance(expected, dict):
        assert set(saved) == set(expected)
        for key, value in expected.items():
            assert_bit_exact(saved[key], value)
    elif isinstance(expected, int):
        assert int(saved) == expected
    else:
        want = np.asarray(expected)
        assert saved.shape == want.shape
        if want.dtype.hasobject:
            assert saved.tolist() == want.tolist()
            return
        assert saved.dtype == want.dtype.newbyteorder("<")
        little = want.astype(want.dtype.newbyteorder("<"))
        assert np.ascontiguousarray(saved).tobytes() == np.ascontiguousarray(little).tobytes()


def deep_copy(tree: dict[str, Any]) -> dict[str, Any]:
    return {
        key: deep_copy(value) if isinstance(value, dict) else np.array(value, copy=True)
        for key, value in tree.items()
    }


def leaves(tree: dict[str, Any]) -> Iterator[Any]:
    for value in tree.values():
        yield from leaves(value) if isinstance(value, dict) else [value]


def snapshot_buffer(ckpt: Checkpoint) -> Any:
    """The checkpoint's snapshot memory (test-visible state; None before the first copy)."""
    return ckpt._snapshots._buffer


def test_copy_false_saves_the_callers_bytes_exactly(tmp_path: Path) -> None:
    tree = odd_layouts() | large_leaves()
    expected = deep_copy(tree)
    with Checkpoint(**tree) as ckpt:
        path = ckpt.save_async(tmp_path / "lent", copy=False).result()
        assert ckpt._snapshots.nbytes == 0  # nothing was copied: no buffer was even mapped
    assert_bit_exact(streamckpt.sync.load_nested(path), {**expected, "save_counter": 1})


def test_copy_false_streams_from_the_callers_arrays(gated: tuple[GatedMemoryFS, str]) -> None:
    """Changed while the save is held before its first write: the change is what is saved.

    This is the very thing ``copy=False`` asks the caller not to do; here it proves that
    the save reads the caller's memory rather than a copy of it.
    """
    fs, root = gated
    weights = np.arange(1 << 16, dtype=np.float32)
    with Checkpoint(w=weights) as ckpt:
        fs.gate.clear()
        handle = ckpt.save_async(f"{root}/c", filesystem=fs, copy=False)
        assert not handle.done()
        weights[:] = -1
        fs.gate.set()
        path = handle.result(timeout=30)
        assert ckpt._snapshots.nbytes == 0
    loaded = streamckpt.sync.load(path, filesystem=fs)
    assert np.array_equal(loaded[f"w{VV}"], np.full(1 << 16, -1, np.float32))


def test_copy_true_saves_every_byte_as_it_was_at_the_call(
    gated: tuple[GatedMemoryFS, str],
) -> None:
    """Every leaf is changed at once after the call: a copy that missed a piece would show."""
    fs, root = gated
    tree = odd_layouts() | large_leaves()
    expected = deep_copy(tree)
    with Checkpoint(**tree) as ckpt:
        fs.gate.clear()
        handle = ckpt.save_async(f"{root}/c", filesystem=fs)
        assert not handle.done()
        for array in leaves(tree):
            if isinstance(array, np.ndarray) and array.dtype.hasobject:
                array[...] = b"changed"
            elif isinstance(array, np.ndarray):
                array[...] = np.logical_not(array) if array.dtype == bool else 1
        ckpt.scalar = 8
        fs.gate.set()
        path = handle.result(timeout=30)
    saved = streamckpt.sync.load_nested(path, filesystem=fs)
    assert_bit_exact(saved, {**expected, "save_counter": 1})


def test_the_snapshot_buffer_is_mapped_once_and_reused(tmp_path: Path) -> None:
    tree = large_leaves()
    with SyncCheckpoint(**tree) as sync:
        ckpt = sync.checkpoint
        sync.save_async(tmp_path / "a").result()
        buffer = snapshot_buffer(ckpt)
        assert buffer is not None and buffer.nbytes >= 37 * MIB
        address = buffer.ctypes.data
        for _ in range(2):
            tree["big"] += 1  # same structure, new values
            sync.save_async(tmp_path / "a").result()
            assert snapshot_buffer(ckpt) is buffer and buffer.ctypes.data == address
        sync.save_async(tmp_path / "a", copy=False).result()  # lends, leaves the buffer be
        assert snapshot_buffer(ckpt) is buffer
        del sync.last  # a smaller structure still fits
        sync.save_async(tmp_path / "a").result()
        assert snapshot_buffer(ckpt) is buffer
    loaded = streamckpt.sync.load_nested(f"{tmp_path / 'a'}-5")
    assert np.array_equal(loaded["big"], tree["big"]) and "last" not in loaded


def test_the_manager_passes_copy_through(tmp_path: Path) -> None:
    weights = np.arange(1000, dtype=np.float32)
    with Checkpoint(w=weights) as ckpt:
        manager = CheckpointManager(ckpt, tmp_path / "run")
        handle = manager.save_async(step=1, copy=False)
        assert handle is not None
        path = handle.result(timeout=30)
        assert ckpt._snapshots.nbytes == 0
        handle = manager.save_async(step=2)
        assert handle is not None and handle.result(timeout=30)
        assert ckpt._snapshots.nbytes > 0
    assert np.array_equal(streamckpt.sync.load_nested(path)["w"], weights)


def test_jax_arrays_are_saved_from_their_own_memory(tmp_path: Path) -> None:
    jnp = pytest.importorskip("jax.numpy")
    x = jnp.arange(1 << 18, dtype=jnp.float32)
    host = start_transfers({"x": x})["x"]
    assert isinstance(host, HostTransfer)
    view = host.result()
    assert view.ctypes.data == x.unsafe_buffer_pointer() and not view.flags.writeable
    with Checkpoint(x=x) as ckpt:
        path = ckpt.save_async(tmp_path / "j").result()  # copy=True, the default
        assert ckpt._snapshots.nbytes < x.nbytes  # only save_counter went into the buffer
    assert np.array_equal(streamckpt.sync.load_nested(path)["x"], np.asarray(x))
