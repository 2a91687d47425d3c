"""``python -m benchmarks MODE [--quick] [options]``: local, objectstore, async-save, distributed,
plan, cold-start, table (every measure of every tool in one markdown table) or all (every
mode but table, which repeats the others' measurements)."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from typing import Any

from benchmarks import harness
from benchmarks.report import loadavg, machine_info, print_machine

#: mode -> module of this package with ``add_arguments(parser)`` and ``main(args) -> dict``
MODES = {
    "local": "local",
    "async-save": "async_save",
    "objectstore": "objectstore",
    "plan": "distributed_plan",
    "distributed": "distributed_save",
    "cold-start": "cold_start",
    "table": "table",
}
IN_ALL = [mode for mode in MODES if mode != "table"]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="tiny sizes, one run: a smoke test")
    p.add_argument("--dir", help="parent of the scratch directories (default ./bench-out)")
    p.add_argument("--json", metavar="PATH", help="also write every result to PATH")
    p.add_argument("--keep", action="store_true", help="keep the scratch directories")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=importlib.import_module("benchmarks").__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="mode", required=True, metavar="MODE")
    for mode, name in MODES.items():
        module = importlib.import_module(f"benchmarks.{name}")
        sp = sub.add_parser(
            mode,
            help=(module.__doc__ or "").split("\n", 1)[0],
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _common(sp)
        module.add_arguments(sp)
    _common(sub.add_parser("all", help="every mode above but table, each with defaults"))
    return p


def main(argv: list[str]) -> int:
    if argv[:1] == ["_child"]:  # one measured operation (see harness.run_child)
        return harness.child_main(*argv[1:])
    p = parser()
    args = p.parse_args(argv)
    common = [flag for flag in ("--quick", "--keep") if getattr(args, flag[2:])]
    common += ["--dir", args.dir] if args.dir else []
    runs = [args] if args.mode != "all" else [p.parse_args([m, *common]) for m in IN_ALL]
    started = time.perf_counter()
    info = machine_info(args.dir or ".")
    print_machine(info)
    print(f"command: python -m benchmarks {' '.join(argv)}", flush=True)
    results: dict[str, Any] = {"machine": info, "argv": argv}
    ok = True
    for run in runs:
        print(f"\n######## {run.mode}{' (quick)' if run.quick else ''}", flush=True)
        t0 = time.perf_counter()
        result = importlib.import_module(f"benchmarks.{MODES[run.mode]}").main(run)
        result["wall_seconds"] = time.perf_counter() - t0
        results[run.mode] = result
        ok = ok and bool(result.get("ok", True))
        print(f"\n{run.mode}: {result['wall_seconds']:.0f} s", flush=True)
    wall = time.perf_counter() - started
    print(f"\nwall time {wall:.0f} s; load average now {loadavg()} (other processes compete)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
        print(f"wrote {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
