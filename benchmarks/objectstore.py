"""Object stores: streamckpt against loopback S3 / GCS servers and a slow link.

Servers (``streamckpt.testing.servers``, bound to 127.0.0.1, stopped on exit): moto_server
(S3, in memory), SeaweedFS ``weed mini`` (S3, a real storage engine on a temp dir) and
fake-gcs-server (GCS JSON API, in memory). The slow link (``benchmarks.endpoints``) holds
every request --latency-ms and caps each connection at --bandwidth-mbps (MB/s) each way, in
front of --proxy-upstreams.

Part 1, throughput: workload A at --size-mib (default 512) on each server directly, and at
--proxy-size-mib (256) through the proxy and, for the "of direct" column, without it. Tools:
streamckpt without num_shards ("default shards": the store's choice) and with --shards;
"naive": one ``pipe_file`` per tensor one after the other through the same fsspec client,
then a JSON manifest, loaded by ``cat_file``s in turn (what a plain loop would do); torch
DCP's ``FsspecWriter`` / ``FsspecReader`` where torch is installed (defaults, except
``sync_files=False``). Each endpoint first gets one untimed tiny save + load per tool
(sessions, planners) and one untimed save + load of the whole workload (a cold server's
first large save costs it more). A save is timed until the call returns; a load starts with
the index cache cleared and is checked against the data afterwards. MB/s = bytes / s / 1e6;
"x naive" = MB/s over naive's on the same endpoint; "req" = requests in streamckpt's stats;
"wire" = requests the proxy relayed; "bg" = cores that work outside this benchmark kept
busy meanwhile. Then a link check: one 32 MiB PUT and GET and a tiny GET on one connection,
and what the server ingests with 1, 2, 4 and 8 PUTs of 16 MiB at once.

Part 2, read_tensor round trips: --rt-small tensors of 1 KiB and --rt-big of 16 MiB (4
shards); ``read_tensor`` twice on a few names, "cold" right after the index cache was
cleared, then "warm"; and one reader kept open. Target: cold <= 3 requests, warm = 1.

Part 3, bounded memory: one --rss-big-mib tensor and --rss-small x 16 KiB, saved to and
loaded from --rss-server with max_inflight_bytes=--rss-budget-mib, each in a fresh
interpreter that reads its peak RSS; target: peak <= arrays + budget + 150 MiB.

Not measured any more: the old script's diagnosis of the adaptive request limiter (it read
the store's private limiter and patched its class); the public ``stats`` give requests,
retries and throttles. Exit status 1 when a part 3 target is missed.

--quick: moto alone, directly and through the proxy, a few MiB, streamckpt without
num_shards only, a small link check, part 3 without its two reference rows.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

from benchmarks import harness
from benchmarks.endpoints import BUCKET, SERVERS, Endpoint, direct_to, proxy_child, start_server
from benchmarks.report import print_table
from benchmarks.throughput import part1
from benchmarks.workloads import (
    KIB,
    MB,
    MIB,
    check_equal,
    expected_views,
    forget_pool,
    make_arrays,
    one_big,
    small_and_big,
)


def _list(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    return lambda text: [kind(x) for x in text.split(",") if x]


def _server(name: str) -> str:
    if name not in SERVERS:
        raise argparse.ArgumentTypeError(f"unknown server {name!r} (of {', '.join(SERVERS)})")
    return name


def add_arguments(p: argparse.ArgumentParser) -> None:
    shards = _list(lambda x: None if x == "default" else int(x))
    p.add_argument("--parts", type=_list(int), default=[1, 2, 3], help="e.g. 1,3")
    p.add_argument("--servers", type=_list(_server), help="direct endpoints (default: all)")
    p.add_argument("--proxy-upstreams", type=_list(_server), help="behind the proxy")
    p.add_argument("--size-mib", type=int, help="workload A, direct (default 512)")
    p.add_argument("--proxy-size-mib", type=int, help="workload A through the proxy (256)")
    p.add_argument("--count", type=int, help="tensors in workload A (default 200)")
    p.add_argument("--shards", type=shards, help="streamckpt shard counts (default,1,4,8)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per cell (median)")
    p.add_argument("--no-dcp", action="store_true", help="leave torch DCP out")
    p.add_argument("--latency-ms", type=float, default=20.0)
    p.add_argument("--bandwidth-mbps", type=float, default=100.0, help="MB/s per connection")
    p.add_argument("--proxy-pacing", choices=["clock", "faultproxy"], default="clock")
    p.add_argument("--rt-small", type=int, help="part 2: 1 KiB tensors (10000)")
    p.add_argument("--rt-big", type=int, help="part 2: 16 MiB tensors (4)")
    p.add_argument("--rss-server", choices=["moto", "seaweedfs"], help="part 3 (seaweedfs)")
    p.add_argument("--rss-big-mib", type=int, help="part 3 big tensor (2048)")
    p.add_argument("--rss-small", type=int, help="part 3: 16 KiB tensors (1000)")
    p.add_argument("--rss-budget-mib", type=int, default=128)
    p.add_argument("--rss-shards", type=int, default=4)


def _defaults(args: argparse.Namespace) -> None:
    """Full-run defaults, or the quick ones: moto alone, behind the proxy too, tiny sizes."""
    full: dict[str, Any] = {
        "servers": list(SERVERS), "proxy_upstreams": ["seaweedfs", "moto"], "size_mib": 512,
        "proxy_size_mib": 256, "count": 200, "shards": [None, 1, 4, 8], "rt_small": 10_000,
        "rt_big": 4, "rss_server": "seaweedfs", "rss_big_mib": 2048, "rss_small": 1000,
    }  # fmt: skip
    quick = full | {
        "servers": ["moto"], "proxy_upstreams": ["moto"], "size_mib": 4, "proxy_size_mib": 4,
        "count": 20, "shards": [None], "rt_small": 100, "rt_big": 1, "rss_server": "moto",
        "rss_big_mib": 16, "rss_small": 20,
    }  # fmt: skip
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.calibration_bytes = 2 * MIB if args.quick else 32 * MIB
    args.ingest_puts = 4 if args.quick else 16
    args.rt_big_bytes = 1 * MIB if args.quick else 16 * MIB


# -- part 2: read_tensor round trips ------------------------------------------------------------


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


def part2(args: argparse.Namespace, endpoints: list[Endpoint]) -> list[dict[str, Any]]:
    """``read_tensor`` cold and warm on one server, with and without the proxy."""
    import numpy as np

    import streamckpt
    import streamckpt.sync

    wl = small_and_big(args.rt_small, args.rt_big, args.rt_big_bytes)
    arrays = make_arrays(wl)
    names = [f"small/t{args.rt_small // 2:05d}", f"big/w{args.rt_big // 2}"]
    prefix = f"{endpoints[0].scheme}://{BUCKET}/rt/ckpt"
    info = streamckpt.sync.save(
        prefix, arrays, num_shards=4, storage_options=endpoints[0].options()
    )
    print(f"  [part 2] saved {wl.description}, index {info.index_bytes / KIB:.0f} KiB", flush=True)
    rows = []
    for ep in endpoints:
        # untimed: the client for these options is built and its connections opened
        streamckpt.sync.read_tensor(prefix, "small/t00000", storage_options=ep.options())
        for name in names:
            row: dict[str, Any] = {"endpoint": ep.label, "tensor": name}
            streamckpt.clear_index_cache()
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
        streamckpt.clear_index_cache()
        ep.wire_begin()
        row = streamckpt.sync.run(_one_reader, prefix, names, ep.options())
        rows.append(row | {"endpoint": ep.label, "tensor": f"open() + read x{len(names)}"})
        rows[-1]["cold_wire"] = ep.wire_requests()
    endpoints[0].clear()
    keys = ("cold_requests", "cold_wire", "cold_ms", "warm_requests", "warm_wire", "warm_ms")
    print_table(
        f"Part 2: read_tensor round trips ({wl.description}, 4 shards); targets: cold <= 3 "
        "requests, warm = 1",
        ["endpoint / tensor", "cold req", "wire", "cold ms", "warm req", "wire", "warm ms"],
        [[f"{r['endpoint']} / {r['tensor']}", *(r.get(k) for k in keys)] for r in rows],
    )
    print(
        "  cold = 1st read_tensor call after the index cache was cleared, warm = the same call\n"
        "  again; 'open() + read xN': cold = requests of open(load_index=False), warm = those\n"
        "  of the N reads through that one reader"
    )
    return rows


# -- part 3: bounded memory ---------------------------------------------------------------------


def rss_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Child: import, maybe make the arrays, maybe save or load; the peak RSS since then."""
    import streamckpt.sync

    result: dict[str, Any] = {"mode": spec["mode"]}
    wl = one_big(spec["big_mib"] * MIB, spec["small"])
    budget = spec["budget_mib"] * MIB
    if spec["mode"] == "import":
        import s3fs

        s3fs.S3FileSystem(skip_instance_cache=True, **spec["options"])
    arrays = make_arrays(wl) if spec["mode"] in ("baseline", "save") else {}
    forget_pool()  # what the arrays were made from: not part of the peak
    gc.collect()
    harness.reset_peak_rss()
    result["rss_before_mib"] = (harness.proc_status_kib("VmRSS") or 0) / 1024
    t0 = time.perf_counter()
    if spec["mode"] == "save":
        options = {"storage_options": spec["options"], "max_inflight_bytes": budget}
        streamckpt.sync.save(spec["prefix"], arrays, num_shards=spec["shards"], **options)
    elif spec["mode"] == "load":
        arrays = streamckpt.sync.load(
            spec["prefix"], storage_options=spec["options"], max_inflight_bytes=budget
        )
    result["seconds"] = time.perf_counter() - t0
    result["peak_rss_mib"] = (harness.proc_status_kib("VmHWM") or 0) / 1024
    result["arrays_mib"] = sum(int(a.nbytes) for a in arrays.values()) / MIB
    if spec["mode"] == "load":  # after the peak was read: the comparison allocates
        check_equal(expected_views(wl), arrays, "load")
    return result


