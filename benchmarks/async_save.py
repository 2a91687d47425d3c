"""How long ``Checkpoint.save_async`` stalls the caller, and what background saves cost a loop.

Part 1, on workload A (1 GiB in 200 tensors by default), times the blocking part of
``save_async``, with ``copy=True`` (the snapshot copy into the checkpoint's reused buffer) and
``copy=False`` (the leaves lent, no copy), run after run under the same conditions as its
baselines: one memcpy of the same bytes (one contiguous block) into already-mapped memory,
the issue's measure of "memcpy speed"; a numpy copy per tensor into preallocated memory
(``np.copyto``); and per tensor into fresh memory (``t.copy()``). Later saves of a checkpoint
reuse its snapshot buffer ("warm"); the first one of a process maps it ("cold"), timed in
fresh processes against the first plain copy, together with the second save of that process.

Part 2 runs a training-like loop (numpy matmuls that also update one weight) without saves
and with a ``save_async`` every --interval seconds of compute, at the default CPU priority of
the background save and at ``background_nice=19``, interleaved. Every step is timed, so a
save's cost splits into the step that takes the snapshot and the steps that run while its I/O
is in flight, beside the slowdown of the whole loop.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import harness
from benchmarks.report import Percent, Times, print_table, spread
from benchmarks.workloads import GIB, MIB, make_arrays, workload_a


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size-mib", type=int, help="workload A's size (default 1024; quick 8)")
    p.add_argument("--tensors", type=int, help="workload A's tensors (default 200; quick 40)")
    p.add_argument("--runs", type=int, help="part 1 runs (default 7; quick 1)")
    p.add_argument("--train-runs", type=int, help="part 2 runs (default 3; quick 1)")
    p.add_argument("--interval", type=float, help="seconds of compute between saves (8)")
    p.add_argument("--saves", type=int, default=2, help="saves per training run (default 2)")
    p.add_argument("--dim", type=int, help="matmul size of a training step (default 1024)")
    p.add_argument("--skip-training", action="store_true", help="part 1 only")


def _defaults(args: argparse.Namespace) -> None:
    quick = args.quick
    for name, full, small in (
        ("size_mib", 1024, 8),
        ("tensors", 200, 40),
        ("runs", 7, 1),
        ("train_runs", 3, 1),
        ("interval", 8.0, 0.01),
        ("dim", 1024, 256),
    ):
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    if quick:
        args.saves = 1


def blocking(tensors: dict[str, np.ndarray[Any, Any]], directory: Path, runs: int) -> Any:
    """Each run times the copies back to back, after the previous run's save finished
    (the memory state after a large write changes copy speed by tens of percent on a small
    VM, so the plain copies are measured under the same conditions as ``save_async``)."""
    import streamckpt

    nbytes = sum(t.nbytes for t in tensors.values())
    source = np.concatenate([t.reshape(-1).view(np.uint8) for t in tensors.values()])
    mapped = np.ones(nbytes, np.uint8)  # every page written once: mapped, as a reused buffer is

    def one_memcpy() -> None:
        np.copyto(mapped, source)

    def into_fresh() -> None:
        copies = [t.copy() for t in tensors.values()]
        del copies

    def into_preallocated() -> None:
        offset = 0
        for t in tensors.values():
            np.copyto(mapped[offset : offset + t.nbytes].view(np.float32).reshape(t.shape), t)
            offset += t.nbytes

    def call_returns(ckpt: Any, copy: bool) -> tuple[float, float]:
        start = time.perf_counter()
        handle = ckpt.save_async(directory / "a", copy=copy)
        returned = time.perf_counter()
        handle.result()
        shutil.rmtree(directory)
        directory.mkdir()
        return returned - start, time.perf_counter() - returned

    keys = ("memcpy", "prealloc", "fresh", "copy", "lend", "io")
    times: dict[str, list[float]] = {k: [] for k in keys}
    loads = [os.getloadavg()[0]]
    with streamckpt.Checkpoint(model=tensors) as ckpt:
        for _ in range(runs + 1):  # the first run maps the snapshot buffer: not counted
            times["memcpy"].append(harness.seconds_of(one_memcpy))
            times["prealloc"].append(harness.seconds_of(into_preallocated))
            times["fresh"].append(harness.seconds_of(into_fresh))
            seconds, io = call_returns(ckpt, copy=True)
            times["copy"].append(seconds)
            times["io"].append(io)
            times["lend"].append(call_returns(ckpt, copy=False)[0])
            loads.append(os.getloadavg()[0])
    kept = {k: v[1:] for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in kept.items()}
    labels = {
        "memcpy": "one memcpy of the same bytes into mapped memory",
        "prealloc": "plain copy per tensor into mapped memory (np.copyto)",
        "fresh": "plain copy per tensor into fresh memory (t.copy())",
        "copy": "save_async returns, copy=True, buffer reused (warm)",
        "lend": "save_async returns, copy=False (leaves lent)",
        "io": "  background I/O after save_async returned",
    }
    print_table(
        f"Part 1: save_async's blocking copy (or lend), workload A ({len(tensors)} tensors, "
        f"{nbytes / GIB:.3f} GiB), median of {runs}; 1-min load average "
        f"{min(loads):.2f}..{max(loads):.2f} on {os.cpu_count()} cores",
        ["operation", "seconds", "min..max", "GiB/s", "vs one memcpy"],
        [
            [label, med[k], spread(kept[k]), nbytes / GIB / med[k], Times(med[k] / med["memcpy"])]
            for k, label in labels.items()
        ],
    )
    per_run = [b / m for b, m in zip(kept["copy"], kept["memcpy"], strict=True)]
    print(
        f"warm save_async / one memcpy into mapped memory: {med['copy'] / med['memcpy']:.2f}× "
        f"(per-run ratios median {statistics.median(per_run):.2f}×, "
        f"{min(per_run):.2f}..{max(per_run):.2f}; goal ≤ 1.2×); copy=False returns in "
        f"{med['lend'] * 1e3:.1f} ms (goal ≤ 50 ms)"
    )
    return {"seconds": kept, "bytes": nbytes, "load_1min": loads}


def cold_probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Child: the first copy of a fresh process, by ``t.copy()`` or by ``save_async``.

    ``save_async`` also times the second save of the process (the buffer then reused);
    ``lend`` times a first ``save_async(copy=False)``.
    """
    from streamckpt import Checkpoint  # imported before the timer (it loads lazily)

    tensors = make_arrays(workload_a(spec["size"], spec["count"]))
    start = time.perf_counter()
    if spec["kind"] == "copy":
        copies = [t.copy() for t in tensors.values()]
        seconds = time.perf_counter() - start
        del copies
        return {"seconds": seconds}
    with Checkpoint(model=tensors) as ckpt:
        handle = ckpt.save_async(os.path.join(spec["dir"], "cold"), copy=spec["kind"] != "lend")
        seconds = time.perf_counter() - start
        handle.result()
        if spec["kind"] == "lend":
            return {"seconds": seconds}
        start = time.perf_counter()
        handle = ckpt.save_async(os.path.join(spec["dir"], "cold"))
        second = time.perf_counter() - start
        handle.result()
    return {"seconds": seconds, "second": second}


