"""Run one function in N real processes, as a distributed job would, and collect results.

Each worker is a fresh ``python`` running ``tests/support/worker.py`` with the job's usual
environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR=127.0.0.1``, ``MASTER_PORT``); it imports
``module:function``, calls it with ``(rank, world_size, **kwargs)`` and prints the pickled
return value (or the exception) as its last line. Every worker is killed when the call ends,
also on failure or timeout: no process outlives its test.
"""

from __future__ import annotations

import base64
import contextlib
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WORKER = Path(__file__).with_name("worker.py")
TESTS = Path(__file__).resolve().parent.parent
MARK = "@@RESULT@@ "


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class WorkerResult:
    rank: int
    returncode: int | None
    value: Any = None
    error: BaseException | None = None
    output: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.error is None


def _env(rank: int, world_size: int, port: int, extra: Mapping[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        PYTHONPATH=os.pathsep.join(
            [str(TESTS), str(TESTS / "distributed"), env.get("PYTHONPATH", "")]
        ),
        OMP_NUM_THREADS="1",
    )
    env.update(extra)
    return env


def start_workers(
    target: str,
    world_size: int,
    *,
    kwargs: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    port: int | None = None,
) -> list[subprocess.Popen[str]]:
    """Start the workers; the caller must :func:`collect` (which also kills leftovers)."""
    port = port or free_port()
    payload = base64.b64encode(pickle.dumps(dict(kwargs or {}))).decode()
    return [
        subprocess.Popen(
            [sys.executable, str(WORKER), target, payload],
            env=_env(rank, world_size, port, env or {}),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for rank in range(world_size)
    ]


def collect(procs: Sequence[subprocess.Popen[str]], *, timeout: float) -> list[WorkerResult]:
    """Wait for every worker up to ``timeout`` seconds in all, then kill what is left."""
    deadline = time.monotonic() + timeout
    results = []
    try:
        for rank, proc in enumerate(procs):
            try:
                out, _ = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                kill(proc)
                out, _ = proc.communicate()
                results.append(WorkerResult(rank, None, output=out))
                continue
            results.append(_parse(rank, proc.returncode, out))
    finally:
        for proc in procs:
            kill(proc)
    return results


def kill(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _parse(rank: int, returncode: int, out: str) -> WorkerResult:
    value: Any = None
    error: BaseException | None = None
    lines = out.splitlines()
    for line in reversed(lines):
        if line.startswith(MARK):
            ok, obj = pickle.loads(base64.b64decode(line[len(MARK) :]))
            if ok:
                value = obj
            else:
                error = obj
            break
    return WorkerResult(rank, returncode, value, error, out)


def run_workers(
    target: str,
    world_size: int,
    *,
    kwargs: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 90.0,
) -> list[WorkerResult]:
    """Run ``module:function`` on ``world_size`` processes; every worker's result."""
    procs = start_workers(target, world_size, kwargs=kwargs, env=env)
    return collect(procs, timeout=timeout)


def values(results: Sequence[WorkerResult]) -> list[Any]:
    """Every worker's return value; fails with every worker's output if one did not succeed."""
    bad = [r for r in results if not r.ok]
    if bad:
        report = "\n".join(
            f"--- rank {r.rank} (exit {r.returncode}, error {r.error!r}) ---\n{r.output[-4000:]}"
            for r in bad
        )
        raise AssertionError(f"{len(bad)} worker(s) failed:\n{report}")
    return [r.value for r in results]
