"""Save / restore on local disk: streamckpt beside tf.train.Checkpoint and the installed peers.

Workloads A (~1 GiB in 200 tensors of 4 KiB to 32 MiB) and B (20,000 tensors of 1 to 64 KiB);
tools: streamckpt with 1 and 4 shards, tf.train.Checkpoint (the baseline of every ratio),
orbax-checkpoint, torch.distributed.checkpoint, safetensors, torch.save and TensorStore where
installed.

Method, the same for every tool (see ``benchmarks.peers`` for what is timed):
- save: one child per (tool, workload) does one untimed warm-up save ("1st save"), then
  --repeats timed saves, each into an empty directory after ``sync``;
- restore: up to --repeats children, each timing the first restore in a fresh process (as at
  job start), the checkpoint's files evicted from the page cache first (cold reads from disk;
  --warm-cache: read into the page cache first, for every tool alike); the first one compares
  every tensor with the data;
- a peer's cell stops repeating once its runs took --cell-budget seconds (the TF baseline
  always runs --repeats times); n says how many runs the median has;
- peak RSS: VmHWM reset right before the timed call, read right after; "+RSS" is the peak
  minus the RSS before;
- the machine's limits in the same run (``harness.limits``): sequential write, O_DIRECT
  write at 1 and 16 requests in flight, cold read, copies into mapped and fresh memory,
  first touch, crc32c; the target checks compare save A with the write limit and each op
  with TF.
GB/s = workload bytes / median seconds / 1e9; "vs TF" = TF seconds / tool seconds.

--quick: tiny workloads, one run, one child per cell doing save and restore, workload B with
streamckpt alone (the peers' code is the same on A): every code path in seconds.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import tempfile
from typing import Any

from benchmarks import harness, peers
from benchmarks.report import Times, median, print_table, ratio, spread
from benchmarks.workloads import GIB, MIB, Workload, by_name

DISK_TARGET = 1.2  # save A within this many times the time of one sequential write stream


#: cold -> the ways ``harness.read_files`` reads a restore's files for its limits, each round:
#: warm, a copy into fresh memory and a plain read; cold, the disk alone and a plain read
FILE_LIMITS = {False: ("copy", "fresh"), True: ("reused", "fresh")}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repeats", type=int, help="timed runs per cell (default 3; 1 with --quick)")
    p.add_argument("--tools", help=f"comma list of {', '.join(peers.TOOLS)} (default: all)")
    p.add_argument("--workloads", default="A,B", help="comma list of A,B (default A,B)")
    p.add_argument(
        "--warm-cache", action="store_true", help="restore with the files in the page cache"
    )
    p.add_argument("--no-warmup", action="store_true", help="time the first save in a process")
    p.add_argument("--timeout", type=float, default=600, help="seconds per child (default 600)")
    p.add_argument(
        "--cell-budget",
        type=float,
        default=30,
        help="seconds after which a peer's cell stops repeating (default 30; 0: no limit)",
    )


def workloads(quick: bool, names: str) -> dict[str, tuple[str, int, int]]:
    """Name -> the (name, bytes, count) a child rebuilds the workload from."""
    if quick:
        specs = {"A": ("A", 8 * MIB, 40), "B": ("B", 0, 500)}
    else:
        specs = {"A": ("A", GIB, 200), "B": ("B", 0, 20_000)}
    unknown = set(names.split(",")) - set(specs)
    if unknown:
        raise SystemExit(f"unknown workload(s) {', '.join(sorted(unknown))}; known: A, B")
    return {name: specs[name] for name in names.split(",")}


def limit_runs(workdir: str, cold: bool, *, size: int, repeats: int) -> dict[str, list[float]]:
    """The limits child over ``size`` bytes; prints each limit and returns its runs' GB/s."""
    spec = {"dir": workdir, "size": size, "repeats": repeats, "cold": cold}
    result = harness.run_child("harness.limits", spec, workdir=workdir, label="limits")
    speeds = {}
    for key, seconds in result.get("seconds", {}).items():
        speeds[key] = [size / s / 1e9 for s in seconds]
        runs = ", ".join(f"{v:.2f}" for v in speeds[key])
        print(
            f"{harness.LIMIT_NAMES[key]}: {statistics.median(speeds[key]):.3f} GB/s (runs: {runs})"
        )
    return speeds


