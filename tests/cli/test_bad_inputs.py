"""Every mistake from issue 14 ends as one or two lines on stderr and a non-zero exit code.

The real ``streamckpt`` command runs in subprocesses, several at a time: one table, one run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import streamckpt.sync

CLI = [sys.executable, "-m", "streamckpt.cli"]


def _run(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *argv],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
        check=False,
    )


def test_every_bad_input_is_one_or_two_clear_lines(small_checkpoint: str, tmp_path: Path) -> None:
    p = small_checkpoint
    no_extras = tmp_path / "no_extras"
    no_extras.mkdir()
    for module in ("gcsfs", "s3fs"):
        (no_extras / f"{module}.py").write_text(f"raise ImportError('No module named {module}')\n")
    hidden = {"PYTHONPATH": str(no_extras)}
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in Path(p).parent.glob("ckpt-7.*"):
        shutil.copy(path, broken / path.name)
    (broken / "ckpt-7.data-00001-of-00002").unlink()
    corrupt = tmp_path / "corrupt.index"
    corrupt.write_bytes(b"\x00" * 100)
    strings = str(tmp_path / "strings")
    streamckpt.sync.save(strings, {"s": b"text"})

    # argv, environment, exit code, words the message must hold
    table: list[tuple[list[str], dict[str, str] | None, int, str]] = [
        (["cat", p, "emb", "--index", "a"], None, 2, "--index"),
        (["cat", p, "emb", "--index", "0:1:2:3"], None, 2, "--index"),
        (["cat", p, "emb", "--index", "0,..., ..."], None, 2, "at most one"),
        (["cat", p, "emb", "--index", "::0"], None, 2, "step cannot be zero"),
        (["cat", p, "emb", "--index", "500"], None, 2, "out of bounds"),
        (["cat", p, "emb", "--index", "0,0,0"], None, 2, "too many indices"),
        (["cat", p, "nope"], None, 2, "no such tensor"),
        (["cat", p, "emb", "--max-items", "0"], None, 2, "at least 1"),
        (["cp", p, str(tmp_path / "c1"), "--shards", "0"], None, 2, "at least 1"),
        (["cp", p, str(tmp_path / "c2"), "--shards", "-3"], None, 2, "at least 1"),
        (["cp", p, str(tmp_path / "c3"), "--shards", "two"], None, 2, "whole number"),
        (["ls", "gs://bucket/run"], hidden, 2, "streamckpt[gcs]"),
        (["ls", "s3://bucket/run"], hidden, 2, "streamckpt[s3]"),
        (["cp", p, "gs://bucket/x"], hidden, 2, "streamckpt[gcs]"),
        (["ls", "nosuch://bucket/run"], None, 2, "unknown storage protocol"),
        (["cp", p, "memory://x/ckpt"], None, 2, "memory://"),
        (["convert", p, "memory://x/m.safetensors"], None, 2, "memory://"),
        (["cp", p, str(a_file / "ckpt")], None, 4, "is a file"),
        (["cp", p, p], None, 2, "--overwrite"),
        (["ls", str(tmp_path / "missing")], None, 2, "no checkpoint or directory"),
        (["inspect", str(tmp_path / "missing")], None, 2, "no checkpoint"),
        (["diff", p, str(tmp_path / "missing")], None, 2, "no checkpoint"),
        (["verify", str(broken / "ckpt-7")], None, 1, "data shard is missing"),
        (["inspect", str(tmp_path / "corrupt")], None, 3, "verify"),
        (["convert", strings, str(tmp_path / "s.safetensors")], None, 2, "cannot hold"),
        (["convert", str(tmp_path / "none.pt"), str(tmp_path / "x")], None, 2, "no such file"),
        (["convert", p, str(tmp_path / "n.pt"), "--name-map", "nope.json"], None, 2, "name map"),
        (["diff", p, p, "--atol", "-1"], None, 2, "--atol"),
        ([], None, 2, "required"),
        (["frobnicate"], None, 2, "invalid choice"),
    ]
    if sys.platform == "linux" and os.path.isdir("/proc/self"):
        table.append((["cp", p, "/proc/streamckpt-test/ckpt"], None, 4, "cannot write"))
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda row: _run(row[0], row[1]), table))
    problems = []
    for (argv, _, code, words), result in zip(table, results, strict=True):
        lines = result.stderr.strip().splitlines()
        if (
            result.returncode != code
            or words not in result.stderr + result.stdout
            or not 1 <= len(lines) <= 2
            or "Traceback" in result.stderr
            or (result.stdout and code != 1)  # verify prints its findings on stdout
        ):
            problems.append(f"{argv}: exit {result.returncode}\n{result.stderr}{result.stdout}")
    assert not problems, "\n".join(problems)


def test_json_errors_and_debug_tracebacks(small_checkpoint: str, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing")
    with ThreadPoolExecutor(2) as pool:
        as_json, debug = pool.map(
            _run, [["inspect", missing, "--json"], ["inspect", missing, "--debug"]]
        )
    assert as_json.returncode == 2
    error = json.loads(as_json.stdout)["error"]
    assert error["type"] == "CheckpointNotFoundError" and error["code"] == 2
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_output_piped_into_head_ends_quietly(small_checkpoint: str) -> None:
    command = [*CLI, "cat", small_checkpoint, "emb", "--max-items", "100000"]
    writer = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert writer.stdout is not None and writer.stderr is not None
    writer.stdout.readline()
    writer.stdout.close()  # as head does after its lines
    stderr = writer.stderr.read().decode()
    writer.stderr.close()
    assert writer.wait(timeout=60) == 0, stderr
    assert stderr == ""
