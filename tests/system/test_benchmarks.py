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
    peers = ("tensorflow", "torch-dcp", "safetensors", "orbax", "torch-save", "tensorstore")
    for tool in peers:  # installed, or skipped
        assert tool in local["skipped"] or (tool, "A", "restore") in measured
    assert set(results["async-save"]) >= {"blocking", "cold", "training"}
    objectstore = results["objectstore"]
    assert objectstore["ok"]
    rows = objectstore["part1"]["rows"]
    assert {r["tool"] for r in rows} >= {"naive (1 req at a time)"}
    assert {r["endpoint"] for r in rows if r["direct"]}, "nothing measured through the proxy"
    assert all(r["warm_requests"] for r in objectstore["part2"])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_table_runs_in_quick_mode(tmp_path: Path) -> None:
    """``table --quick``: every tool's save, restores, background save and cold start, and
    one markdown table with a cell for each (not in ``all``: it repeats the other modes)."""
    out, table = tmp_path / "results.json", tmp_path / "table.md"
    command = [sys.executable, "-m", "benchmarks", "table", "--quick", "--dir", str(tmp_path)]
    done = subprocess.run(
        [*command, "--json", str(out), "--table", str(table)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-6000:]
    assert "Traceback" not in done.stdout + done.stderr
    assert json.loads(out.read_text())["table"]["ok"]
    text = table.read_text()
    assert text in done.stdout
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    assert header[1] == "streamckpt" and header[-2:] == ["limit", "verdict"]
    measures = [r for r in rows[2:] if not r.startswith("| limit:")]
    assert len(measures) == 8  # cold start; A save, warm, cold, background; B save, warm, cold
    for row in measures:
        cells = [c.strip() for c in row.strip("|").split("|")][1:-2]
        for tool, cell in zip(header[1:-2], cells, strict=True):
            if "background" in row and tool in ("safetensors", "torch.save"):
                assert cell == "n/a (none)"
            elif cell != "not installed":
                assert "n=1" in cell, (tool, row)
    limits = {r.split("|")[1].strip() for r in rows if r.startswith("| limit:")}
    for name in ("copy into fresh memory", "memcpy into mapped memory", "crc32c"):
        assert any(name in limit for limit in limits), (name, limits)
    # each restore row's limits, read by fresh processes in the same rounds, and the ratios
    for row in measures:
        if "restore, warm" in row:
            assert "copied into fresh memory, same rounds" in row, row
        if "restore, cold" in row:
            assert "read cold (one reused buffer), same rounds" in row, row
        if "restore" in row:
            assert "read plainly, same rounds" in row, row
    ratios = text.split("streamckpt ÷ the limits measured in the same rounds (medians):")[1]
    for wl in "AB":
        assert f"- {wl} restore warm ÷ its files copied into fresh memory" in ratios
        assert f"- {wl} restore warm ÷ its files read plainly" in ratios


@pytest.mark.parametrize(
    ("how", "cold"),
    [("fresh", False), ("fresh", True), ("reused", True), ("reused", False), ("copy", False)],
)
def test_each_way_of_reading_the_files_reads_every_byte(
    tmp_path: Path, how: str, cold: bool
) -> None:
    """The restore rows' same-round limits read every byte of every file under the root,
    however they read it (a limit that skipped a file would flatter the restores)."""
    from benchmarks import harness

    (tmp_path / "ckpt").mkdir()
    sizes = [3 << 20, 0, 9 << 20, 5]
    for i, size in enumerate(sizes):
        (tmp_path / "ckpt" / f"f{i}").write_bytes(b"x" * size)
    got = harness.read_files({"root": str(tmp_path / "ckpt"), "cold": cold, "how": how})
    assert got["bytes"] == sum(sizes) and got["seconds"] > 0 and got["how"] == how


def test_a_copy_of_evicted_files_is_refused(tmp_path: Path) -> None:
    from benchmarks import harness

    with pytest.raises(ValueError, match="copy"):
        harness.read_files({"root": str(tmp_path), "cold": True, "how": "copy"})