def measure_limits(args: argparse.Namespace, workdir: str, cold: bool) -> dict[str, float]:
    """The limits child at this mode's size; GB/s by name (medians)."""
    size = 16 * MIB if args.quick else GIB
    runs = limit_runs(workdir, cold, size=size, repeats=args.repeats)
    return {key: statistics.median(v) for key, v in runs.items()}


def run_cell(
    args: argparse.Namespace,
    tool: str,
    spec: tuple[str, int, int],
    workdir: str,
    restores: dict[str, bool],
    *,
    background: bool = False,
    exempt: str | None = peers.BASELINE,
) -> dict[str, dict[str, Any]]:
    """One tool on one workload: its cells (``save``, each restore of ``restores`` = op ->
    cold, and ``background`` when asked), with runs and failures.

    One child saves (and, with --quick, also does every other op once); then --repeats
    rounds of one child per restore op, the ops alternating, each op stopping once its
    children took --cell-budget seconds (not ``exempt``'s); then one child for the
    background saves. With ``args.file_limits``, right before each restore child the
    ``harness.read_files`` children of ``FILE_LIMITS`` read the same files, evicted or
    cached alike (``files_<how>``: their seconds, round by round).
    """
    name = spec[0]
    tool_dir = os.path.join(workdir, f"{tool}-{name}")
    os.makedirs(tool_dir)
    budget = math.inf if tool == exempt or not args.cell_budget else args.cell_budget
    common: dict[str, Any] = {"tool": tool, "workload": spec, "dir": tool_dir}
    common["restores"] = restores
    common |= {"budget": budget, "repeats": args.repeats, "warmup": not args.no_warmup}
    later = ["background"] if background else []
    cells: dict[str, dict[str, Any]] = {op: {"runs": []} for op in ["save", *restores, *later]}

    def child(ops: list[str], label: str, verify: bool) -> dict[str, Any]:
        spec = common | {"ops": ops, "verify": verify}
        result = harness.run_child(
            "peers.run_op", spec, workdir=workdir, label=label, timeout=args.timeout
        )
        for op in ops:
            got = result.get(op, {})
            cells[op] |= {k: v for k, v in got.items() if k != "runs"}
            cells[op]["runs"] += got.get("runs", [])
            if not result.get("ok"):
                cells[op]["failed"] = result.get("error")
        return result

    def read_limit(op: str, i: int) -> None:
        if not getattr(args, "file_limits", False):
            return
        for how in FILE_LIMITS[restores[op]]:
            read = {"root": os.path.join(tool_dir, "ckpt"), "cold": restores[op], "how": how}
            # a label of its own: a child that writes no result must not find an earlier one's
            label = f"{tool}-{name}-{op}-{how}-{i}"
            got = harness.run_child("harness.read_files", read, workdir=workdir, label=label)
            if got.get("ok"):
                cells[op].setdefault(f"files_{how}", []).append(got["seconds"])

    first = child(list(cells) if args.quick else ["save"], f"{tool}-{name}", True)
    if args.quick and first.get("ok"):
        for op in restores:  # the code path, once
            read_limit(op, 0)
    if not first.get("ok"):
        for cell in cells.values():
            cell["failed"] = first.get("error")
    elif not args.quick:
        wall = dict.fromkeys(restores, 0.0)
        for i in range(args.repeats):
            for op in restores:
                if (i and wall[op] > budget) or cells[op].get("failed"):
                    continue  # a slow cell: fewer repeats (the table's n shows it)
                read_limit(op, i)
                wall[op] += child([op], f"{tool}-{name}-{op}-{i}", i == 0)["wall_seconds"]
        if later:
            child(later, f"{tool}-{name}-background", False)
    shutil.rmtree(tool_dir, ignore_errors=True)
    os.sync()
    return cells