def cold(args: argparse.Namespace, directory: Path, runs: int) -> Any:
    """First copy against first save_async, in alternating fresh processes (inside one
    process the first touch of fresh memory is much dearer than later ones)."""
    times: dict[str, list[float]] = {"copy": [], "save_async": [], "second": [], "lend": []}
    spec = {"size": args.size_mib * MIB, "count": args.tensors, "dir": str(directory)}
    loads = [os.getloadavg()[0]]
    for i in range(runs):
        for kind in ("copy", "save_async", "lend"):
            result = harness.run_child(
                "async_save.cold_probe",
                spec | {"kind": kind},
                workdir=str(directory.parent),
                label=f"cold-{kind}-{i}",
            )
            if not result.get("ok"):
                raise RuntimeError(f"cold probe {kind} failed: {result['error']}")
            times[kind].append(result["seconds"])
            if "second" in result:
                times["second"].append(result["second"])
            shutil.rmtree(directory)
            directory.mkdir()
            loads.append(os.getloadavg()[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    labels = {
        "copy": "plain copy into fresh memory (t.copy())",
        "save_async": "first save_async returns (buffer mapped, filled)",
        "second": "second save_async of that process (buffer reused)",
        "lend": "first save_async(copy=False) returns",
    }
    print_table(
        f"Part 1, cold: the first operation of a fresh process, median of {runs} processes "
        f"each; 1-min load average {min(loads):.2f}..{max(loads):.2f}",
        ["operation", "seconds", "min..max", "vs first copy"],
        [
            [label, med[k], spread(times[k]), None if k == "copy" else Times(med[k] / med["copy"])]
            for k, label in labels.items()
        ],
    )
    return {"seconds": times, "load_1min": loads}


def training(tensors: dict[str, Any], directory: Path, args: argparse.Namespace) -> Any:
    """Loop time without saves and with ``save_async`` every ``--interval`` of compute."""
    import streamckpt

    rng = np.random.default_rng(1)
    a = rng.standard_normal((args.dim, args.dim), np.float32)
    b = rng.standard_normal((args.dim, args.dim), np.float32)
    weight = next(iter(tensors.values()))

    def step(index: int) -> None:
        c = a @ b
        weight.flat[index % weight.size] += float(c[0, 0]) * 1e-9

    for i in range(20):
        step(i)
    step_s = statistics.median(harness.seconds_of(lambda: step(0)) for _ in range(50))
    every = max(1, round(args.interval / step_s))
    steps = every * (args.saves + 1)

    def train(ckpt: Any, prefix: str) -> tuple[float, list[tuple[float, str]]]:
        """Loop seconds; each step's seconds and what it overlapped (snapshot, io, '')."""
        record: list[tuple[float, str]] = []
        handle = None
        start = time.perf_counter()
        for index in range(1, steps + 1):
            began = time.perf_counter()
            saving = ckpt is not None and index % every == 0 and index < steps
            if saving:
                handle = ckpt.save_async(directory / prefix)
            step(index)
            busy = handle is not None and not handle.done()
            phase = "snapshot" if saving else ("io" if busy else "")
            record.append((time.perf_counter() - began, phase))
        loop = time.perf_counter() - start
        if handle is not None:
            handle.result()
        return loop, record

    labels = {None: "save_async (default priority)", 19: "save_async, background_nice=19"}
    loops: dict[str, list[float]] = {"no saves": []}
    steps_by: dict[str, list[tuple[float, str]]] = {}
    checkpoints = {
        label: streamckpt.Checkpoint(background_nice=nice, model=tensors)
        for nice, label in labels.items()
    }
    try:
        for label, ckpt in checkpoints.items():
            ckpt.save_async(directory / f"warmup {label}").result()  # buffer and loop ready
        for _ in range(args.train_runs):
            loops["no saves"].append(train(None, "none")[0])
            for label, ckpt in checkpoints.items():
                loop, record = train(ckpt, label)
                loops.setdefault(label, []).append(loop)
                steps_by.setdefault(label, []).extend(record)
                shutil.rmtree(directory)
                directory.mkdir()
    finally:
        for ckpt in checkpoints.values():
            ckpt.close()
    base = statistics.median(loops["no saves"])
    base_step = base / steps
    rows: list[list[Any]] = [["no saves", base, spread(loops["no saves"], 2)]]
    for label in labels.values():
        loop = statistics.median(loops[label])
        io = [t for t, p in steps_by[label] if p == "io"]
        snap = statistics.median(t for t, p in steps_by[label] if p == "snapshot") - base_step
        slowed = statistics.fmean(io) / base_step - 1 if io else 0.0
        io_steps = len(io) / (args.train_runs * args.saves)
        spread_s = spread(loops[label], 2)
        rows.append(
            [label, loop, spread_s, Percent(loop / base - 1), snap, io_steps, Percent(slowed)]
        )
    print_table(
        f"Part 2: training-like loop, {args.dim}x{args.dim} float32 matmul steps "
        f"({base_step * 1e3:.1f} ms/step), save_async every {every} steps "
        f"({every * base_step:.1f} s of compute), {args.saves} saves per run, median of "
        f"{args.train_runs} runs",
        ["loop", "loop s", "min..max", "slowdown", "snapshot s", "I/O steps", "while saving"],
        rows,
    )
    print(
        "  slowdown: whole loop against no saves; snapshot: extra seconds of the step that "
        "takes it;\n  I/O steps: steps per save that overlap its background I/O; while "
        "saving: how much slower those steps ran"
    )
    return {"loops": loops, "step_seconds": base_step, "every": every}


def main(args: argparse.Namespace) -> dict[str, Any]:
    _defaults(args)
    wl = workload_a(args.size_mib * MIB, args.tensors)
    print(f"workload A: {wl.description}", flush=True)
    tensors = make_arrays(wl)
    base = os.path.abspath(args.dir or "bench-out")
    os.makedirs(base, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="async-", dir=base)
    try:
        directory = Path(scratch) / "ckpt"
        directory.mkdir()
        result = {"blocking": blocking(tensors, directory, args.runs)}
        result["cold"] = cold(args, directory, 1 if args.quick else max(3, args.runs // 2))
        if not args.skip_training:
            result["training"] = training(tensors, directory, args)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    return result
