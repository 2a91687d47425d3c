"""Part 1 of the object-store benchmark: save and load throughput, and the link check.

Rule: every tool runs the same way on an endpoint: untimed warm-ups first, then save and load
timed from the call to its return, each load checked against the data afterwards, the bucket
emptied after each tool. Tools: ``prepare_load(like) -> state`` (untimed) and
``load(ep, root, state) -> (arrays, stats)``. See ``benchmarks.objectstore`` for the method.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import gc
import importlib
import json
import os
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

from benchmarks.endpoints import BUCKET, Endpoint, direct_to
from benchmarks.report import Times, mean, print_table
from benchmarks.workloads import MB, MIB, check_equal, make_arrays, workload_a

INGEST_CONCURRENCY = (1, 2, 4, 8)


# -- tools --------------------------------------------------------------------------------------


class Tool:
    label = ""
    num_shards: int | None = None

    def __init__(self) -> None:
        self.chosen: set[int] = set()  # the shard counts streamckpt's saves made

    def save(self, ep: Endpoint, root: str, arrays: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def prepare_load(self, like: dict[str, Any]) -> Any:
        return None

    def load(self, ep: Endpoint, root: str, state: Any) -> tuple[dict[str, Any], Any]:
        raise NotImplementedError


class StreamCkptTool(Tool):
    """``num_shards=None``: a save without the argument (the store's choice)."""

    def __init__(self, num_shards: int | None) -> None:
        super().__init__()
        self.num_shards = num_shards
        plural = "s" if num_shards != 1 else ""
        self.label = f"streamckpt {num_shards or 'default'} shard{plural}"

    def save(self, ep: Endpoint, root: str, arrays: dict[str, Any]) -> dict[str, Any]:
        import streamckpt.sync

        info = streamckpt.sync.save(
            f"{root}/ckpt", arrays, num_shards=self.num_shards, storage_options=ep.options()
        )
        self.chosen.add(info.num_shards)
        return dict(info.stats)

    def load(self, ep: Endpoint, root: str, state: Any) -> tuple[dict[str, Any], Any]:
        import streamckpt.sync

        stats: dict[str, float] = {}
        out = streamckpt.sync.load(f"{root}/ckpt", storage_options=ep.options(), stats=stats)
        return out, stats


class NaiveTool(Tool):
    """One object per tensor, put / got one after the other through the same fsspec client."""

    label = "naive (1 req at a time)"

    def save(self, ep: Endpoint, root: str, arrays: dict[str, Any]) -> dict[str, Any]:
        fs, root = ep.fs(), root.split("://", 1)[1]
        manifest = {}
        for i, (name, value) in enumerate(arrays.items()):
            # botocore takes bytes, not a memoryview: one copy per tensor (~0.2 s per GiB)
            fs.pipe_file(f"{root}/t{i:05d}", value.tobytes())
            manifest[name] = [f"t{i:05d}", str(value.dtype), list(value.shape)]
        fs.pipe_file(f"{root}/manifest.json", json.dumps(manifest).encode())
        return {"requests": len(arrays) + 1}

    def load(self, ep: Endpoint, root: str, state: Any) -> tuple[dict[str, Any], Any]:
        import numpy as np

        fs, root = ep.fs(), root.split("://", 1)[1]
        manifest = json.loads(fs.cat_file(f"{root}/manifest.json"))
        out = {}
        for name, (obj, dtype, shape) in manifest.items():
            out[name] = np.frombuffer(fs.cat_file(f"{root}/{obj}"), dtype=dtype).reshape(shape)
        return out, {"requests": len(manifest) + 1}


class TorchDcpTool(Tool):
    """torch DCP's fsspec writer and reader in one process, loading into tensors allocated
    before the timer."""

    def __init__(self) -> None:
        super().__init__()
        warnings.filterwarnings("ignore", message=".*torch.distributed.*")
        warnings.filterwarnings("ignore", category=UserWarning, module="torch.*")
        self.label = "torch DCP fsspec"
        self.torch = importlib.import_module("torch")
        self.dcp = importlib.import_module("torch.distributed.checkpoint")
        fsspec_io = importlib.import_module("torch.distributed.checkpoint._fsspec_filesystem")
        self.writer, self.reader = fsspec_io.FsspecWriter, fsspec_io.FsspecReader

    def save(self, ep: Endpoint, root: str, arrays: dict[str, Any]) -> dict[str, Any]:
        state = {name: self.torch.from_numpy(value) for name, value in arrays.items()}
        writer = self.writer(f"{root}/dcp", sync_files=False, **ep.options())
        self.dcp.save(state, storage_writer=writer)
        return {}

    def prepare_load(self, like: dict[str, Any]) -> Any:
        return {
            n: self.torch.empty(tuple(v.shape), dtype=self.torch.float32) for n, v in like.items()
        }

    def load(self, ep: Endpoint, root: str, state: Any) -> tuple[dict[str, Any], Any]:
        self.dcp.load(state, storage_reader=self.reader(f"{root}/dcp", **ep.options()))
        return {name: t.numpy() for name, t in state.items()}, {}


def make_tools(shards: list[int | None], want_dcp: bool) -> tuple[list[Tool], str | None]:
    tools: list[Tool] = [StreamCkptTool(n) for n in shards]
    tools.append(NaiveTool())
    if not want_dcp:
        return tools, "torch DCP skipped (--no-dcp)"
    try:
        tools.append(TorchDcpTool())
    except ImportError as exc:
        return tools, f"torch DCP skipped: its fsspec writer is not importable ({exc})"
    return tools, None


# -- measuring ----------------------------------------------------------------------------------


def _cpu_seconds() -> tuple[float | None, float]:
    """CPU seconds used so far by the whole machine and by this process and its children
    (servers, proxy): the difference is what other work on the machine took."""
    tick = os.sysconf("SC_CLK_TCK")
    machine = None
    with contextlib.suppress(OSError, ValueError), open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq = map(int, f.readline().split()[1:8])
        machine = (user + nice + system + irq + softirq) / tick
    parents, used = {}, {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError, ValueError, IndexError), open(f"/proc/{entry}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
            parents[int(entry)], used[int(entry)] = int(rest[1]), (int(rest[11]) + int(rest[12]))
    tree, frontier = {os.getpid()}, [os.getpid()]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier += children
    return machine, sum(used.get(pid, 0) for pid in tree) / tick


def timed(fn: Callable[[], Any]) -> tuple[float, Any, float | None]:
    """Seconds, the value, and the cores busy outside this benchmark meanwhile ("bg")."""
    import streamckpt

    streamckpt.clear_index_cache()
    gc.collect()
    machine0, tree0 = _cpu_seconds()
    t0 = time.perf_counter()
    value = fn()
    seconds = time.perf_counter() - t0
    machine1, tree1 = _cpu_seconds()
    bg = None
    if machine0 is not None and machine1 is not None:
        bg = max(0.0, ((machine1 - machine0) - (tree1 - tree0)) / seconds)
    return seconds, value, bg


def run_tool(ep: Endpoint, tool: Any, arrays: dict[str, Any], tag: str, repeats: int) -> Any:
    """Save then load, each ``repeats`` times (median); every load checked; bucket emptied."""
    nbytes = sum(int(a.nbytes) for a in arrays.values())
    row: dict[str, Any] = {"tool": tool.label, "endpoint": ep.label, "direct": ep.direct}
    row |= {"bytes": nbytes, "mib": round(nbytes / MIB)}
    times: dict[str, list[float]] = {"save": [], "load": []}
    bgs: dict[str, list[float | None]] = {"save": [], "load": []}
    for rep in range(repeats):
        root = f"{ep.scheme}://{BUCKET}/{tag}/r{rep}"
        ep.wire_begin()
        seconds, stats, bg = timed(lambda: tool.save(ep, root, arrays))  # noqa: B023
        row["save_requests"], row["save_wire"] = stats.get("requests"), ep.wire_requests()
        times["save"].append(seconds)
        bgs["save"].append(bg)
        state = tool.prepare_load(arrays)
        ep.wire_begin()
        seconds, (loaded, stats), bg = timed(lambda: tool.load(ep, root, state))  # noqa: B023
        row["load_requests"], row["load_wire"] = stats.get("requests"), ep.wire_requests()
        times["load"].append(seconds)
        bgs["load"].append(bg)
        check_equal(arrays, loaded, tool.label)
        del loaded
        ep.clear()
    for op in ("save", "load"):
        row[f"{op}_s"] = statistics.median(times[op])
        row[f"{op}_mbps"] = nbytes / row[f"{op}_s"] / MB
        row[f"{op}_bg"] = mean(bgs[op])
    row["n"] = repeats
    return row


def warm_up(ep: Endpoint, tools: list[Any], arrays: dict[str, Any]) -> None:
    """Untimed: a tiny save + load per tool (sessions, imports, planners), then one streamckpt
    save + load of the whole workload (a server's first large save costs it more: on a 2-core
    VM fake-gcs-server's first 256 MiB compose took 1.2-1.9 s, later ones 0.53-0.88 s)."""
    import numpy as np

    import streamckpt.sync

    tiny = {"w": np.arange(1024, dtype=np.float32).reshape(4, 256), "b": np.ones(4, np.float32)}
    for i, tool in enumerate(tools):
        root = f"{ep.scheme}://{BUCKET}/warmup/{i}"
        tool.save(ep, root, tiny)
        check_equal(tiny, tool.load(ep, root, tool.prepare_load(tiny))[0], tool.label)
        tool.chosen.clear()
    root = f"{ep.scheme}://{BUCKET}/warmup/full/ckpt"
    streamckpt.sync.save(root, arrays, num_shards=1, storage_options=ep.options())
    streamckpt.sync.load(root, storage_options=ep.options())
    ep.clear()


def part1_endpoint(ep: Endpoint, tools: list[Any], arrays: dict[str, Any], repeats: int) -> Any:
    warm_up(ep, tools, arrays)
    rows = []
    for i, tool in enumerate(tools):
        t0 = time.perf_counter()
        row = run_tool(ep, tool, arrays, f"a{i}", repeats)
        rows.append(row)
        if isinstance(tool, StreamCkptTool) and tool.num_shards is None:
            row["shards_chosen"] = sorted(tool.chosen)
            row["tool"] += f" [{'/'.join(map(str, sorted(tool.chosen)))}]"
        tool.chosen.clear()
        print(
            f"  [{ep.label}] {row['tool']}: save {row['save_mbps']:.0f} MB/s, "
            f"load {row['load_mbps']:.0f} MB/s ({time.perf_counter() - t0:.1f} s)",
            flush=True,
        )
    naive = next(r for r in rows if r["tool"] == NaiveTool.label)
    for row in rows:
        row["save_x_naive"] = Times(row["save_mbps"] / naive["save_mbps"])
        row["load_x_naive"] = Times(row["load_mbps"] / naive["load_mbps"])
    return rows


def print_part1(rows: list[dict[str, Any]], workloads: dict[str, str], note: str | None) -> None:
    twins = {(r["endpoint"], r["tool"], r["mib"]): r for r in rows}
    header = ["endpoint / tool", "MiB", "MB/s", "x naive", "of direct", "seconds", "req"]
    header += ["wire", "bg"]
    for op in ("save", "load"):
        table = []
        for r in rows:
            twin = twins.get((r["direct"], r["tool"], r["mib"]))
            of_direct = None if twin is None else f"{r[f'{op}_mbps'] / twin[f'{op}_mbps']:.0%}"
            figures = [r[f"{op}_{k}"] for k in ("s", "requests", "wire", "bg")]
            label = f"{r['endpoint']} / {r['tool']}"
            table.append(
                [label, r["mib"], r[f"{op}_mbps"], r[f"{op}_x_naive"], of_direct, *figures]
            )
        print_table(f"Part 1: workload A {op} (MB = 1e6 bytes)", header, table)
    for label, text in workloads.items():
        print(f"  {label}: {text}")
    print(
        "  x naive: MB/s over the naive tool's on the same endpoint; of direct: through the\n"
        "  proxy over the same tool without it; req: requests in streamckpt's stats (naive: by\n"
        "  construction); wire: HTTP requests the proxy relayed; bg: cores busy outside this\n"
        "  benchmark; [n]: the shard counts a save without num_shards made"
    )
    if note:
        print(f"  {note}")


def calibrate(ep: Endpoint, size: int, puts: int) -> dict[str, Any]:
    """One connection: a ``size`` PUT and GET and a tiny GET; then what the server ingests at
    all, ``puts`` PUTs of size/2 n at a time (where one stream is the most it takes, no
    client can go past that line)."""
    fs, path = ep.fs(), f"{BUCKET}/calibration"
    payload = os.urandom(size)
    fs.pipe_file(path, payload)  # warm: connection open, object in place
    row: dict[str, Any] = {"endpoint": ep.label}
    row["put_s"], _, _ = timed(lambda: fs.pipe_file(path, payload))
    row["get_s"], _, row["bg"] = timed(lambda: fs.cat_file(path))
    row["tiny_s"], _, _ = timed(lambda: fs.cat_file(path, start=0, end=16))
    part = payload[: size // 2]
    for n in INGEST_CONCURRENCY:
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            start = time.perf_counter()
            list(pool.map(lambda i: fs.pipe_file(f"{BUCKET}/ingest/{i}", part), range(puts)))
            row[f"ingest_{n}"] = puts * len(part) / (time.perf_counter() - start) / MB
    ep.clear()
    return row | {"put_mbps": size / row["put_s"] / MB, "get_mbps": size / row["get_s"] / MB}


def print_calibration(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    size = args.calibration_bytes
    header = ["endpoint", "PUT MB/s", "GET MB/s", "16 B GET ms"]
    header += [f"ingest x{n}" for n in INGEST_CONCURRENCY] + ["bg"]
    print_table(
        f"Part 1, link check: one connection, one {size // MIB} MiB request each way, one tiny "
        f"GET; ingest: MB/s of {args.ingest_puts} x {size // 2 // MIB} MiB PUTs, n at a time",
        header,
        [
            [r["endpoint"], r["put_mbps"], r["get_mbps"], r["tiny_s"] * 1e3]
            + [r[f"ingest_{n}"] for n in INGEST_CONCURRENCY]
            + [r["bg"]]
            for r in rows
        ],
    )
    print(f"  proxy pacing: {args.proxy_pacing}")


def part1(args: argparse.Namespace, direct: list[Endpoint], slow: list[Endpoint]) -> Any:
    tools, note = make_tools(args.shards, not args.no_dcp)
    print(f"\n== part 1: {', '.join(t.label for t in tools)}", flush=True)
    # (--quick: through the proxy only; the direct check is the same code)
    checked = [ep for s in slow for ep in ([s] if args.quick else [direct_to(s.server), s])]
    links = [calibrate(ep, args.calibration_bytes, args.ingest_puts) for ep in checked]
    # the proxied servers also run without the proxy at the proxy's size, for "of direct"
    same = args.size_mib == args.proxy_size_mib
    twins = [direct_to(s.server) for s in slow if not (s.server.kind in args.servers and same)]
    rows: list[dict[str, Any]] = []
    workloads = {}
    for size, endpoints in ((args.size_mib, direct), (args.proxy_size_mib, twins + slow)):
        if endpoints:
            wl = workload_a(size * MIB, args.count)
            arrays = make_arrays(wl)
            for ep in endpoints:
                workloads[f"{ep.label} ({size} MiB)"] = wl.description
                rows += part1_endpoint(ep, tools, arrays, args.repeats)
            del arrays
            gc.collect()
    print_part1(rows, workloads, note)
    if links:
        print_calibration(links, args)
    return {"rows": rows, "link": links}
