"""The benchmarks' smoke run: every code path of every benchmark, so that they cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TABLES = (
    # local
    "disk sequential write",
    "== results (medians; vs TF > 1: faster than TensorFlow)",
    "== target checks",
    # async-save
    "Part 1: save_async's blocking copy",
    "Part 1, cold: the first operation of a fresh process",
    "Part 2: training-like loop",
    # objectstore
    "Part 1: workload A save",
    "Part 1: workload A load",
    "Part 1, link check",
    "Part 2: read_tensor round trips",
    "Part 3: peak RSS",
    "Global plan of a multi-process save",  # plan
    "distributed save, local disk (median of rounds",  # distributed
)


@pytest.mark.slow
@pytest.mark.cloud
@pytest.mark.timeout(600)
def test_every_benchmark_runs_in_quick_mode(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    command = [sys.executable, "-m", "benchmarks", "all", "--quick", "--dir", str(tmp_path)]
    done = subprocess.run(
        [*command, "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-6000:]
    missing = [title for title in TABLES if title not in done.stdout]
    assert not missing, f"tables missing: {missing}\n{done.stdout[-6000:]}"
    assert "Traceback" not in done.stdout + done.stderr

    results = json.loads(out.read_text())
    local = results["local"]
    assert local["ok"] and local["limits_gb_per_s"]["disk_write"] > 0
    measured = {(r["tool"], r["workload"], r["op"]) for r in local["rows"] if r["seconds"]}
    assert {("streamckpt-4", wl, op) for wl in "AB" for op in ("save", "restore")} <= measured
    for tool in ("tensorflow", "torch-dcp", "safetensors", "orbax"):  # installed, or skipped
        assert tool in local["skipped"] or (tool, "A", "restore") in measured
    assert set(results["async-save"]) >= {"blocking", "cold", "training"}
    objectstore = results["objectstore"]
    assert objectstore["ok"]
    rows = objectstore["part1"]["rows"]
    assert {r["tool"] for r in rows} >= {"naive (1 req at a time)"}
    assert {r["endpoint"] for r in rows if r["direct"]}, "nothing measured through the proxy"
    assert all(r["warm_requests"] for r in objectstore["part2"])
