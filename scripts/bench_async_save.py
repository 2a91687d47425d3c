"""How long ``Checkpoint.save_async`` stalls the caller, and what background saves cost a loop.

Part 1 (workload A: ~1 GiB of float32 in ~200 tensors of mixed sizes) times the blocking part
of ``save_async`` (the snapshot copy) next to a plain numpy copy of the same bytes, into fresh
memory (``t.copy()`` per tensor) and into preallocated memory (``np.copyto``). Later saves of
a checkpoint reuse its snapshot buffer ("warm"); the first one maps it ("cold"), and is timed
against the first plain copy, each in a fresh process of its own.

Part 2 runs a training-like loop (numpy matmuls that also update one weight) without saves and
with a ``save_async`` every ``--interval`` seconds of compute, at the default (normal) CPU
priority of the background save and at ``background_nice=19``, interleaved. Every
step is timed, so the table splits a save's cost into the step that takes the snapshot and the
steps that run while its I/O is in flight, and gives the slowdown of the whole loop.

    python scripts/bench_async_save.py [--size-gib 1] [--runs 5] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
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
    fresh, preallocated, warm, io = (statistics.median(times[k][1:]) for k in times)
    rows = [
        ("plain copy into fresh memory (t.copy())", fresh),
        ("plain copy into preallocated memory (np.copyto)", preallocated),
        ("save_async blocking, buffer reused (warm)", warm),
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


def cold_probe(kind: str, size_gib: float, count: int, directory: Path) -> None:
    """In a fresh process: time the first copy of the workload, by ``t.copy()`` or save_async."""
    tensors = workload_a(int(size_gib * GIB), count)
    start = time.perf_counter()
    if kind == "copy":
        copies = [t.copy() for t in tensors.values()]
        seconds = time.perf_counter() - start
        del copies
    else:
        with Checkpoint(model=tensors) as ckpt:
            handle = ckpt.save_async(directory / "cold")
            seconds = time.perf_counter() - start
            handle.result()
    print(f"{seconds:.6f}")


def bench_cold(size_gib: float, count: int, directory: Path, runs: int) -> None:
    """First copy of a process against first save_async of a process, alternating processes.

    Inside one process the first touch of fresh memory is much dearer than later ones (the VM
    backs pages on first use, and glibc and numpy recycle freed memory), so each cold number
    comes from a process of its own.
    """
    times: dict[str, list[float]] = {"copy": [], "save_async": []}
    for _ in range(runs):
        for kind in times:
            command = [sys.executable, __file__, "--cold-probe", kind, "--size-gib", str(size_gib)]
            command += ["--tensors", str(count), "--dir", str(directory)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            times[kind].append(float(done.stdout.split()[-1]))
            shutil.rmtree(directory)
            directory.mkdir()
    copy, save = (statistics.median(v) for v in times.values())
    print(f"\nfirst operation of a fresh process, median of {runs} processes each")
    print(f"{'plain copy into fresh memory (t.copy())':<52} {copy:8.3f}")
    print(f"{'save_async blocking (snapshot buffer mapped, filled)':<52} {save:8.3f}")
    print(f"first save_async / first plain copy:             {save / copy:.2f}x")


def bench_training(
    tensors: dict[str, np.ndarray],
    directory: Path,
    runs: int,
    interval_s: float,
    saves: int,
    dim: int,
) -> None:
    """Loop time without saves and with ``save_async`` every ``interval_s`` of compute.

    Each step's time is recorded, so the cost of a save splits into the step that takes the
    snapshot (the blocking copy) and the steps that run while the save's I/O is in flight
    ("while saves run"); the loop's total slowdown at this save interval is the sum.
    """
    rng = np.random.default_rng(1)
    a = rng.standard_normal((dim, dim), np.float32)
    b = rng.standard_normal((dim, dim), np.float32)
    weight = next(iter(tensors.values()))

    def step(index: int) -> None:
        c = a @ b
        weight.flat[index % weight.size] += float(c[0, 0]) * 1e-9

    for i in range(20):
        step(i)
    step_s = median_seconds(lambda: step(0), 50)
    every = max(1, round(interval_s / step_s))
    steps = every * (saves + 1)

    def train(ckpt: Checkpoint | None, prefix: str) -> tuple[float, list[float], list[str]]:
        """Loop seconds, each step's seconds, and what each step overlapped."""
        times: list[float] = []
        phase: list[str] = []
        handle = None
        start = time.perf_counter()
        for index in range(1, steps + 1):
            began = time.perf_counter()
            saving = ckpt is not None and index % every == 0 and index < steps
            if saving:
                handle = ckpt.save_async(directory / prefix)  # type: ignore[union-attr]
            step(index)
            times.append(time.perf_counter() - began)
            if saving:
                phase.append("snapshot")
            elif handle is not None and not handle.done():
                phase.append("io")
            else:
                phase.append("")
        loop = time.perf_counter() - start
        if handle is not None:
            handle.result()
        return loop, times, phase

    labels = {None: "save_async (default priority)", 19: "save_async, background_nice=19"}
    loops: dict[str, list[float]] = {"no saves": []}
    snapshot: dict[str, list[float]] = {}
    io_steps: dict[str, list[float]] = {}
    checkpoints = {
        label: Checkpoint(background_nice=nice, model=tensors) for nice, label in labels.items()
    }
    try:
        for label, ckpt in checkpoints.items():
            ckpt.save_async(directory / f"warmup {label}").result()  # buffer and loop ready
        for _ in range(runs):
            loops["no saves"].append(train(None, "none")[0])
            for label, ckpt in checkpoints.items():
                loop, times, phase = train(ckpt, label)
                loops.setdefault(label, []).append(loop)
                snapshot.setdefault(label, []).extend(
                    t for t, p in zip(times, phase, strict=True) if p == "snapshot"
                )
                io_steps.setdefault(label, []).extend(
                    t for t, p in zip(times, phase, strict=True) if p == "io"
                )
                shutil.rmtree(directory)
                directory.mkdir()
    finally:
        for ckpt in checkpoints.values():
            ckpt.close()

    base = statistics.median(loops["no saves"])
    base_step = base / steps
    print(
        f"\ntraining-like loop: {dim}x{dim} float32 matmul steps ({base_step * 1000:.1f} ms/step), "
        f"save_async every {every} steps ({every * base_step:.1f} s of compute), {saves} saves "
        f"per run, median of {runs} runs"
    )
    print(
        f"{'loop':<42} {'loop s':>7} {'slowdown':>9} {'snapshot':>9} {'I/O steps':>10} "
        f"{'while saving':>13}"
    )
    print(f"{'no saves':<42} {base:7.2f}")
    for label in labels.values():
        loop = statistics.median(loops[label])
        during = io_steps[label]
        slowed = statistics.mean(during) / base_step - 1 if during else 0.0
        snap = statistics.median(snapshot[label]) - base_step
        print(
            f"{label:<42} {loop:7.2f} {loop / base - 1:8.1%} {snap:8.3f}s "
            f"{len(during) / (runs * saves):10.0f} {slowed:12.1%}"
        )
    print(
        "  slowdown: whole loop against no saves; snapshot: extra seconds of the step that "
        "takes it;\n  I/O steps: steps per save that overlap its background I/O; while "
        "saving: how much slower those steps ran"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gib", type=float, default=1.0)
    parser.add_argument("--tensors", type=int, default=200)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--train-runs", type=int, default=3)
    parser.add_argument("--interval", type=float, default=8.0, help="seconds between saves")
    parser.add_argument("--saves", type=int, default=2, help="saves per training run")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--dir", type=Path, default=None, help="scratch directory (local disk)")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--cold-probe", choices=["copy", "save_async"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cold_probe:
        cold_probe(args.cold_probe, args.size_gib, args.tensors, args.dir)
        return

    print(machine())
    tensors = workload_a(int(args.size_gib * GIB), args.tensors)
    with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        directory = Path(scratch) / "ckpt"
        directory.mkdir()
        bench_blocking(tensors, directory, args.runs)
        bench_cold(args.size_gib, args.tensors, directory, max(3, args.runs // 2))
        if not args.skip_training:
            bench_training(tensors, directory, args.train_runs, args.interval, args.saves, args.dim)


if __name__ == "__main__":
    main()
