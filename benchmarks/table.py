"""One table: every measure for streamckpt and its peers in one run, the machine's limits beside.

Rows: one 4 MiB tensor read by a fresh process; workload A (1 GiB in 200 tensors) saved
until durable, restored from a warm page cache and from a cold one, saved in the background;
workload B (20,000 tensors of 1 to 64 KiB) saved, restored warm and cold; then the machine's
limits. Columns: streamckpt (its defaults: about 256 MiB a shard on local disk),
tf.train.Checkpoint, safetensors, torch.save, torch DCP, orbax-checkpoint, TensorStore; the
limit; the verdict.

Method: this mode measures nothing itself; it runs the other modes' measurements, in this
order, and only formats what they return:
- limits: ``harness.limits`` over A's bytes, --repeats runs (``local.limit_runs``): O_DIRECT
  write at 1 and 16 requests in flight, cold read, copy into fresh memory, copy into mapped
  memory, crc32c, buffered write + fsync, and the same with each 8 MiB's writeback started
  as it is written (how a waited streamckpt save writes);
- the cold-start row: ``cold_start.measure``, whole fresh processes (interpreter, imports,
  the read, exit) reading one 4 MiB tensor of a 256 MiB checkpoint each tool saved, bytecode
  cached and the files in the page cache, rounds alternating; streamckpt and safetensors
  --cold-runs rounds, the other peers (seconds of imports each) --cold-peer-rounds;
- the A and B rows: ``local.run_cell`` for each (tool, workload), ``peers.run_op`` children:
  one child does a warm-up save and --repeats timed saves, each timed until durable; then
  --repeats rounds of one fresh process per restore, cold (the files evicted from the page
  cache) and warm (the files read into it first) alternating; then, on A, one child with a
  warm-up background save and --repeats timed ones, each timed until the call returns
  (``peers`` says how each tool's works; safetensors and torch.save have none: "n/a");
- every tool alike: a cell stops repeating once its runs took --cell-budget seconds (n says
  how many runs its median has); the first restore of each cell compares every tensor.
Cells: seconds, "median (min–max) n". Limit: the seconds the row's bytes take at the limit's
median speed (every limit is measured over 1 GiB, one file or one block; 16 MiB with
--quick). Restore rows add limits measured as the restores are: right before each restore
child, fresh processes read the same checkpoint files, evicted or cached first
(``harness.read_files``): warm, copied from the page cache into fresh memory, and read
plainly (8 MiB ``preadv`` into one fresh buffer); cold, read into one reused buffer (the
disk alone), and read plainly. The cell shows those of streamckpt's files, and the ratios
below the table set streamckpt's restores against them. On a VM a "cold" read of a file
just written is often served by the host's cache, and a fresh process's first touch of
memory varies from run to run, so a limit read in other conditions can sit far from what a
restore could get. Verdict:
streamckpt's median against the fastest peer's, as the ratio of the slower to the faster.

--quick: tiny workloads, one run of each, one child per (tool, workload) doing every op, one
round of cold starts of a 16 MiB checkpoint: every code path in seconds, numbers meaningless.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import cold_start, harness, local, peers
from benchmarks.report import loadavg, machine_info
from benchmarks.workloads import GIB, MIB, by_name

TOOLS = (
    "streamckpt",
    "tensorflow",
    "safetensors",
    "torch-save",
    "torch-dcp",
    "orbax",
    "tensorstore",
)
HEADS = {
    "streamckpt": "streamckpt",
    "tensorflow": "TensorFlow",
    "safetensors": "safetensors",
    "torch-save": "torch.save",
    "torch-dcp": "torch DCP",
    "orbax": "Orbax",
    "tensorstore": "TensorStore",
}
#: (row key, label); a key is "cold" or (workload, op of ``local.run_cell``)
ROWS: tuple[tuple[Any, str], ...] = (
    ("cold", "one 4 MiB tensor, fresh process (wall time)"),
    (("A", "save"), "A save, durable"),
    (("A", "restore_warm"), "A restore, warm page cache"),
    (("A", "restore_cold"), "A restore, cold cache"),
    (("A", "background"), "A background save, until the call returns"),
    (("B", "save"), "B save, durable"),
    (("B", "restore_warm"), "B restore, warm page cache"),
    (("B", "restore_cold"), "B restore, cold cache"),
)
#: op -> (limit keys of ``harness.LIMIT_NAMES``, how the limit cell names them)
LIMIT_OF = {
    "save": (
        ("direct_write_16", "direct_write_1", "disk_write", "writeback_write"),
        "O_DIRECT write, 16 / 1 in flight / buffered write + fsync / the same, writeback "
        "started per 8 MiB",
    ),
    "restore_warm": (("copy_fresh",), "copy into fresh memory"),
    "restore_cold": (("disk_read_cold",), "cold read"),
    "background": (("memcpy", "copy_fresh"), "copy into mapped / fresh memory"),
}
LIMIT_ROWS = (
    "direct_write_1",
    "direct_write_16",
    "disk_read_cold",
    "copy_fresh",
    "memcpy",
    "crc32c",
    "disk_write",
    "writeback_write",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--table", metavar="PATH", help="also write the markdown table to PATH")
    p.add_argument("--repeats", type=int, help="timed runs per cell (default 3; quick 1)")
    p.add_argument(
        "--cell-budget",
        type=float,
        default=15,
        help="seconds after which a cell stops repeating (default 15; 0: no limit)",
    )
    p.add_argument("--cold-runs", type=int, help="cold-start rounds (default 7; quick 1)")
    p.add_argument(
        "--cold-peer-rounds",
        type=int,
        help="cold-start rounds with the peers but safetensors (default 3; quick 1)",
    )
    p.add_argument("--tools", help=f"comma list of {', '.join(TOOLS)} (default: all)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per child (default 600)")


# -- formatting ---------------------------------------------------------------------------------


def seconds(value: float) -> str:
    """3 significant digits, never an exponent."""
    if value >= 1:
        return f"{value:.3g}" if value < 1000 else f"{value:.0f}"
    return f"{value:.3f}" if value >= 0.01 else f"{value:.4f}"


def figure(values: list[float]) -> str:
    """``median (min–max) n``, seconds; ``-`` for none."""
    if not values:
        return "-"
    med = statistics.median(values)
    return f"{seconds(med)} ({seconds(min(values))}–{seconds(max(values))}) n={len(values)}"


def verdict(medians: dict[str, float]) -> str:
    """streamckpt against the fastest peer, the slower one's time as a multiple."""
    ours = medians.get("streamckpt")
    rivals = {t: v for t, v in medians.items() if t != "streamckpt"}
    if ours is None or not rivals:
        return "-"
    best = min(rivals, key=lambda t: rivals[t])
    if ours <= rivals[best]:
        return f"streamckpt fastest; next {HEADS[best]} takes {rivals[best] / ours:.2f}×"
    return f"{HEADS[best]} fastest; streamckpt takes {ours / rivals[best]:.2f}× its time"


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def build(
    tools: list[str],
    skipped: dict[str, str],
    cells: dict[tuple[str, str, str], dict[str, Any]],
    cold: dict[str, list[float]],
    limits: dict[str, list[float]],
    nbytes: dict[str, int],
) -> str:
    """The markdown table: measures x tools, the limit, the verdict; then the limits."""
    columns = [t for t in TOOLS if t in tools or t in skipped]
    header = ["measure (seconds)", *(HEADS[t] for t in columns), "limit", "verdict"]
    rows = []
    for key, label in ROWS:
        row, medians = [label], {}
        for tool in columns:
            if tool in skipped:
                row.append("not installed")
                continue
            if key == "cold":
                values = cold.get(cold_start.LABELS[tool], [])
                failed = None
            elif key[1] == "background" and tool not in peers.BACKGROUND:
                row.append("n/a (none)")
                continue
            else:
                cell = cells.get((tool, *key), {})
                values = [r["seconds"] for r in cell.get("runs", [])]
                failed = cell.get("failed")
            row.append("failed" if failed and not values else figure(values))
            if values:
                medians[tool] = statistics.median(values)
        if key == "cold":
            floor = cold.get(cold_start.FLOOR, [])
            row.append(f"{figure(floor)}: python -c 'import numpy'" if floor else "-")
        else:
            keys, name = LIMIT_OF[key[1]]
            implied = [
                seconds(nbytes[key[0]] / 1e9 / statistics.median(limits[k]))
                for k in keys
                if limits.get(k)
            ]
            text = f"{' / '.join(implied)}: {name}" if implied else "-"
            ours = cells.get(("streamckpt", *key), {})
            ways = local.FILE_LIMITS[key[1] == "restore_cold"] if "restore" in key[1] else ()
            for how in ways:
                if ours.get(f"files_{how}"):  # the same files in the same rounds
                    text += f"; {figure(ours[f'files_{how}'])}: {SAME_ROUNDS[how]}"
            row.append(text)
        row.append(verdict(medians))
        rows.append(row)
    for key in LIMIT_ROWS:
        speeds = limits.get(key)
        if not speeds:
            continue
        med = statistics.median(speeds)
        rate = f"{med:.3g} GB/s ({min(speeds):.3g}–{max(speeds):.3g}) n={len(speeds)}"
        rows.append([f"limit: {harness.LIMIT_NAMES[key]}", *("" for _ in columns), rate, ""])
    return markdown(header, rows) + same_rounds_ratios(cells)