def summarize(cells: dict[tuple[str, str, str], dict[str, Any]], wls: dict[str, Workload]) -> Any:
    rows: list[dict[str, Any]] = []
    for (tool, wl, op), cell in cells.items():
        secs = [r["seconds"] for r in cell["runs"]]
        runs = [r for r in cell["runs"] if r.get("peak_rss_mib") is not None]
        seconds = median(secs)
        rows.append(
            {
                "tool": tool,
                "workload": wl,
                "op": op,
                "runs": len(secs),
                "failed": cell.get("failed"),
                "seconds": seconds,
                "spread": spread(secs),
                "gb_per_s": ratio(wls[wl].nbytes / 1e9, seconds),
                "first_save_seconds": cell.get("first_save_seconds"),
                "bytes_on_disk": cell.get("bytes_on_disk"),
                "peak_rss_mib": median(r["peak_rss_mib"] for r in runs),
                "delta_rss_mib": median(r["peak_rss_mib"] - r["rss_before_mib"] for r in runs),
            }
        )
    times = {(r["tool"], r["workload"], r["op"]): r["seconds"] for r in rows}
    for r in rows:
        r["vs_tf"] = ratio(times.get((peers.BASELINE, r["workload"], r["op"])), r["seconds"])
    order = list(peers.TOOLS)
    rows.sort(key=lambda r: (r["workload"], r["op"] != "save", order.index(r["tool"])))
    return rows


def print_results(rows: list[dict[str, Any]]) -> None:
    header = ["tool", "wl", "op", "n", "median s", "min..max s", "GB/s", "vs TF", "1st save s"]
    header += ["disk MB", "peak RSS MiB", "+RSS MiB"]
    table = []
    for r in rows:
        disk = r["bytes_on_disk"]
        delta = r["delta_rss_mib"]
        table.append(
            [peers.TOOLS[r["tool"]][0], r["workload"], r["op"], r["runs"]]
            + (["FAILED"] if r["seconds"] is None else [f"{r['seconds']:.3f}"])
            + [r["spread"], r["gb_per_s"], None if r["vs_tf"] is None else Times(r["vs_tf"])]
            + [r["first_save_seconds"], None if disk is None else disk / 1e6]
            + [r["peak_rss_mib"], None if delta is None else max(0.0, delta)]
        )
    print_table("== results (medians; vs TF > 1: faster than TensorFlow)", header, table, left=3)
    for r in rows:
        if r["failed"]:
            print(f"FAILED {peers.TOOLS[r['tool']][0]} {r['workload']} {r['op']}: {r['failed']}")


