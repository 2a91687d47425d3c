"""The benchmark workloads, each defined once, at any size.

Rule: every benchmark takes its tensors from here, so "workload A" means the same thing in
every table. All values are float32 copies of slices of one seeded random pool, so a reader
can regenerate the expected data without keeping a second copy (``expected_views``).

- A (``workload_a``): ``count`` tensors whose sizes are log-spread from 4 KiB to ``hi``
  (32 MiB at 256 MiB and more, total/8 below), skewed so they sum to ``total`` bytes, in a
  seeded shuffled order. ``workload_a(GIB)`` is the README's workload A (1 GiB in 200 tensors
  of 4 KiB to 32 MiB); the object-store benchmark uses 512 and 256 MiB, the smoke runs a few
  MiB.
- B (``workload_b``): ``count`` tensors of 1 to 64 KiB, log-uniform; ``workload_b(20_000)``
  is the README's workload B.
- ``small_and_big``: ``small`` 1 KiB tensors plus ``big`` tensors of ``big_bytes`` each, for
  ``read_tensor`` round trips; ``one_big``: one large tensor plus 16 KiB ones, for peak RSS.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
MB = 1e6

_POOL_SEED = 20240611
_POOL_ELEMS = 12 * MIB  # 48 MiB of random float32; every tensor is a copied slice of it


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    tensors: tuple[tuple[str, tuple[int, ...]], ...]  # (name, shape), all float32

    @property
    def nbytes(self) -> int:
        return sum(4 * math.prod(shape) for _, shape in self.tensors)


def mixed_sizes(count: int, total: int, lo: int, hi: int) -> list[int]:
    """``count`` sizes log-spread from ``lo`` to ``hi`` bytes, skewed to sum to ~``total``.

    Size i is ``lo * (hi/lo) ** (q_i ** p)`` with q_i evenly spaced in (0, 1); the exponent p
    is found by bisection. Sizes are rounded to 4 KiB. Deterministic.
    """
    ratio = hi / lo

    def sizes(p: float) -> list[int]:
        out = []
        for i in range(count):
            q = ((i + 0.5) / count) ** p
            out.append(max(lo, round(lo * ratio**q / (4 * KIB)) * 4 * KIB))
        return out

    low, high = 0.05, 20.0  # small p -> big sizes
    for _ in range(60):
        mid = (low + high) / 2
        if sum(sizes(mid)) > total:
            low = mid
        else:
            high = mid
    return sizes((low + high) / 2)


def workload_a(total: int = GIB, count: int = 200) -> Workload:
    """Workload A at ``total`` bytes: ``count`` tensors of 4 KiB to min(32 MiB, total / 8)."""
    hi = max(16 * KIB, min(32 * MIB, total // 8))
    sizes = mixed_sizes(count, total, 4 * KIB, hi)
    order = np.random.default_rng(1).permutation(count)  # sizes interleaved, not sorted
    tensors = []
    for j, i in enumerate(order):
        n = sizes[int(i)] // 4
        shape: tuple[int, ...] = (n,) if n <= 4096 else (n // 256, 256)
        tensors.append((f"model/layer_{j:03d}/{'bias' if n <= 4096 else 'kernel'}", shape))
    size = sum(sizes)
    scale = f"{size / GIB:.3f} GiB" if size >= GIB else f"{size / MIB:.0f} MiB"
    return Workload(
        "A", f"{count} float32 tensors, 4 KiB..{hi / MIB:g} MiB log-mixed, {scale}", tuple(tensors)
    )


def workload_b(count: int = 20_000) -> Workload:
    """Workload B: ``count`` float32 tensors of 1 to 64 KiB, log-uniform."""
    rng = np.random.default_rng(2)
    nbytes = np.exp(rng.uniform(math.log(KIB), math.log(64 * KIB), size=count))
    elems = np.maximum(256, (nbytes // 4).astype(np.int64))
    tensors = tuple(
        (f"blocks/b{i // 20:04d}/p{i % 20:02d}", (int(n),)) for i, n in enumerate(elems)
    )
    total = int(elems.sum()) * 4
    return Workload(
        "B", f"{count:,} float32 tensors, 1..64 KiB log-uniform, {total / MIB:.0f} MiB", tensors
    )


def small_and_big(small: int, big: int, big_bytes: int = 16 * MIB) -> Workload:
    """``small`` tensors of 1 KiB and ``big`` tensors of ``big_bytes`` (read_tensor trips)."""
    tensors: list[tuple[str, tuple[int, ...]]] = [(f"small/t{i:05d}", (256,)) for i in range(small)]
    tensors += [(f"big/w{j}", (big_bytes // 4 // 256, 256)) for j in range(big)]
    return Workload(
        "R", f"{small:,} x 1 KiB + {big} x {big_bytes / MIB:g} MiB float32", tuple(tensors)
    )


def one_big(big_bytes: int, small: int) -> Workload:
    """One ``big_bytes`` tensor and ``small`` tensors of 16 KiB (bounded-memory runs)."""
    tensors: list[tuple[str, tuple[int, ...]]] = [("big/embedding", (big_bytes // 4 // 1024, 1024))]
    tensors += [(f"small/p{i:04d}", (4 * KIB,)) for i in range(small)]
    return Workload("M", f"1 x {big_bytes / MIB:g} MiB + {small} x 16 KiB float32", tuple(tensors))


@functools.cache
def _pool() -> np.ndarray[Any, Any]:
    pool = np.random.default_rng(_POOL_SEED).random(_POOL_ELEMS, dtype=np.float32)
    pool.flags.writeable = False
    return pool


def _values(i: int, shape: tuple[int, ...], *, copy: bool) -> np.ndarray[Any, Any]:
    """Tensor i's values: a read-only view of the pool, or a copy when ``copy``.

    A tensor larger than the pool is the pool tiled, filled in pool-sized pieces so that
    making it needs no temporary of its size (the bounded-memory runs read peak RSS).
    """
    n = math.prod(shape)
    pool = _pool()
    if n > _POOL_ELEMS:
        out = np.empty(n, np.float32)
        for start in range(0, n, _POOL_ELEMS):
            stop = min(n, start + _POOL_ELEMS)
            out[start:stop] = pool[: stop - start]
        return out.reshape(shape)
    start = (i * 1_000_003) % (_POOL_ELEMS - n + 1)
    view = pool[start : start + n].reshape(shape)
    return view.copy() if copy else view


def forget_pool() -> None:
    """Free the pool the values are made from (it is made again when next needed)."""
    _pool.cache_clear()


def expected_views(wl: Workload) -> dict[str, np.ndarray[Any, Any]]:
    """The workload's values, without copying where possible (to check a restore against)."""
    return {name: _values(i, shape, copy=False) for i, (name, shape) in enumerate(wl.tensors)}


def make_arrays(wl: Workload) -> dict[str, np.ndarray[Any, Any]]:
    """The workload's values as separate, writable arrays (what a model holds)."""
    return {name: _values(i, shape, copy=True) for i, (name, shape) in enumerate(wl.tensors)}


def check_equal(expected: dict[str, Any], got: dict[str, Any], who: str) -> None:
    """Raise unless ``got`` has exactly ``expected``'s names, shapes and float32 values."""
    if set(expected) != set(got):
        missing = sorted(set(expected) ^ set(got))[:3]
        raise AssertionError(f"{who}: restored names differ from the saved ones ({missing})")
    for name, value in expected.items():
        other = np.asarray(got[name])
        if other.dtype != np.float32 or other.shape != value.shape:
            raise AssertionError(f"{who}: tensor {name} has {other.dtype} {other.shape}")
        if not np.array_equal(other, value):
            raise AssertionError(f"{who}: tensor {name} differs after restore")


def by_name(name: str, total: int, count: int) -> Workload:
    """Workload ``name`` as ``workload_a(total, count)`` or ``workload_b(count)``."""
    if name not in ("A", "B"):
        raise ValueError(f"unknown workload {name!r}")
    return workload_a(total, count) if name == "A" else workload_b(count)