#: ``harness.read_files``' ways as the limit cell names them
SAME_ROUNDS = {
    "copy": "its files copied into fresh memory, same rounds",
    "reused": "its files read cold (one reused buffer), same rounds",
    "fresh": "its files read plainly, same rounds",
}


def same_rounds_ratios(cells: dict[tuple[str, str, str], dict[str, Any]]) -> str:
    """Below the table: streamckpt's restore medians over the medians of the limits read in
    the same rounds (issue 15.4's goals: warm within 1.5x a copy into fresh memory, cold
    within 1.2x the cold read)."""
    lines = []
    for (tool, wl, op), cell in sorted(cells.items()):
        times = [r["seconds"] for r in cell.get("runs", [])]
        if tool != "streamckpt" or not times or not op.startswith("restore"):
            continue
        for how in local.FILE_LIMITS[op == "restore_cold"]:
            limit = cell.get(f"files_{how}")
            if limit:
                ratio = statistics.median(times) / statistics.median(limit)
                lines.append(f"- {wl} {op.replace('_', ' ')} ÷ {SAME_ROUNDS[how]}: {ratio:.2f}×")
    if not lines:
        return ""
    return "\n\nstreamckpt ÷ the limits measured in the same rounds (medians):\n" + "\n".join(lines)


def preamble(info: dict[str, Any], argv: str, load_after: str, wls: dict[str, Any]) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v)
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join(
        [
            f"Measured with `{argv}` at streamckpt {info['git']}, {when}.",
            f"Machine: {info['cpu']}, {info['cores']} cores, {info['ram_gib']} GiB RAM; "
            f"disk: {info.get('filesystem', '?')}, {info.get('disk_free_gib', '?')} GiB free; "
            f"{info['kernel']}, Python {info['python']}.",
            f"Load average (1, 5, 15 min): before {info['loadavg_at_start']}, after {load_after}.",
            f"Versions: {versions}.",
            *(f"Workload {w.name}: {w.description}." for w in wls.values()),
            "Cells: seconds, median (min–max) of n runs; each restore and each cold start in a"
            " fresh process; limit: the row's bytes at the machine's measured speed.",
        ]
    )


