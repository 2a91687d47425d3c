"""How long ``Checkpoint.save_async`` stalls the caller, and what background saves cost a loop.

Part 1 (workload A: ~1 GiB of float32 in ~200 tensors of mixed sizes) times the blocking part
of ``save_async`` (the snapshot copy) next to a plain numpy copy of the same bytes, into fresh
memory (``t.copy()`` per tensor) and into preallocated memory (``np.copyto``). The first
``save_async`` of a checkpoint pays for the buffer's page faults and the loop's start; later
ones reuse both, so they are reported apart ("cold" and "warm").

Part 2 runs a training-like loop (fixed number of numpy matmuls that also update one weight)
without saves, with a ``save_async`` every K steps, and with the same saves at low CPU
priority (``background_nice=19``), interleaving the three, and reports the slowdown, the loop
time each save costs, and the save interval at which that cost stays under 5%. The background
save (crc32c, copies into the page cache, fsync) competes with the step for cores and caches;
on a 2-core VM that is most of the cost, and the table says so rather than hiding it.

    python scripts/bench_async_save.py [--size-gib 1] [--runs 5] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from streamckpt.checkpoint import Checkpoint

GIB = 1 << 30


def workload_a(total_bytes: int, count: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``count`` float32 tensors whose sizes spread over three orders of magnitude."""
    rng = np.random.default_rng(seed)
    weights = np.exp(rng.uniform(0, np.log(1000), count))
    elements = np.maximum((weights / weights.sum() * total_bytes / 4).astype(int), 1)
    tensors = {}
    for i, n in enumerate(elements):
        cols = 256 if n >= 256 else 1
        tensors[f"layer_{i:03d}"] = rng.standard_normal((int(n) // cols, cols), np.float32)
    return tensors


def median_seconds(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine() -> str:
    cpu = "unknown cpu"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    return (
        f"{platform.machine()} {cpu}, {os.cpu_count()} cores, {mem_kib / (1 << 20):.0f} GiB RAM, "
        f"Python {platform.python_version()}, numpy {np.__version__}"
    )


def bench_blocking(tensors: dict[str, np.ndarray], directory: Path, runs: int) -> None:
    """Each run times the three copies back to back, after the previous run's save finished.

    The machine's memory state after a 1 GiB write (page cache churn, the previous run's files
    removed) changes copy speed by tens of percent on a small VM, so the plain copies are
    measured under the same conditions as ``save_async`` instead of in a separate quiet loop.
    """
    nbytes = sum(t.nbytes for t in tensors.values())
    buffer = np.empty(nbytes, np.uint8)
    buffer[:] = 0  # fault the pages in once, as a reused buffer has them

    def into_fresh() -> None:
        copies = [t.copy() for t in tensors.values()]
        del copies

    def into_preallocated() -> None:
        offset = 0
        for t in tensors.values():
            np.copyto(buffer[offset : offset + t.nbytes].view(np.float32).reshape(t.shape), t)
            offset += t.nbytes

    times: dict[str, list[float]] = {"fresh": [], "preallocated": [], "blocking": [], "io": []}
    with Checkpoint(model=tensors) as ckpt:
        for _ in range(runs + 1):
            times["fresh"].append(median_seconds(into_fresh, 1))
            times["preallocated"].append(median_seconds(into_preallocated, 1))
            start = time.perf_counter()
            handle = ckpt.save_async(directory / "a")
            returned = time.perf_counter()
            handle.result()
            times["blocking"].append(returned - start)
            times["io"].append(time.perf_counter() - returned)
            shutil.rmtree(directory)
            directory.mkdir()
    cold = times["blocking"][0]
    fresh, preallocated, warm, io = (statistics.median(times[k][1:]) for k in times)
    rows = [
        ("plain copy into fresh memory (t.copy())", fresh),
        ("plain copy into preallocated memory (np.copyto)", preallocated),
        ("save_async blocking, first call (cold)", cold),
        ("save_async blocking, later calls (warm)", warm),
        ("  background I/O after save_async returned", io),
    ]
    print(f"\nworkload A: {len(tensors)} float32 tensors, {nbytes / GIB:.3f} GiB, median of {runs}")
    print(f"{'operation':<52} {'seconds':>8} {'GiB/s':>7}")
    for label, seconds in rows:
        print(f"{label:<52} {seconds:8.3f} {nbytes / GIB / seconds:7.2f}")
    ratios = [b / p for b, p in zip(times["blocking"][1:], times["preallocated"][1:], strict=True)]
    print(
        f"warm save_async / copy into preallocated memory: {warm / preallocated:.2f}x "
        f"(median of per-run ratios {statistics.median(ratios):.2f}x)"
    )
    print(f"warm save_async / copy into fresh memory:        {warm / fresh:.2f}x")
    print(f"first save_async / copy into fresh memory:       {cold / fresh:.2f}x")


def bench_training(
    tensors: dict[str, np.ndarray], directory: Path, runs: int, steps: int, every: int, dim: int
) -> None:
    """Loop time without saves, with saves, and with saves at low CPU priority, interleaved."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((dim, dim), np.float32)
    b = rng.standard_normal((dim, dim), np.float32)
    weight = next(iter(tensors.values()))

    def train(ckpt: Checkpoint | None, prefix: str = "t") -> tuple[float, float]:
        start = time.perf_counter()
        handle = None
        for step in range(1, steps + 1):
            c = a @ b
            weight.flat[step % weight.size] += float(c[0, 0]) * 1e-9
            if ckpt is not None and step % every == 0 and step < steps:
                handle = ckpt.save_async(directory / prefix)
        loop = time.perf_counter() - start
        if handle is not None:
            handle.result()
        return loop, time.perf_counter() - start

    labels = {None: "save_async, default priority", 19: "save_async, background_nice=19"}
    loops: dict[str, list[float]] = {"no saves": []}
    drained: dict[str, list[float]] = {}
    checkpoints = {
        label: Checkpoint(background_nice=nice, model=tensors) for nice, label in labels.items()
    }
    try:
        for label, ckpt in checkpoints.items():
            ckpt.save_async(directory / f"warmup {label}").result()  # buffer and loop ready
        for _ in range(runs):
            loops["no saves"].append(train(None)[0])
            for label, ckpt in checkpoints.items():
                loop, total = train(ckpt, label)
                loops.setdefault(label, []).append(loop)
                drained.setdefault(label, []).append(total)
                shutil.rmtree(directory)
                directory.mkdir()
    finally:
        for ckpt in checkpoints.values():
            ckpt.close()

    saves = len(range(every, steps, every))
    base = statistics.median(loops["no saves"])
    print(
        f"\ntraining-like loop: {steps} steps of a {dim}x{dim} float32 matmul "
        f"({base / steps * 1000:.0f} ms/step), save_async every {every} steps "
        f"({saves} saves/run), median of {runs}"
    )
    header = f"{'loop':<40} {'loop s':>7} {'vs base':>8} {'drained':>8} {'lost/save':>10}"
    print(header)
    print(f"{'no saves':<40} {base:7.2f} {'':>8} {'':>8} {'':>10}")
    for label in labels.values():
        loop = statistics.median(loops[label])
        total = statistics.median(drained[label])
        lost = (loop - base) / saves
        print(f"{label:<40} {loop:7.2f} {loop / base:8.3f} {total / base:8.3f} {lost:9.2f}s")
        interval = max(lost, 0) / 0.05
        print(f"{'':<40} slowdown < 5% needs a save every >= {interval:.0f} s of compute")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gib", type=float, default=1.0)
    parser.add_argument("--tensors", type=int, default=200)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--train-runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--dir", type=Path, default=None, help="scratch directory (local disk)")
    parser.add_argument("--skip-training", action="store_true")
    args = parser.parse_args()

    print(machine())
    tensors = workload_a(int(args.size_gib * GIB), args.tensors)
    with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        directory = Path(scratch) / "ckpt"
        directory.mkdir()
        bench_blocking(tensors, directory, args.runs)
        if not args.skip_training:
            bench_training(tensors, directory, args.train_runs, args.steps, args.every, args.dim)


if __name__ == "__main__":
    main()