def part3(args: argparse.Namespace, ep: Endpoint, workdir: str) -> bool:
    spec = {"prefix": f"{ep.scheme}://{BUCKET}/rss/ckpt", "options": ep.options()}
    spec |= {"big_mib": args.rss_big_mib, "small": args.rss_small, "shards": args.rss_shards}
    spec |= {"budget_mib": args.rss_budget_mib}
    labels = {
        "import": "import streamckpt + s3fs only",
        "baseline": "import + make the arrays",
        "save": f"save (max_inflight_bytes={args.rss_budget_mib} MiB)",
        "load": f"load (max_inflight_bytes={args.rss_budget_mib} MiB)",
    }
    wl = one_big(args.rss_big_mib * MIB, args.rss_small)
    if args.quick:  # the reference rows run the same child
        del labels["import"], labels["baseline"]
    table, all_ok = [], True
    for mode, label in labels.items():
        child = spec | {"mode": mode}
        r = harness.run_child("objectstore.rss_child", child, workdir=workdir, label=f"rss-{mode}")
        if not r.get("ok"):
            table.append([label, None, None, None, None, None, "FAILED"])
            all_ok = False
            continue
        target = r["arrays_mib"] + args.rss_budget_mib + 150 if mode in ("save", "load") else None
        ok = None if target is None else r["peak_rss_mib"] <= target
        all_ok = all_ok and ok is not False
        headroom = None if target is None else target - r["peak_rss_mib"]
        seconds = r["seconds"] if target else None
        verdict = None if ok is None else ("yes" if ok else "NO")
        table.append(
            [label, seconds, r["rss_before_mib"], r["peak_rss_mib"], target, headroom, verdict]
        )
    ep.clear()
    print_table(
        f"Part 3: peak RSS (MiB) of one interpreter, {ep.label}: {wl.description}; "
        "target = arrays + budget + 150 MiB",
        ["process", "seconds", "RSS before", "peak RSS", "target", "headroom", "ok"],
        table,
    )
    return all_ok


