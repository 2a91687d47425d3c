"""What planning a multi-process save costs: plan_global, merge_records and the index, at scale.

Every process of a save runs ``plan_global`` on everything all processes hold, and the
primary runs ``merge_records`` and encodes the index; both grow with processes x entries, so
they are measured on simulated jobs (no process, no I/O) of --entries entries per process at
each of --ranks process counts, to show the growth:

- mix "sharded+replicated": half the entries are tensors cut row-wise over all processes
  (each process one piece, as data or tensor parallelism gives), half are replicated on all
  (optimizer steps, norms) and written once;
- mix "own names": every process holds its own entries (pipeline stages, experts).

Timed in this process, median of --runs, each after a ``gc.collect()`` with the collector
on (as in a real save): ``plan_global``; ``merge_records`` from every process's report of
where its values went; ``encode_index`` of the result; and ``fingerprint`` of one process's
items (what a repeated save pays to find that its plan is unchanged). The lists are built
beforehand, as the coordinator's gather leaves them. Target: ``plan_global`` under 1 s at
1,024 processes x 1,000 entries.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from typing import Any, TypeVar

from benchmarks.report import print_table
from streamckpt.distributed.merge import StoredAt, Written, merge_records
from streamckpt.distributed.plan import (
    GlobalPlan,
    LocalItem,
    LocalPlan,
    fingerprint,
    plan_global,
)
from streamckpt.format.bundle import BundleHeader
from streamckpt.format.dtypes import DataType
from streamckpt.format.index_file import encode_index_records

TARGET_SECONDS = 1.0
TARGET_RANKS, TARGET_ENTRIES = 1024, 1000
MIXES = ("sharded+replicated", "own names")
T = TypeVar("T")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ranks", help="process counts, comma-separated (64,256,1024; quick 8,32)")
    p.add_argument("--entries", type=int, help="entries per process (default 1000; quick 50)")
    p.add_argument("--runs", type=int, help="runs per figure (default 3; quick 1)")


def _defaults(args: argparse.Namespace) -> None:
    if args.ranks is None:
        args.ranks = "8,32" if args.quick else "64,256,1024"
    if args.entries is None:
        args.entries = 50 if args.quick else 1000
    if args.runs is None:
        args.runs = 1 if args.quick else 3


def make_job(mix: str, ranks: int, entries: int) -> list[LocalPlan]:
    """What every process holds, as it sends it; 1 KiB rows of float32, replicas of 4 KiB."""
    return [LocalPlan.of(items) for items in make_items(mix, ranks, entries)]


def make_items(mix: str, ranks: int, entries: int) -> list[list[LocalItem]]:
    f32 = DataType.DT_FLOAT
    if mix == "own names":
        return [
            [LocalItem(b"stage%d/w%d" % (r, t), f32, (256,), None, 1024) for t in range(entries)]
            for r in range(ranks)
        ]
    cut = entries // 2
    shape = (ranks * 4, 256)
    return [
        [
            LocalItem(b"layer%d/kernel" % t, f32, shape, ((4 * r, 4 * r + 4), (0, 256)), 4096)
            for t in range(cut)
        ]
        + [LocalItem(b"layer%d/norm" % t, f32, (1024,), None, 4096) for t in range(entries - cut)]
        for r in range(ranks)
    ]


def reports(plan: GlobalPlan) -> list[Written]:
    """What each process would report after writing its local plan (made-up checksums)."""
    out = []
    for rank in range(plan.world_size):
        stored = {
            p.key: StoredAt(p.shard_id, p.offset, p.size, (p.offset * 2654435761) & 0xFFFFFFFF)
            for shard in plan.local_plan(rank).shards
            for p in shard
        }
        out.append(Written.of(plan.writes_of(rank)[1], stored))
    return out


def timed(fn: Callable[[], T], runs: int) -> tuple[float, T]:
    """Median seconds of ``runs`` calls, and the last result."""
    times = []
    result: Any = None
    for _ in range(runs):
        result = None
        gc.collect()
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def measure(mix: str, ranks: int, entries: int, runs: int) -> dict[str, Any]:
    plans = make_job(mix, ranks, entries)
    plan_s, plan = timed(lambda: plan_global(plans, shard_bytes=64 << 20), runs)
    stored = reports(plan)
    merge_s, merged = timed(lambda: merge_records(plan, stored), runs)
    header = BundleHeader(num_shards=plan.num_shards)
    encode_s, index = timed(lambda: encode_index_records(header, merged.keys, merged.values), runs)
    fingerprint_s, _ = timed(lambda: fingerprint(plans[0]), max(runs, 5))
    row = {
        "mix": mix,
        "ranks": ranks,
        "entries": entries,
        "items": ranks * entries,
        "index_entries": len(merged),
        "index_bytes": len(index),
        "plan_s": plan_s,
        "merge_s": merge_s,
        "encode_s": encode_s,
        "fingerprint_s": fingerprint_s,
    }
    return row


def main(args: argparse.Namespace) -> dict[str, Any]:
    _defaults(args)
    counts = [int(n) for n in args.ranks.split(",")]
    rows = []
    for mix in MIXES:
        for ranks in counts:
            rows.append(measure(mix, ranks, args.entries, args.runs))
            gc.collect()  # the job's lists, gone before the next is built
            print(f"  {mix}, {ranks} processes: done", flush=True)
    print_table(
        f"Global plan of a multi-process save ({args.entries} entries per process, "
        f"median of {args.runs})",
        [
            "mix",
            "processes",
            "items",
            "plan_global ms",
            "µs/item",
            "merge ms",
            "encode_index ms",
            "index entries",
            "fingerprint ms",
        ],
        [
            (
                r["mix"],
                r["ranks"],
                r["items"],
                r["plan_s"] * 1e3,
                r["plan_s"] / r["items"] * 1e6,
                r["merge_s"] * 1e3,
                r["encode_s"] * 1e3,
                r["index_entries"],
                r["fingerprint_s"] * 1e3,
            )
            for r in rows
        ],
        left=1,
    )
    target = [
        r
        for r in rows
        if (r["ranks"], r["entries"]) == (TARGET_RANKS, TARGET_ENTRIES)
        and r["mix"] == "sharded+replicated"
    ]
    for r in target:
        met = "met" if r["plan_s"] < TARGET_SECONDS else "NOT met"
        print(
            f"\ntarget plan_global < {TARGET_SECONDS:.0f} s at {TARGET_RANKS} x {TARGET_ENTRIES}: "
            f"{r['plan_s']:.2f} s, {met} (all of plan, merge and index: "
            f"{r['plan_s'] + r['merge_s'] + r['encode_s']:.2f} s)"
        )
    return {"rows": rows, "ok": True}