def target_checks(rows: list[dict[str, Any]], limits: dict[str, float], wl_a: Any) -> None:
    """The num_shards default (smallest geometric mean time) and its targets."""
    scores = {}
    for tool in (t for t in peers.TOOLS if t.startswith("streamckpt-")):
        times = [r["seconds"] for r in rows if r["tool"] == tool]
        if times and all(times):
            scores[tool] = math.exp(statistics.fmean(math.log(t) for t in times))
    if not scores:
        return
    best = min(scores, key=lambda t: scores[t])
    print("\n== streamckpt num_shards")
    for tool, score in scores.items():
        print(f"{peers.TOOLS[tool][0]}: geometric mean of its median times {score:.3f} s")
    print(f"best default: num_shards={best.split('-')[1]}; the target checks use it")
    print("== target checks")
    by_key = {(r["tool"], r["workload"], r["op"]): r for r in rows}
    save_a = by_key.get((best, "A", "save"))
    if save_a and save_a["seconds"] and limits.get("disk_write") and wl_a is not None:
        stream = wl_a.nbytes / (limits["disk_write"] * 1e9)
        share = save_a["seconds"] / stream
        print(
            f"save A: {save_a['gb_per_s']:.3f} GB/s; {save_a['seconds']:.3f} s = {share:.2f}× "
            f"the time of one sequential write stream ({stream:.3f} s at "
            f"{limits['disk_write']:.3f} GB/s); target ≤ {DISK_TARGET}×: "
            f"{'PASS' if share <= DISK_TARGET else 'MISS'}"
        )
    for wl, op in (("A", "save"), ("A", "restore"), ("B", "save"), ("B", "restore")):
        row, tf = by_key.get((best, wl, op)), by_key.get((peers.BASELINE, wl, op))
        if row and tf and row["vs_tf"] is not None:
            verdict = "yes" if row["vs_tf"] > 1 else "no"
            print(
                f"{op} {wl} faster than TF: {verdict} ({row['vs_tf']:.2f}×: "
                f"TF {tf['seconds']:.3f} s, streamckpt {row['seconds']:.3f} s)"
            )
    restore_a = by_key.get((best, "A", "restore"))
    if restore_a and restore_a["seconds"] and limits.get("disk_read_cold"):
        print(
            f"restore A (information): {restore_a['gb_per_s']:.3f} GB/s = "
            f"{restore_a['gb_per_s'] / limits['disk_read_cold']:.2f}× the cold read limit"
        )


def main(args: argparse.Namespace) -> dict[str, Any]:
    args.repeats = args.repeats or (1 if args.quick else 3)
    base = os.path.abspath(args.dir or "bench-out")
    os.makedirs(base, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="local-", dir=base)
    specs = workloads(args.quick, args.workloads)
    wls = {name: by_name(*spec) for name, spec in specs.items()}
    everything = [t for t in peers.TOOLS if t != "streamckpt"]  # that is streamckpt-1 here
    requested = args.tools.split(",") if args.tools else everything
    if args.quick and not args.tools:
        requested.remove("streamckpt-1")  # the same code as 4 shards
    tools, skipped = peers.available(requested)
    cold = not args.warm_cache and harness.can_evict(workdir)
    print(f"scratch: {workdir}; repeats: {args.repeats}; warm-up save: {not args.no_warmup}")
    print(
        "page cache: evicted before every restore and the cold-read limit (cold reads)"
        if cold
        else "page cache: NOT evicted (--warm-cache, or not possible here): warm restores"
    )
    for tool, why in skipped.items():
        print(f"skipped: {peers.TOOLS[tool][0]} ({why})")
    for wl in wls.values():
        print(f"workload {wl.name}: {wl.description} ({wl.nbytes / 1e9:.3f} GB)")
    print("== physical limits", flush=True)
    limits = measure_limits(args, workdir, cold)
    cells: dict[tuple[str, str, str], dict[str, Any]] = {}
    for name, spec in specs.items():
        print(f"== workload {name}", flush=True)
        for tool in tools:
            if args.quick and name == "B" and not tool.startswith("streamckpt"):
                continue
            for op, cell in run_cell(args, tool, spec, workdir, {"restore": cold}).items():
                cells[(tool, name, op)] = cell
            save_s = median(r["seconds"] for r in cells[(tool, name, "save")]["runs"])
            load_s = median(r["seconds"] for r in cells[(tool, name, "restore")]["runs"])
            label = peers.TOOLS[tool][0]
            print(f"  {label:<22} save {save_s or 0:.3f} s, restore {load_s or 0:.3f} s")
    if args.quick:
        print("(quick: workload B with streamckpt only; the peers' code is the same on A)")
    rows = summarize(cells, wls)
    print_results(rows)
    target_checks(rows, limits, wls.get("A"))
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "ok": all(r["seconds"] for r in rows),
        "skipped": skipped,
        "limits_gb_per_s": limits,
        "rows": rows,
        "workloads": {w.name: w.description for w in wls.values()},
    }
