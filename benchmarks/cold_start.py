"""Cold start: a fresh process that reads one tensor, and the command line's startup.

Method: every figure is the wall time of a whole child process (``subprocess.run`` around
it: interpreter start, imports, the read, exit), the commands of one round run one after the
other and rounds alternate, so that a change in the machine's load hits every row alike.
One untimed round first writes the children's bytecode caches (``PYTHONDONTWRITEBYTECODE`` is
unset for them: an installed package has its ``.pyc`` files) and warms the page cache.

- read one tensor: ``streamckpt.sync.read_tensor(prefix, name)``, 4 MiB of a 256 MiB local
  checkpoint, beside safetensors' ``safe_open(..., framework="numpy").get_tensor(name)`` of
  the same tensors in one ``.safetensors`` file, and TensorFlow's
  ``tf.train.load_checkpoint(prefix).get_tensor(name)`` (its import takes seconds: a peer row,
  fewer rounds);
- the command line: ``streamckpt --help`` and ``streamckpt ls PREFIX`` of a two-tensor
  checkpoint;
- the floor beside them: ``python -c pass`` and ``python -c "import numpy"``.
Goals (issue 15.1, 14.8): the read at most safetensors' median; ``--help`` and ``ls``
within 1.5x of the numpy floor (which includes the interpreter's start).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import harness
from benchmarks.report import Times, loadavg, median, print_table, ratio, spread
from benchmarks.workloads import MIB

NAME = "layer3/kernel"
READ_STREAMCKPT = "import streamckpt.sync as s, sys; s.read_tensor(sys.argv[1], sys.argv[2])"
READ_SAFETENSORS = (
    "import sys\nfrom safetensors import safe_open\n"
    "with safe_open(sys.argv[1], framework='numpy') as f: f.get_tensor(sys.argv[2])"
)
READ_TF = (
    "import sys, tensorflow as tf; tf.train.load_checkpoint(sys.argv[1]).get_tensor(sys.argv[2])"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", type=int, help="rounds of every command (default 9; quick 2)")
    p.add_argument("--tf-runs", type=int, help="rounds with TensorFlow (default 3; quick 0)")
    p.add_argument("--size-mib", type=int, help="checkpoint size (default 256; quick 16)")


def prepare(spec: dict[str, Any]) -> dict[str, Any]:
    """Child: the checkpoints and the safetensors file that the timed children read."""
    import numpy as np

    import streamckpt.sync

    rng = np.random.default_rng(0)
    tensors = {
        f"layer{i}/kernel": rng.standard_normal(MIB, dtype=np.float32)  # 4 MiB each
        for i in range(spec["size_mib"] // 4)
    }
    streamckpt.sync.save(spec["big"], tensors, overwrite=True)
    streamckpt.sync.save(
        spec["small"],
        {"dense/kernel": np.ones((3, 4), np.float32), "step": np.int64(7)},
        overwrite=True,
    )
    out: dict[str, Any] = {"safetensors": False}
    if importlib.util.find_spec("safetensors") is not None:
        from safetensors.numpy import save_file

        save_file(tensors, spec["safetensors"])
        out["safetensors"] = True
    return out


def _commands(directory: Path, have: dict[str, Any]) -> dict[str, list[str]]:
    py = sys.executable
    cli = shutil.which("streamckpt", path=os.path.dirname(py)) or ""
    big, small = str(directory / "big"), str(directory / "small")
    commands = {
        "python -c pass": [py, "-c", "pass"],
        "python -c 'import numpy'": [py, "-c", "import numpy"],
        "streamckpt read_tensor": [py, "-c", READ_STREAMCKPT, big, NAME],
    }
    if have.get("safetensors"):
        path = str(directory / "model.safetensors")
        commands["safetensors get_tensor"] = [py, "-c", READ_SAFETENSORS, path, NAME]
    if cli:
        commands["streamckpt --help"] = [cli, "--help"]
        commands["streamckpt ls PREFIX"] = [cli, "ls", small]
    return commands


def _time(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(
        argv, check=True, env=env, cwd=harness.ROOT, stdout=subprocess.DEVNULL, timeout=600
    )
    return time.perf_counter() - started


def main(args: argparse.Namespace) -> dict[str, Any]:
    runs = args.runs or (2 if args.quick else 9)
    tf_runs = args.tf_runs if args.tf_runs is not None else (0 if args.quick else 3)
    size_mib = args.size_mib or (16 if args.quick else 256)
    directory = Path(args.dir or "bench-out") / "cold-start"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    spec = {
        "size_mib": size_mib,
        "big": str(directory / "big"),
        "small": str(directory / "small"),
        "safetensors": str(directory / "model.safetensors"),
    }
    have = harness.run_child("cold_start.prepare", spec, workdir=str(directory), label="prepare")
    if not have.get("ok"):
        return {"ok": False, "error": have.get("error")}
    commands = _commands(directory, have)
    if tf_runs and importlib.util.find_spec("tensorflow") is not None:
        commands["tf load_checkpoint get_tensor"] = [
            sys.executable, "-c", READ_TF, str(directory / "big"), NAME,
        ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env |= harness.CHILD_ENV
    for argv in commands.values():  # untimed: bytecode caches, page cache
        _time(argv, env)
    seconds: dict[str, list[float]] = {label: [] for label in commands}
    print(f"{runs} alternating rounds ({tf_runs} with TensorFlow); load average {loadavg()}")
    for round_number in range(runs):
        for label, argv in commands.items():
            if label.startswith("tf ") and round_number >= tf_runs:
                continue
            seconds[label].append(_time(argv, env))
    floor = median(seconds["python -c 'import numpy'"])
    safetensors = median(seconds.get("safetensors get_tensor", []))
    rows = [
        [
            label,
            1000 * (median(values) or 0),
            spread([1000 * v for v in values], 0),
            Times(ratio(median(values), floor) or 0),
            Times(ratio(median(values), safetensors) or 0) if safetensors else None,
            len(values),
        ]
        for label, values in seconds.items()
    ]
    print_table(
        f"Fresh processes, wall time, {size_mib} MiB checkpoint, one {4} MiB tensor "
        f"(load average after: {loadavg()})",
        ["command", "median ms", "min..max ms", "÷ numpy floor", "÷ safetensors", "runs"],
        rows,
    )
    read = median(seconds["streamckpt read_tensor"])
    goals = {
        "read_at_most_safetensors": None if safetensors is None else bool(read <= safetensors),
        "help_within_1.5x_floor": _within(seconds.get("streamckpt --help"), floor),
        "ls_within_1.5x_floor": _within(seconds.get("streamckpt ls PREFIX"), floor),
    }
    print("goals: " + ", ".join(f"{k} {v}" for k, v in goals.items()))
    return {"seconds": seconds, "goals": goals, "size_mib": size_mib, "load": loadavg()}


def _within(values: list[float] | None, floor: float | None) -> bool | None:
    if not values or floor is None:
        return None
    return bool((median(values) or 0) <= 1.5 * floor)