# -- the run ------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> dict[str, Any]:
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.no_warmup = False
    args.file_limits = True  # restore rows: a limit read of the same files in the same rounds
    cold_runs = args.cold_runs or (1 if args.quick else 7)
    cold_peers = args.cold_peer_rounds
    if cold_peers is None:
        cold_peers = 1 if args.quick else 3
    base = os.path.abspath(args.dir or "bench-out")
    info = machine_info(base)
    workdir = tempfile.mkdtemp(prefix="table-", dir=base)
    specs = local.workloads(args.quick, "A,B")
    wls = {name: by_name(*spec) for name, spec in specs.items()}
    requested = args.tools.split(",") if args.tools else list(TOOLS)
    if set(requested) - set(TOOLS):
        raise SystemExit(f"unknown tool(s) {sorted(set(requested) - set(TOOLS))}; known: {TOOLS}")
    tools, skipped = peers.available(requested)
    evicts = harness.can_evict(workdir)
    restores = {"restore_warm": False, "restore_cold": True} if evicts else {"restore_warm": False}
    print(f"scratch: {workdir}; repeats: {args.repeats}; cell budget: {args.cell_budget} s")
    if not evicts:
        print("page cache: cannot evict files here: no cold rows")
    for tool, why in skipped.items():
        print(f"skipped: {HEADS[tool]} ({why})")
    phases: dict[str, float] = {}  # wall seconds of each part, to plan a full run's time
    errors: dict[str, str] = {}
    cold: dict[str, list[float]] = {}
    try:
        print("== limits", flush=True)
        started = time.perf_counter()
        size = 16 * MIB if args.quick else GIB
        limits = local.limit_runs(workdir, evicts, size=size, repeats=args.repeats)
        phases["limits"] = time.perf_counter() - started
        print(f"== one tensor from a fresh process ({phases['limits']:.0f} s so far)", flush=True)
        try:
            cold = cold_start.measure(
                Path(workdir) / "cold-start",
                runs=cold_runs,
                peer_rounds=cold_peers,
                size_mib=16 if args.quick else 256,
                tools=tools,
                cli=False,
            )
        except RuntimeError as exc:
            print(f"FAILED: {exc}")
            errors["cold start"] = str(exc)
        phases["cold start"] = time.perf_counter() - started - sum(phases.values())
        for label, values in cold.items():
            print(f"  {label:<32} {figure(values)}")
        cells: dict[tuple[str, str, str], dict[str, Any]] = {}
        for name, spec in specs.items():
            elapsed = time.perf_counter() - started
            print(f"== workload {name}: {wls[name].description} ({elapsed:.0f} s)", flush=True)
            for tool in tools:
                cell_started = time.perf_counter()
                background = name == "A" and tool in peers.BACKGROUND
                got = local.run_cell(
                    args, tool, spec, workdir, restores, background=background, exempt=None
                )
                for op, cell in got.items():
                    cells[(tool, name, op)] = cell
                done = ", ".join(
                    f"{op} {figure([r['seconds'] for r in cell['runs']])}"
                    for op, cell in got.items()
                )
                phases[f"{tool} {name}"] = time.perf_counter() - cell_started
                print(f"  {HEADS[tool]:<12} {phases[f'{tool} {name}']:3.0f} s: {done}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    argv = shlex.join(["python", "-m", "benchmarks", *sys.argv[1:]])
    text = preamble(info, argv, loadavg(), wls) + "\n\n"
    text += build(tools, skipped, cells, cold, limits, {n: w.nbytes for n, w in wls.items()})
    print("\n" + text)
    if args.table:
        with open(args.table, "w") as f:
            f.write(text + "\n")
        print(f"\nwrote {args.table}")
    failed = {f"{t} {w} {op}": c["failed"] for (t, w, op), c in cells.items() if c.get("failed")}
    failed |= errors
    for what, why in failed.items():
        print(f"FAILED {what}: {why}")
    return {
        "ok": not failed,
        "table": text,
        "limits_gb_per_s": limits,
        "cold_start": cold,
        "cells": {" ".join(k): v for k, v in cells.items()},
        "skipped": skipped,
        "phase_seconds": phases,
    }
