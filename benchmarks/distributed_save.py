"""A multi-process save: 4 processes x 256 MiB with a coordinator, 1 process x 1 GiB, torch DCP.

One job of --procs processes (``torch.distributed`` over gloo on 127.0.0.1, started by this
module: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) holds a checkpoint of --total-mib: --tensors
float32 tensors of --cols columns, each cut into row pieces, one piece per process, plus small
replicated values (a (cols,) float32 per tensor and an int64 step) that every process holds
and each tool writes once. Per store (local disk under --dir; a loopback S3 server, --server,
started here on 127.0.0.1), --repeats rounds of three timed saves, each into a fresh prefix,
in another order each round (1-2-3, 2-3-1, 3-1-2):

- ``streamckpt 4 proc``: every process ``streamckpt.sync.save(prefix, {name: Slice(...)},
  coordinator=TorchCoordinator())``; one TensorFlow-format checkpoint comes out;
- ``streamckpt 1 proc``: rank 0 alone saves the same tensors whole (no coordinator), the
  others wait in a barrier;
- ``DCP 4 proc``: every process ``torch.distributed.checkpoint.save`` of a state dict of
  ``DTensor``s (Shard(0) over a 1-D CPU mesh, the same memory as the Slices) and the same
  replicated plain tensors (DCP dedups those to one writer). Local disk:
  ``FileSystemWriter(sync_files=True)``, its default; S3: ``FsspecWriter(sync_files=False)``
  (with True, DCP's fsspec writer calls ``os.sync()`` after every file: an s3fs stream has no
  file descriptor to fsync).

The processes start, import, join the process group and make one untimed warm-up save of a
tiny checkpoint with each tool before the clock (on S3 also one of the whole size by rank 0:
a fresh server's first large save is slower). Every timed save starts after ``os.sync()``
(local disk) and a barrier; it lasts from the first process's start to the last process's
return (CLOCK_MONOTONIC, one clock for all processes on one machine); GB/s = bytes of the
checkpoint's values / that time / 1e9; "CPU s" is the CPU time of the processes taking part.
Tables give the median of the rounds and every round's seconds. The checkpoint of round 1 is
read back by rank 0 (one sharded and the replicated tensors, untimed). Between saves rank 0
deletes the previous one.

Coordination: the warm-up save has another structure, so round 1's streamckpt save plans
afresh and rounds 2+ find their plan unchanged (``plan_reused``). Its table gives
``last_coordination(coordinator)`` (the slowest process's plan seconds) and the primary's
``SaveInfo.seconds_by_phase``.

Fairness: both tools fsync their data files on local disk (streamckpt also the directory,
DCP renames its metadata without a directory fsync); the page cache is not dropped
(``/proc/sys/vm/drop_caches`` needs root; dropping is attempted and reported). DCP's
checkpoint is torch-only (pickled metadata, torch.save'd storages): TensorFlow cannot read it,
and it carries no checksum of the data; streamckpt's is TensorFlow's format with a crc32c per
tensor, checked end to end.

--quick: 4 processes x 16 MiB, local disk only, 2 rounds (the second reuses the plan).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

from benchmarks import harness
from benchmarks.endpoints import BUCKET, start_server
from benchmarks.report import Times, loadavg, median, print_table
from benchmarks.workloads import MIB

TOOLS = ("streamckpt 4 proc", "streamckpt 1 proc", "DCP 4 proc")
STORES = ("local", "s3")
STEP = 1_234_567


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--procs", type=int, default=4, help="processes of the job (default 4)")
    p.add_argument("--total-mib", type=int, help="checkpoint size (1024; quick 64)")
    p.add_argument("--tensors", type=int, default=4, help="sharded tensors (default 4)")
    p.add_argument("--cols", type=int, default=1024, help="columns of each tensor (1024)")
    p.add_argument("--repeats", type=int, help="rounds of timed saves (3; quick 2)")
    p.add_argument("--stores", help="local,s3 (default both; quick local)")
    p.add_argument("--server", choices=["seaweedfs", "moto"], default="seaweedfs", help="S3")
    p.add_argument("--no-dcp", action="store_true", help="leave torch DCP out")
    p.add_argument("--timeout", type=float, default=600, help="seconds per job")


def _defaults(args: argparse.Namespace) -> None:
    if args.total_mib is None:
        args.total_mib = 64 if args.quick else 1024
    if args.repeats is None:
        args.repeats = 2 if args.quick else 3
    stores = args.stores or ("local" if args.quick else ",".join(STORES))
    args.stores = [s for s in stores.split(",") if s]
    unknown = set(args.stores) - set(STORES)
    if unknown:
        raise SystemExit(f"unknown store(s) {sorted(unknown)} (of {', '.join(STORES)})")
    rows = args.total_mib * MIB // (args.tensors * args.cols * 4)
    if rows * args.tensors * args.cols * 4 != args.total_mib * MIB or rows % args.procs:
        raise SystemExit(
            f"--total-mib {args.total_mib} does not cut into {args.tensors} tensors of "
            f"{args.cols} float32 columns with rows divisible by {args.procs} processes"
        )
    args.rows = rows


# -- the data -----------------------------------------------------------------------------------


def _piece(np: Any, t: int, r: int, rows: int, cols: int) -> Any:
    """Rows ``r * rows ..`` of tensor ``t``: the same values in whichever process makes them."""
    return np.random.default_rng([t, r]).random((rows, cols), dtype=np.float32)


def _replicated(np: Any, tensors: int, cols: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        f"norm{t}": np.random.default_rng([t, 99]).random(cols, dtype=np.float32)
        for t in range(tensors)
    }
    out["step"] = np.array(STEP, dtype=np.int64)
    return out


def _can_drop_caches() -> bool:
    """Whether ``echo 3 > /proc/sys/vm/drop_caches`` works here (it does, once, if so)."""
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        return True
    except OSError:
        return False


def _disk_limit(size: int, workdir: str) -> float | None:
    """One writer's sequential write of ``size`` bytes + fsync here (``harness.limits``)."""
    got = harness.run_child(
        "harness.limits", {"size": size, "repeats": 1, "dir": workdir, "direct": False},
        workdir=workdir, label="limits",
    )  # fmt: skip
    seconds = got.get("seconds", {}).get("disk_write") if got.get("ok") else None
    if not seconds:
        return None
    rate = size / seconds[0] / 1e9
    print(f"disk sequential write (one writer, 8 MiB os.write + fsync): {rate:.2f} GB/s")
    return rate