# -- main ---------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> dict[str, Any]:
    _defaults(args)
    warnings.filterwarnings("ignore", category=ResourceWarning)
    logging.getLogger("gcsfs").setLevel(logging.CRITICAL)  # DCP's rename falls back to copy
    base = os.path.abspath(args.dir or "bench-out")
    os.makedirs(base, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="objectstore-", dir=base)
    needed = set(args.servers) | set(args.proxy_upstreams) if {1, 2} & set(args.parts) else set()
    needed |= {args.rss_server} if 3 in args.parts else set()
    link = f"proxy {args.latency_ms:g} ms + {args.bandwidth_mbps:g} MB/s/conn"
    result: dict[str, Any] = {"ok": True}
    with contextlib.ExitStack() as stack:
        servers = {k: stack.enter_context(start_server(k)) for k in SERVERS if k in needed}
        direct = [direct_to(servers[k]) for k in args.servers if k in servers]
        slow = []
        for kind in args.proxy_upstreams if {1, 2} & set(args.parts) else []:
            server = servers[kind]
            proxy = stack.enter_context(proxy_child(server.endpoint, args.proxy_pacing))
            proxy.configure(latency_s=args.latency_ms / 1e3, bandwidth=args.bandwidth_mbps * MB)
            slow.append(Endpoint(f"{kind} via {link}", server, proxy.endpoint, proxy, kind))
        if 1 in args.parts:
            result["part1"] = part1(args, direct, slow)
        if 2 in args.parts and (direct or slow):
            print("\n== part 2", flush=True)
            server = (slow or direct)[0].server  # the first proxied server, else the first
            eps = [direct_to(server), *(e for e in slow if e.server is server)]
            result["part2"] = part2(args, eps)
        if 3 in args.parts:
            print("\n== part 3", flush=True)
            ep = direct_to(servers[args.rss_server])
            result["ok"] = part3(args, ep, workdir)
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return result
