"""Save/restore benchmark: streamckpt beside TensorFlow and the other installed peers, in one run.

    python scripts/bench.py                 # full run (~1 GiB + 20,000 tensors), 3 repeats
    python scripts/bench.py --quick         # smoke run: small workloads, 1 repeat
    python scripts/bench.py --json out.json --repeats 5 --tools streamckpt-1,tensorflow

Workloads (float32, deterministic; see scripts/_bench_peers.py):
  A  ~1 GiB in 200 tensors whose sizes are log-spread from 4 KiB to 32 MiB;
  B  20,000 tensors of 1..64 KiB (log-uniform).

Tools: streamckpt with num_shards 1 and 4, tf.train.Checkpoint (the baseline of every ratio),
and whichever of orbax-checkpoint, torch.distributed.checkpoint and safetensors are installed.

Method (the same for every tool):
- every measured operation runs in a child interpreter (scripts/_bench_peers.py); building the
  arrays, tf.Variables, torch tensors and other in-memory state happens before the timer;
- save: one child per (tool, workload) does one untimed warm-up save (its time is shown as
  "1st save"), then --repeats timed saves, each into an empty directory after the previous
  checkpoint was deleted and ``sync`` ran. A save is timed until its bytes are durable:
  streamckpt fsyncs its shards, index and directory itself; torch DCP runs with
  sync_files=True; for every peer the timed region ends with an fsync of every file and
  directory it produced (TensorFlow, safetensors and orbax do not fsync on their own);
- restore: up to --repeats children per (tool, workload), each timing the first restore in a
  fresh process (as at job start). Before it, the checkpoint's files are evicted from the page
  cache (sync + posix_fadvise DONTNEED on each file: what ``echo 3 > drop_caches`` does, for
  those files only, so the tools' libraries stay cached and no root is needed): cold reads from
  disk. With --warm-cache (or where eviction is impossible) every tool reads from the page
  cache alike, and the report says so. TF and torch DCP restore in place into variables /
  tensors allocated before the timer; the others return new arrays. The first restore child
  of each cell compares every restored tensor with the data;
- slow cells: a peer's (workload, op) stops repeating once its runs used --cell-budget seconds
  (save: the timed loop; restore: the children's wall time), after at least one run; the
  table's n says how many runs the median has. The TF baseline always runs --repeats times;
- peak RSS: the kernel's high-water mark (VmHWM), reset through /proc/self/clear_refs right
  before the timed call and read right after it; "+RSS" is that peak minus the RSS before;
- physical limits, in the same run: sequential disk write (8 MiB os.write calls + fsync),
  cold sequential read, memcpy, first touch of fresh memory, crc32c throughput;
- medians over the repeats; GB/s = workload bytes / seconds / 1e9; "vs TF" = TF seconds / tool
  seconds (> 1: faster than TensorFlow); "disk MB" = size of the checkpoint's files (orbax
  compresses by default); "1st save" = the first save in a fresh process (one-time costs:
  TF's tracing, planners), not in the median.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import _bench_peers as peers

HERE = os.path.dirname(os.path.abspath(__file__))
CHILD = os.path.join(HERE, "_bench_peers.py")
TF = "tensorflow"
DISK_TARGET = 1.2  # save A must take at most this many times the raw disk-write time


# -- environment ------------------------------------------------------------------------------


def _version(*dists: str) -> str | None:
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / (1 << 20)
    except OSError:
        pass
    return None


def _filesystem(path: str) -> str:
    path = os.path.realpath(path)
    best, fstype = "", "?"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and path.startswith(parts[1]) and len(parts[1]) > len(best):
                    best, fstype = parts[1], f"{parts[2]} on {parts[0]}"
    except OSError:
        pass
    return fstype


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def machine_info(workdir: str) -> dict[str, Any]:
    usage = shutil.disk_usage(workdir)
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_gib": _mem_total_gib(),
        "disk_free_gib": usage.free / (1 << 30),
        "filesystem": _filesystem(workdir),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "loadavg_at_start": _loadavg(),
        "versions": {
            "numpy": _version("numpy"),
            "tensorflow": _version("tensorflow-cpu", "tensorflow"),
            "streamckpt": _version("streamckpt"),
            "crc32c": _version("crc32c"),
            "orbax-checkpoint": _version("orbax-checkpoint"),
            "torch": _version("torch"),
            "safetensors": _version("safetensors"),
        },
    }


def available_tools(requested: list[str] | None) -> tuple[list[str], dict[str, str]]:
    tools, skipped = [], {}
    for tool in requested or list(peers.TOOLS):
        if tool not in peers.TOOLS:
            raise SystemExit(f"unknown tool {tool!r}; known: {', '.join(peers.TOOLS)}")
        top = peers.TOOL_MODULES[tool].split(".")[0]
        if importlib.util.find_spec(top) is None:
            skipped[tool] = f"{top} is not installed"
        else:
            tools.append(tool)
    return tools, skipped


def can_evict(workdir: str) -> bool:
    probe = os.path.join(workdir, "evict-probe")
    with open(probe, "wb") as f:
        f.write(b"x" * 4096)
    try:
        return peers.evict_from_page_cache(probe)
    finally:
        os.unlink(probe)


# -- children ---------------------------------------------------------------------------------


def run_child(spec: dict[str, Any], workdir: str, timeout: float, label: str) -> dict[str, Any]:
    result_path = os.path.join(workdir, f"result-{label}.json")
    log_path = os.path.join(workdir, f"log-{label}.txt")
    spec = {**spec, "result": result_path}
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu", PYTHONWARNINGS="ignore")
    started = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(
                [sys.executable, CHILD, json.dumps(spec)],
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                env=env,
                check=False,
            )
            rc: int | str = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.perf_counter() - started
    result: dict[str, Any]
    if rc == "timeout":
        result = {"ok": False, "error": f"timed out after {timeout:.0f} s"}
    else:
        try:
            with open(result_path) as f:
                result = json.load(f)
        except (OSError, ValueError):
            result = {"ok": False, "error": f"child exited with {rc} and wrote no result"}
    result["wall_seconds"] = wall
    if not result.get("ok"):
        with open(log_path, errors="replace") as f:
            tail = f.read()[-1500:]
        result["log_tail"] = tail
        print(f"    ! {label}: {result['error']}\n      " + tail.replace("\n", "\n      "))
    return result


# -- summary ----------------------------------------------------------------------------------


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(
    cells: dict[tuple[str, str, str], dict[str, Any]], wls: dict[str, peers.Workload]
) -> list[dict[str, Any]]:
    rows = []
    for (tool, wl, op), cell in cells.items():
        runs = cell["runs"]
        secs = [r["seconds"] for r in runs]
        peaks = [r["peak_rss_mib"] for r in runs if r.get("peak_rss_mib") is not None]
        deltas = [
            r["peak_rss_mib"] - r["rss_before_mib"]
            for r in runs
            if r.get("peak_rss_mib") is not None and r.get("rss_before_mib") is not None
        ]
        median = _median(secs)
        rows.append(
            {
                "tool": tool,
                "label": peers.TOOLS[tool],
                "workload": wl,
                "op": op,
                "runs": len(secs),
                "failed": cell.get("failed"),
                "seconds": median,
                "min": min(secs) if secs else None,
                "max": max(secs) if secs else None,
                "gb_per_s": wls[wl].nbytes / median / 1e9 if median else None,
                "first_save_seconds": _median(cell.get("first", [])),
                "bytes_on_disk": cell.get("bytes_on_disk"),
                "peak_rss_mib": _median(peaks),
                "delta_rss_mib": _median(deltas),
            }
        )
    by_key = {(r["tool"], r["workload"], r["op"]): r for r in rows}
    for r in rows:
        tf = by_key.get((TF, r["workload"], r["op"]))
        r["vs_tf"] = tf["seconds"] / r["seconds"] if tf and tf["seconds"] and r["seconds"] else None
    return rows


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (
        "tool",
        "wl",
        "op",
        "n",
        "median s",
        "min..max s",
        "GB/s",
        "vs TF",
        "1st save s",
        "disk MB",
        "peak RSS MiB",
        "+RSS MiB",
    )
    table = [head]
    for r in sorted(rows, key=lambda r: (r["workload"], r["op"] != "save", _order(r["tool"]))):
        if r["seconds"] is None:
            table.append((r["label"], r["workload"], r["op"], "0", "FAILED") + ("-",) * 7)
            continue
        table.append(
            (
                r["label"],
                r["workload"],
                r["op"],
                str(r["runs"]),
                f"{r['seconds']:.3f}",
                f"{r['min']:.3f}..{r['max']:.3f}",
                _fmt(r["gb_per_s"], ".3f"),
                _fmt(r["vs_tf"], ".2f", "×"),
                _fmt(r["first_save_seconds"], ".3f"),
                _fmt(None if r["bytes_on_disk"] is None else r["bytes_on_disk"] / 1e6, ".0f"),
                _fmt(r["peak_rss_mib"], ".0f"),
                _fmt(None if r["delta_rss_mib"] is None else max(0.0, r["delta_rss_mib"]), ".0f"),
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for i, row in enumerate(table):
        cols = [
            c.ljust(w) if j < 3 else c.rjust(w)
            for j, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        print("  ".join(cols).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    for r in rows:
        if r["failed"]:
            print(f"FAILED {r['label']} {r['workload']} {r['op']}: {r['failed']}")


def _order(tool: str) -> int:
    return list(peers.TOOLS).index(tool)


def best_streamckpt(rows: list[dict[str, Any]]) -> tuple[str | None, dict[str, float]]:
    """The num_shards default: the streamckpt config with the smallest geometric mean time."""
    scores = {}
    for tool in (t for t in peers.TOOLS if t.startswith("streamckpt-")):
        times = [r["seconds"] for r in rows if r["tool"] == tool and r["seconds"]]
        if times and len(times) == len([r for r in rows if r["tool"] == tool]):
            scores[tool] = math.exp(sum(math.log(t) for t in times) / len(times))
    return (min(scores, key=lambda t: scores[t]) if scores else None), scores


def target_checks(
    rows: list[dict[str, Any]],
    limits: dict[str, Any] | None,
    wls: dict[str, peers.Workload],
    tool: str,
) -> list[dict[str, Any]]:
    by_key = {(r["tool"], r["workload"], r["op"]): r for r in rows}
    checks: list[dict[str, Any]] = []
    save_a = by_key.get((tool, "A", "save"))
    lim = (limits or {}).get("gb_per_s", {})
    if save_a and save_a["seconds"] and lim.get("disk_write"):
        limit_time = wls["A"].nbytes / (lim["disk_write"] * 1e9)
        ratio = save_a["seconds"] / limit_time
        ok = ratio <= DISK_TARGET
        checks.append(
            {
                "check": "save A within 1.2× of the disk write limit",
                "pass": ok,
                "line": (
                    f"save A: {save_a['gb_per_s']:.3f} GB/s = "
                    f"{save_a['gb_per_s'] / lim['disk_write']:.2f}× of disk write limit "
                    f"{lim['disk_write']:.3f} GB/s; time {save_a['seconds']:.3f} s = "
                    f"{ratio:.2f}× limit time {limit_time:.3f} s "
                    f"(target within {DISK_TARGET}×: time ≤ {DISK_TARGET} × limit time): "
                    f"{'PASS' if ok else 'MISS'}"
                ),
            }
        )
    for wl, op in (("A", "save"), ("A", "restore"), ("B", "save"), ("B", "restore")):
        row = by_key.get((tool, wl, op))
        if not row or row["vs_tf"] is None:
            continue
        ok = row["vs_tf"] > 1
        checks.append(
            {
                "check": f"{op} {wl} faster than TF",
                "pass": ok,
                "line": (
                    f"{op} {wl} faster than TF: {'yes' if ok else 'no'} "
                    f"({row['vs_tf']:.2f}×: TF {by_key[(TF, wl, op)]['seconds']:.3f} s, "
                    f"streamckpt {row['seconds']:.3f} s)"
                ),
            }
        )
    restore_a = by_key.get((tool, "A", "restore"))
    if restore_a and restore_a["seconds"] and lim.get("disk_read_cold"):
        checks.append(
            {
                "check": "restore A vs cold disk read limit (information)",
                "pass": None,
                "line": (
                    f"restore A (information): {restore_a['gb_per_s']:.3f} GB/s = "
                    f"{restore_a['gb_per_s'] / lim['disk_read_cold']:.2f}× of the cold "
                    f"sequential read limit {lim['disk_read_cold']:.3f} GB/s"
                ),
            }
        )
    return checks


# -- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small workloads, 1 repeat (smoke run)")
    p.add_argument("--repeats", type=int, help="timed runs per cell (default 3; 1 with --quick)")
    p.add_argument("--dir", help="parent of the scratch directory (default ./bench-out)")
    p.add_argument("--json", metavar="PATH", help="write every result to PATH")
    p.add_argument("--tools", help=f"comma list from: {', '.join(peers.TOOLS)} (default all)")
    p.add_argument("--workloads", default="A,B", help="comma list from A,B (default A,B)")
    p.add_argument("--warm-cache", action="store_true", help="restore from the page cache")
    p.add_argument("--no-warmup", action="store_true", help="time the first save in a process")
    p.add_argument("--timeout", type=float, default=600, help="seconds per child (default 600)")
    p.add_argument(
        "--cell-budget",
        type=float,
        default=30,
        help="stop repeating a peer's (workload, op) once its runs took this many seconds,\n"
        "after at least one run; n in the table shows it; the TF baseline always runs\n"
        "--repeats times (default 30; 0: no limit)",
    )
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    repeats = args.repeats or (1 if args.quick else 3)
    base = os.path.abspath(args.dir or "bench-out")
    os.makedirs(base, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="run-", dir=base)
    all_wls = peers.workloads(args.quick)
    unknown = set(args.workloads.split(",")) - set(all_wls)
    if unknown:
        raise SystemExit(f"unknown workload(s) {', '.join(sorted(unknown))}; known: A, B")
    wls = {w: all_wls[w] for w in args.workloads.split(",")}
    tools, skipped = available_tools(args.tools.split(",") if args.tools else None)
    cold = not args.warm_cache and can_evict(workdir)
    budget = args.cell_budget or math.inf

    info = machine_info(workdir)
    print("== machine")
    print(f"cpu: {info['cpu']}, {info['cores']} cores; RAM {info['ram_gib']:.1f} GiB")
    print(f"disk: {info['disk_free_gib']:.0f} GiB free, {info['filesystem']}")
    print(f"kernel: {info['kernel']}; Python {info['python']}; load average {_loadavg()}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v))
    print(f"scratch: {workdir}; repeats: {repeats}; warm-up save: {not args.no_warmup}")
    if cold:
        print(
            "page cache: the checkpoint's files are evicted (sync + posix_fadvise DONTNEED) "
            "before every restore and before the cold-read limit: cold reads from disk"
        )
    else:
        print(
            "page cache: NOT evicted (--warm-cache, or eviction not possible here): restores "
            "read from the page cache, for every tool alike"
        )
    for tool, why in skipped.items():
        print(f"skipped: {peers.TOOLS[tool]} ({why})")
    print("== workloads")
    for wl in wls.values():
        print(f"{wl.name}: {wl.description} ({wl.nbytes / 1e9:.3f} GB)")
    print("== physical limits", flush=True)
    limit_size = (256 << 20) if args.quick else (1 << 30)
    lim_result = run_child(
        {
            "op": "limits",
            "dir": workdir,
            "size": limit_size,
            "repeats": repeats,
            "cold": cold,
            "quick": args.quick,
        },
        workdir,
        args.timeout,
        "limits",
    )
    limits: dict[str, Any] | None = None
    if lim_result.get("ok"):
        secs = lim_result["seconds"]
        limits = {
            "size": limit_size,
            "seconds": secs,
            "gb_per_s": {k: limit_size / statistics.median(v) / 1e9 for k, v in secs.items() if v},
        }
        names = {
            "disk_write": "disk sequential write (8 MiB os.write + fsync)",
            "disk_read_cold": "disk sequential read, cold cache",
            "memcpy": "memcpy (np.copyto, pre-faulted)",
            "first_touch": "first touch of fresh memory (np.empty + fill)",
            "crc32c": "crc32c (crc32c package, 1 thread)",
        }
        for key, name in names.items():
            if key in limits["gb_per_s"]:
                values = ", ".join(f"{limit_size / s / 1e9:.2f}" for s in secs[key])
                print(f"{name}: {limits['gb_per_s'][key]:.3f} GB/s (runs: {values})")

    cells: dict[tuple[str, str, str], dict[str, Any]] = {}
    raw: list[dict[str, Any]] = []
    for wl in wls.values():
        print(f"== workload {wl.name}", flush=True)
        for tool in tools:
            tool_dir = os.path.join(workdir, f"{tool}-{wl.name}")
            os.makedirs(tool_dir)
            common = {"tool": tool, "workload": wl.name, "dir": tool_dir, "quick": args.quick}
            cell_budget = math.inf if tool == TF else budget
            save = run_child(
                {
                    **common,
                    "op": "save",
                    "repeats": repeats,
                    "warmup": not args.no_warmup,
                    "budget": cell_budget,
                },
                workdir,
                args.timeout,
                f"{tool}-{wl.name}-save",
            )
            raw.append({**common, "op": "save", "result": save})
            cell = cells[(tool, wl.name, "save")] = {"runs": save.get("runs", [])}
            if "first_save_seconds" in save:
                cell["first"] = [save["first_save_seconds"]]
            cell["bytes_on_disk"] = save.get("bytes_on_disk")
            if not save.get("ok"):
                cell["failed"] = save.get("error")
            restore_cell: dict[str, Any] = {"runs": []}
            cells[(tool, wl.name, "restore")] = restore_cell
            restore_wall = 0.0
            for i in range(repeats if save.get("ok") else 0):
                if i and restore_wall > cell_budget:
                    break  # a slow cell: fewer repeats (the table shows n)
                restore = run_child(
                    # the first restore child also compares every tensor with the data
                    {**common, "op": "restore", "cold": cold, "verify": i == 0},
                    workdir,
                    args.timeout,
                    f"{tool}-{wl.name}-restore-{i}",
                )
                raw.append({**common, "op": "restore", "result": restore})
                restore_wall += restore["wall_seconds"]
                if not restore.get("ok"):
                    restore_cell["failed"] = restore.get("error")
                    break
                restore_cell["runs"].extend(restore["runs"])
            if not save.get("ok"):
                restore_cell["failed"] = "no checkpoint (save failed)"
            save_s = [r["seconds"] for r in cell["runs"]]
            restore_s = [r["seconds"] for r in restore_cell["runs"]]
            print(
                f"  {peers.TOOLS[tool]:<22} save {_fmt(_median(save_s), '.3f', ' s')}"
                f"  restore {_fmt(_median(restore_s), '.3f', ' s')}"
                f"  ({save.get('wall_seconds', 0):.0f} s + restores)",
                flush=True,
            )
            shutil.rmtree(tool_dir, ignore_errors=True)
            os.sync()

    rows = summarize(cells, wls)
    print("== results (medians)")
    print_table(rows)
    best, scores = best_streamckpt(rows)
    checks: list[dict[str, Any]] = []
    if best:
        print("== streamckpt num_shards")
        for tool, score in scores.items():
            print(f"{peers.TOOLS[tool]}: geometric mean of its median times {score:.3f} s")
        print(f"best default: num_shards={best.split('-')[1]}; target checks use it")
        print("== target checks")
        checks = target_checks(rows, limits, wls, best)
        for check in checks:
            print(check["line"])
        other = [t for t in scores if t != best]
        for tool in other:
            for check in target_checks(rows, limits, wls, tool):
                if check["pass"] is not None:
                    print(f"  ({peers.TOOLS[tool]}) {check['line']}")
    wall = time.perf_counter() - started
    print(f"== wall time {wall:.0f} s; load average now {_loadavg()} (other processes compete)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "machine": info,
                    "config": {
                        "quick": args.quick,
                        "repeats": repeats,
                        "tools": tools,
                        "skipped": skipped,
                        "cold_restores": cold,
                        "cell_budget_seconds": args.cell_budget,
                        "warmup": not args.no_warmup,
                        "workloads": {
                            w.name: {"description": w.description, "bytes": w.nbytes}
                            for w in wls.values()
                        },
                    },
                    "limits": limits,
                    "rows": rows,
                    "streamckpt_default": best,
                    "streamckpt_scores": scores,
                    "checks": checks,
                    "raw": raw,
                    "wall_seconds": wall,
                },
                f,
                indent=1,
            )
        print(f"wrote {args.json}")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if all(c["seconds"] for c in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