def checkpoint_bytes(args: argparse.Namespace) -> int:
    return args.total_mib * MIB + args.tensors * args.cols * 4 + 8


# -- the machine's CPU -------------------------------------------------------------------------


def _cpu_sample(root_pid: int) -> tuple[float, float, float]:
    """(now, CPU seconds of the whole machine, of ``root_pid`` and its descendants: this
    benchmark, its job and its server)."""
    tick = os.sysconf("SC_CLK_TCK")
    machine = 0.0
    with contextlib.suppress(OSError, ValueError), open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq = map(int, f.readline().split()[1:8])
        machine = (user + nice + system + irq + softirq) / tick
    parents, used = {}, {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError, ValueError, IndexError), open(f"/proc/{entry}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
            parents[int(entry)], used[int(entry)] = int(rest[1]), int(rest[11]) + int(rest[12])
    tree, frontier = {root_pid}, [root_pid]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier += children
    return time.monotonic(), machine, sum(used.get(pid, 0) for pid in tree) / tick


def _background(before: tuple[float, float, float], after: tuple[float, float, float]) -> float:
    """Cores that work outside this benchmark kept busy between two samples ("bg")."""
    seconds = after[0] - before[0]
    return max(0.0, ((after[1] - before[1]) - (after[2] - before[2])) / seconds)


# -- one process of the job ---------------------------------------------------------------------


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One process of the job (forked by :func:`job`); its timings per save."""
    began = time.monotonic()
    import warnings

    warnings.filterwarnings("ignore")
    import numpy as np
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import DTensor, Shard, init_device_mesh

    import streamckpt.sync
    from streamckpt import Slice
    from streamckpt.distributed import TorchCoordinator
    from streamckpt.distributed.save import last_coordination

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    tensors, rows, cols = spec["tensors"], spec["rows"], spec["cols"]
    per = rows // world
    root, options, local = spec["root"], spec["options"], spec["store"] == "local"
    from datetime import timedelta

    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=timedelta(seconds=spec["timeout"])
    )
    try:
        coordinator = TorchCoordinator(timeout=spec["timeout"])
        joined = time.monotonic()
        mesh = init_device_mesh("cpu", (world,))
        fs = None
        if not local:
            import fsspec

            fs = fsspec.filesystem("s3", skip_instance_cache=True, **options)

        def remove(path: str) -> None:
            if local:
                shutil.rmtree(path, ignore_errors=True)
            else:
                assert fs is not None
                with contextlib.suppress(FileNotFoundError):
                    fs.rm(path, recursive=True)
                fs.invalidate_cache()

        # the values: row pieces (rank 0: also the whole tensors, its pieces are views)
        replicated = _replicated(np, tensors, cols)
        whole: dict[str, Any] = {}
        mine: dict[str, Any] = {}
        for t in range(tensors):
            if rank == 0 and spec["single"]:
                whole[f"t{t}"] = np.concatenate([_piece(np, t, r, per, cols) for r in range(world)])
                mine[f"t{t}"] = whole[f"t{t}"][:per]
            else:
                mine[f"t{t}"] = _piece(np, t, rank, per, cols)
        whole |= replicated

        def sc_tensors(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
            out: dict[str, Any] = {
                prefix + name: Slice(v, full_shape=(rows, cols), offset=(rank * per, 0))
                for name, v in values.items()
            }
            return out | {prefix + k: v for k, v in replicated.items()}

        def dcp_state(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
            state: dict[str, Any] = {
                prefix + name: DTensor.from_local(
                    torch.from_numpy(v),
                    mesh,
                    [Shard(0)],
                    run_check=False,
                    shape=torch.Size((v.shape[0] * world, v.shape[1])),
                    stride=(v.shape[1], 1),
                )
                for name, v in values.items()
            }
            for name, v in replicated.items():
                state[prefix + name] = torch.from_numpy(v)
            return state

        def dcp_writer(path: str) -> Any:
            if local:
                return dcp.FileSystemWriter(path, sync_files=True)
            from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

            return FsspecWriter(path, sync_files=False, **options)

        def url(name: str) -> str:
            return f"{root}/{name}"

        def sc4(name: str, values: dict[str, Any]) -> Any:
            return streamckpt.sync.save(
                url(name) + "/ckpt", values, coordinator=coordinator, storage_options=options
            )

        def sc1(name: str, values: dict[str, Any]) -> Any:
            return streamckpt.sync.save(url(name) + "/ckpt", values, storage_options=options)

        def save_dcp(name: str, state: dict[str, Any]) -> Any:
            return dcp.save(state, storage_writer=dcp_writer(url(name)))

        drop = spec["drop_caches"]

        def timed(fn: Callable[[], Any], takes_part: bool = True) -> dict[str, Any]:
            """``fn`` between two barriers; rank 0 also samples the machine's CPU around it."""
            if local:
                os.sync()
            if drop and rank == 0:
                with contextlib.suppress(OSError), open("/proc/sys/vm/drop_caches", "w") as f:
                    f.write("3")
            sample = _cpu_sample(spec["root_pid"]) if rank == 0 else None
            dist.barrier()
            c0, t0 = time.process_time(), time.monotonic()
            value = fn() if takes_part else None
            t1, c1 = time.monotonic(), time.process_time()
            dist.barrier()
            out = {"start": t0, "end": t1, "cpu": c1 - c0, "value": value}
            if sample is not None:
                out["bg"] = _background(sample, _cpu_sample(spec["root_pid"]))
            return out

        # warm-up: a tiny checkpoint of another structure with each tool, untimed
        tiny = {"w": np.ones((world * 2, 8), np.float32)[:2]}
        warm_slices = {
            "warm/w": Slice(tiny["w"], full_shape=(world * 2, 8), offset=(2 * rank, 0)),
            "warm/step": np.array(1, np.int64),
        }
        timed(lambda: sc4("warm-sc4", warm_slices))
        timed(lambda: sc1("warm-sc1", {"warm/w": tiny["w"]}), rank == 0)
        if spec["dcp"]:
            timed(lambda: save_dcp("warm-dcp", dcp_state(tiny, "warm/")))
        if rank == 0:
            for name in ("warm-sc4", "warm-sc1", "warm-dcp"):
                remove(url(name))

        if not local and spec["single"]:
            # a fresh S3 server's first large save costs it more (SeaweedFS grows its volumes):
            # one of the whole size, by rank 0 without the coordinator (its plan cache stays)
            timed(lambda: sc1("warm-big", whole), rank == 0)
            if rank == 0:
                remove(url("warm-big"))
        warm = time.monotonic()
        saves: list[dict[str, Any]] = []
        verified: list[str] = []
        sc_values, dcp_values = sc_tensors(mine), dcp_state(mine) if spec["dcp"] else {}

        def run_sc4(i: int) -> None:
            name = f"sc4-{i}"
            got = timed(lambda: sc4(name, sc_values))
            info = got.pop("value")
            coordination = dict(last_coordination(coordinator))
            got |= {
                "tool": TOOLS[0],
                "round": i,
                "plan_seconds": coordination["plan_seconds"],
                "plan_reused": bool(coordination["plan_reused"]),
                "phases": dict(info.seconds_by_phase),
                "seconds_in_save": info.seconds,
                "bytes": info.bytes_written,
                "num_shards": info.num_shards,
                "requests": info.stats.get("requests"),
            }
            saves.append(got)
            if i == 0 and rank == 0:  # read back what the job wrote (untimed)
                names = ["t0", "norm0", "step"]
                back = streamckpt.sync.load(
                    url(name) + "/ckpt", names=names, storage_options=options
                )
                want = [np.concatenate([_piece(np, 0, r, per, cols) for r in range(world)])]
                want += [replicated["norm0"], replicated["step"]]
                for n, w in zip(names, want, strict=True):
                    if back[n].shape != w.shape or not np.array_equal(back[n], w):
                        raise AssertionError(f"{n} read back differs from what was saved")
                verified.extend(names)
            if rank == 0:
                remove(url(name))

        def run_sc1(i: int) -> None:
            name = f"sc1-{i}"
            got = timed(lambda: sc1(name, whole), rank == 0)
            if rank == 0:
                info = got.pop("value")
                got |= {"tool": TOOLS[1], "round": i, "bytes": info.bytes_written}
                got |= {"num_shards": info.num_shards, "phases": dict(info.seconds_by_phase)}
                saves.append(got)
                remove(url(name))
            else:  # what waiting in gloo's barrier costs the others
                saves.append({"tool": "waiting", "round": i, "cpu": got["cpu"]})

        def run_dcp(i: int) -> None:
            name = f"dcp-{i}"
            got = timed(lambda: save_dcp(name, dcp_values))
            got.pop("value")
            got |= {"tool": TOOLS[2], "round": i}
            saves.append(got)
            if rank == 0:
                remove(url(name))

        # every round in another order: no tool always follows the same one (disk writeback,
        # a cloud disk's burst credits, the server's state)
        order = (
            [run_sc4] + ([run_sc1] if spec["single"] else []) + ([run_dcp] if spec["dcp"] else [])
        )
        for i in range(spec["repeats"]):
            for run in order[i % len(order) :] + order[: i % len(order)]:
                run(i)
        timed(lambda: None)
        marks = {"began": began, "joined": joined, "warm": warm, "done": time.monotonic()}
        return {"rank": rank, "saves": saves, "verified": verified, "marks": marks}
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


# -- the launcher -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def job(spec: dict[str, Any]) -> dict[str, Any]:
    """The job (a ``harness.run_child`` child): import once, fork one process per rank.

    The imports (torch alone takes 5-9 s of CPU on a busy 2-core machine) are made here, once,
    and inherited; no thread runs yet (the process group and the coordinator are made after
    the fork), so the fork is safe. Each rank gets the environment of
    a ``torch.distributed`` job and dies with this process (``PR_SET_PDEATHSIG``); when a rank
    fails or the job runs past ``spec["timeout"]`` every rank left is killed.
    """
    import ctypes
    import importlib

    # torch._dynamo: DTensor.from_local's first call imports it (3-4 s of CPU per process)
    for module in ("numpy", "torch.distributed.checkpoint", "torch.distributed.tensor"):
        importlib.import_module(module)
    importlib.import_module("torch._dynamo")
    importlib.import_module("streamckpt.distributed.torch_coordinator")
    importlib.import_module("streamckpt.sync")

    procs, port = spec["procs"], _free_port()
    sys.stdout.flush()
    pids: dict[int, int] = {}
    for rank in range(procs):
        pid = os.fork()
        if pid == 0:  # the rank
            code = 1
            try:
                ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
                os.environ.update(
                    RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(procs),
                    MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                )  # fmt: skip
                result: dict[str, Any] = {"ok": True} | worker(spec)
                code = 0
            except BaseException as exc:
                traceback.print_exc()
                result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
            finally:
                with contextlib.suppress(BaseException):
                    with open(f"{spec['result_prefix']}-{rank}.json", "w") as f:
                        json.dump(result, f)
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        pids[pid] = rank
    deadline = time.monotonic() + spec["timeout"]
    codes: dict[int, int] = {}
    try:
        while len(codes) < procs and time.monotonic() < deadline:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                time.sleep(0.1)
                continue
            codes[pids[pid]] = os.waitstatus_to_exitcode(status)
            if codes[pids[pid]] != 0:
                break  # the others would wait for it until their timeout
    finally:
        for pid, rank in pids.items():
            if rank not in codes:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
    results: list[dict[str, Any]] = []
    for rank in range(procs):
        try:
            with open(f"{spec['result_prefix']}-{rank}.json") as f:
                results.append(json.load(f))
        except (OSError, ValueError):
            why = (
                f"no result (exit {codes[rank]})"
                if rank in codes
                else "killed (timeout, or a peer failed)"
            )
            results.append({"ok": False, "error": why})
    failed = [f"rank {r}: {got['error']}" for r, got in enumerate(results) if not got["ok"]]
    if failed:
        raise RuntimeError("; ".join(failed)[:1500])
    return {"results": results}


def run_job(spec: dict[str, Any], workdir: str, label: str) -> list[dict[str, Any]] | None:
    """Every rank's result, or None (the child's log tail is printed)."""
    spec = spec | {"result_prefix": os.path.join(workdir, f"rank-{label}")}
    got = harness.run_child(
        "distributed_save.job", spec, workdir=workdir, label=label, timeout=spec["timeout"] + 60
    )
    return got["results"] if got.get("ok") else None


# -- the figures --------------------------------------------------------------------------------


def summarize(results: list[dict[str, Any]], nbytes: int, repeats: int) -> dict[str, Any]:
    """Per tool: each round's wall time (first start to last return), CPU, and the median."""
    tools: dict[str, Any] = {}
    for tool in TOOLS:
        runs = []
        for i in range(repeats):
            mine = [s for r in results for s in r["saves"] if s["tool"] == tool and s["round"] == i]
            if mine:
                wall = max(s["end"] for s in mine) - min(s["start"] for s in mine)
                cpu = sum(s["cpu"] for s in mine)
                bg = [s["bg"] for s in mine if "bg" in s]
                run = {"seconds": wall, "cpu": cpu, "processes": len(mine), "bg": bg[0]}
                if tool == TOOLS[1]:
                    run["others_waiting_cpu"] = sum(
                        s["cpu"]
                        for r in results
                        for s in r["saves"]
                        if s["tool"] == "waiting" and s["round"] == i
                    )
                runs.append(run)
        if runs:
            seconds = median(r["seconds"] for r in runs)
            assert seconds is not None
            tools[tool] = {
                "runs": runs,
                "seconds": seconds,
                "gb_per_s": nbytes / seconds / 1e9,
                "cpu": median(r["cpu"] for r in runs),
                "bg": median(r["bg"] for r in runs),
            }
    coordination = []
    for i in range(repeats):
        mine = [s for r in results for s in r["saves"] if s["tool"] == TOOLS[0] and s["round"] == i]
        primary = next(s for s in results[0]["saves"] if s["tool"] == TOOLS[0] and s["round"] == i)
        coordination.append(
            {
                "round": i + 1,
                "plan_seconds_max": max(s["plan_seconds"] for s in mine),
                "plan_reused": all(s["plan_reused"] for s in mine),
                "phases": primary["phases"],
                "seconds_in_save": primary["seconds_in_save"],
                "num_shards": primary["num_shards"],
                "requests": primary["requests"],
                "bytes": primary["bytes"],
            }
        )
    return {"tools": tools, "coordination": coordination}


def print_store(title: str, summary: dict[str, Any]) -> None:
    tools = summary["tools"]
    dcp = tools.get(TOOLS[2], {}).get("gb_per_s")
    rows = []
    for tool in TOOLS:
        got = tools.get(tool)
        if got is None:
            rows.append([tool])
            continue
        vs = Times(got["gb_per_s"] / dcp) if dcp else None
        each = " ".join(f"{r['seconds']:.2f}" for r in got["runs"])
        rows.append([tool, got["seconds"], got["gb_per_s"], vs, got["cpu"], got["bg"], each])
    header = ["tool", "seconds", "GB/s", "vs DCP", "CPU s", "bg", "rounds (s)"]
    print_table(title + " (median of rounds; vs DCP > 1: faster than DCP)", header, rows)
    waiting = [r.get("others_waiting_cpu") for r in tools.get(TOOLS[1], {}).get("runs", [])]
    print(
        "CPU s: CPU time of the processes taking part; bg: cores busy outside this benchmark "
        "(other work on the machine) meanwhile"
        + (
            f"; the other ranks, waiting in a barrier: {median(waiting):.2f} CPU s"
            if waiting
            else ""
        )
    )
    coord_rows = [
        [
            f"save {c['round']}",
            "yes" if c["plan_reused"] else "no",
            c["plan_seconds_max"] * 1e3,
            c["phases"].get("plan", 0.0) * 1e3,
            c["phases"].get("write_shards", 0.0),
            c["phases"].get("commit_index", 0.0) * 1e3,
            c["seconds_in_save"],
            c["num_shards"],
            c["requests"],
        ]
        for c in summary["coordination"]
    ]
    header = ["save", "plan reused", "plan ms", "'plan' ms", "write_shards s"]
    header += ["commit_index ms", "save s", "shards", "requests"]
    title += ": streamckpt 4 proc coordination (plan ms: slowest process; phases: primary's)"
    print_table(title, header, coord_rows)


def main(args: argparse.Namespace) -> dict[str, Any]:
    _defaults(args)
    base = os.path.abspath(args.dir or "bench-out")
    os.makedirs(base, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="distributed-", dir=base)
    nbytes = checkpoint_bytes(args)
    drop = _can_drop_caches()
    per = args.total_mib // args.procs
    print(
        f"job: {args.procs} processes x {per} MiB ({args.tensors} float32 tensors of "
        f"({args.rows}, {args.cols}) cut in row pieces, + {args.tensors + 1} small replicated "
        f"values) = {nbytes / 1e9:.3f} GB; {args.repeats} rounds; stores: {args.stores}"
    )
    print(
        "page cache: "
        + (
            "dropped (drop_caches) before every timed save"
            if drop
            else "NOT dropped (/proc/sys/vm/drop_caches is not writable here); os.sync() "
            "before every timed save on local disk; both tools fsync their files"
        )
    )
    spec = {
        "tensors": args.tensors, "rows": args.rows, "cols": args.cols, "repeats": args.repeats,
        "dcp": not args.no_dcp, "single": True, "procs": args.procs, "drop_caches": drop,
        "timeout": args.timeout, "root_pid": os.getpid(),
    }  # fmt: skip
    out: dict[str, Any] = {"ok": True, "bytes": nbytes, "procs": args.procs, "stores": {}}
    try:
        for store in args.stores:
            with contextlib.ExitStack() as stack:
                if store == "local":
                    root = os.path.join(workdir, "ckpt")
                    os.makedirs(root)
                    if not args.quick:
                        out["disk_write_gb_per_s"] = _disk_limit(args.total_mib * MIB, workdir)
                    store_spec = spec | {"store": "local", "root": root, "options": None}
                    title = "distributed save, local disk"
                else:
                    server = stack.enter_context(start_server(args.server))
                    opts = server.storage_options()
                    url = f"s3://{BUCKET}/dist"
                    store_spec = spec | {"store": "s3", "root": url, "options": opts}
                    title = f"distributed save, S3 ({args.server}, loopback)"
                print(f"== {title}; load average before: {loadavg()}", flush=True)
                t0 = time.perf_counter()
                results = run_job(store_spec, workdir, store)
                wall = time.perf_counter() - t0
                if results is not None:
                    marks = [r["marks"] for r in results]
                    start = min(m["began"] for m in marks)
                    joined = max(m["joined"] for m in marks) - start
                    warm = max(m["warm"] for m in marks) - start
                    print(
                        f"   job: {wall:.0f} s (imports before the fork; ranks joined after "
                        f"{joined:.1f} s, warm-ups done after {warm:.1f} s); load average "
                        f"after: {loadavg()}"
                    )
                if results is None:
                    out["ok"] = False
                    out["stores"][store] = {"error": "the job failed"}
                    continue
                summary = summarize(results, nbytes, args.repeats)
                summary["verified"] = results[0]["verified"]
                read_back = ", ".join(summary["verified"])
                print(
                    f"round 1's streamckpt 4 proc checkpoint read back by rank 0: {read_back} equal"
                )
                summary["loadavg_after"] = loadavg()
                print_store(title, summary)
                out["stores"][store] = summary
                out["ok"] = out["ok"] and len(summary["tools"]) == (3 if spec["dcp"] else 2)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(
        "\nDCP's checkpoint is torch-only (TensorFlow cannot read it) and checksums nothing; "
        "streamckpt's is TensorFlow's format with a crc32c per tensor, checked on every read."
    )
    return out
