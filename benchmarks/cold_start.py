"""Cold start: a fresh process that reads one tensor, and the command line's startup.

Method: every figure is the wall time of a whole child process (``subprocess.run`` around
it: interpreter start, imports, the read, exit), the commands of one round run one after the
other and rounds alternate, so that a change in the machine's load hits every row alike.
One untimed round first writes the children's bytecode caches (``PYTHONDONTWRITEBYTECODE`` is
unset for them: an installed package has its ``.pyc`` files) and warms the page cache.

- read one tensor: ``streamckpt.sync.read_tensor(prefix, name)``, 4 MiB of a 256 MiB local
  checkpoint (64 tensors of 4 MiB), beside each peer reading the same tensor of the same
  tensors saved by it (``benchmarks.peers``' savers), in its own way of reading one tensor:
  safetensors ``safe_open(..., framework="numpy").get_tensor(name)``; TensorFlow
  ``tf.train.load_checkpoint(prefix).get_tensor(name)`` of streamckpt's checkpoint (the
  same format); ``torch.load(path, mmap=True, weights_only=True)[name].clone()``; torch DCP
  ``load`` of a one-key state dict sized from the checkpoint's metadata; orbax
  ``PyTreeCheckpointer().restore(..., partial_restore=True)`` of one key; TensorStore
  ``open(...).read()`` of one array. Peers other than safetensors import for seconds: they
  run --peer-rounds rounds;
- the command line: ``streamckpt --help`` and ``streamckpt ls PREFIX`` of a two-tensor
  checkpoint;
- the floor beside them: ``python -c pass`` and ``python -c "import numpy"``.
Goals (issue 15.1, 14.8): the read at most safetensors' median; ``--help`` and ``ls``
within 1.5x of the numpy floor (which includes the interpreter's start).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import harness, peers
from benchmarks.report import Times, loadavg, median, print_table, ratio, spread
from benchmarks.workloads import MIB

NAME = "layer3/kernel"
#: tool id of ``benchmarks.peers`` -> a script reading tensor ``argv[2]`` of ``argv[1]``
READERS = {
    "streamckpt": "import streamckpt.sync as s, sys; s.read_tensor(sys.argv[1], sys.argv[2])",
    "safetensors": (
        "import sys\nfrom safetensors import safe_open\n"
        "with safe_open(sys.argv[1], framework='numpy') as f: f.get_tensor(sys.argv[2])"
    ),
    "tensorflow": (
        "import sys, tensorflow as tf\n"
        "tf.train.load_checkpoint(sys.argv[1]).get_tensor(sys.argv[2])"
    ),
    "torch-save": (
        "import sys, torch\n"
        "torch.load(sys.argv[1], mmap=True, weights_only=True)[sys.argv[2]].clone()"
    ),
    "torch-dcp": (
        "import sys, torch, torch.distributed.checkpoint as dcp\n"
        "reader, name = dcp.FileSystemReader(sys.argv[1]), sys.argv[2]\n"
        "meta = reader.read_metadata().state_dict_metadata[name]\n"
        "target = {name: torch.empty(meta.size, dtype=meta.properties.dtype)}\n"
        "dcp.load(target, storage_reader=reader)"
    ),
    "orbax": (
        "import sys, numpy as np, orbax.checkpoint as ocp\n"
        "name = sys.argv[2]\n"
        "args = ocp.args.PyTreeRestore(item={name: 0}, partial_restore=True,\n"
        "    restore_args={name: ocp.RestoreArgs(restore_type=np.ndarray)})\n"
        "ocp.PyTreeCheckpointer().restore(sys.argv[1], args=args)[name]"
    ),
    "tensorstore": (  # the layout of peers.TensorStore
        "import sys, tensorstore as ts\n"
        "kv = {'driver': 'ocdbt', 'base': f'file://{sys.argv[1]}/', 'path': f'{sys.argv[2]}/'}\n"
        "ts.open({'driver': 'zarr', 'kvstore': kv}, open=True).result().read().result()"
    ),
}
LABELS = {
    "streamckpt": "streamckpt read_tensor",
    "safetensors": "safetensors get_tensor",
    "tensorflow": "tf load_checkpoint get_tensor",
    "torch-save": "torch.load(mmap=True)[name]",
    "torch-dcp": "torch DCP load of one key",
    "orbax": "orbax partial restore",
    "tensorstore": "TensorStore open + read",
}
FLOOR = "python -c 'import numpy'"
LIGHT = ("streamckpt", "safetensors")  # every round; the other peers --peer-rounds rounds


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", type=int, help="rounds of every command (default 9; quick 2)")
    p.add_argument(
        "--peer-rounds",
        type=int,
        help="rounds with the peers but safetensors (default 3; quick 0: not run)",
    )
    p.add_argument("--size-mib", type=int, help="checkpoint size (default 256; quick 16)")


def prepare(spec: dict[str, Any]) -> dict[str, Any]:
    """Child: streamckpt's two checkpoints, and each of ``spec["peers"]`` that saves its own
    (TensorFlow reads streamckpt's) under ``spec["dir"]/TOOL``, with ``peers``' savers."""
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
    for tool in spec["peers"]:
        if tool != "tensorflow":
            saver, root = peers.make_tool(tool), os.path.join(spec["dir"], tool)
            os.makedirs(root, exist_ok=True)
            saver.save(saver.prepare_save(dict(tensors)), root)
    return {}


def _commands(directory: Path, tools: list[str], cli: bool) -> dict[str, list[str]]:
    """label -> argv: the floors, each tool's read of one tensor, the command line."""
    py = sys.executable
    script = shutil.which("streamckpt", path=os.path.dirname(py)) if cli else None
    big, small = str(directory / "big"), str(directory / "small")
    commands = {"python -c pass": [py, "-c", "pass"], FLOOR: [py, "-c", "import numpy"]}
    for tool in tools:
        path = big if tool in ("streamckpt", "tensorflow") else str(directory / tool)
        if tool not in ("streamckpt", "tensorflow"):
            path = peers.checkpoint_path(tool, path)
        commands[LABELS[tool]] = [py, "-c", READERS[tool], path, NAME]
    if script:
        commands["streamckpt --help"] = [script, "--help"]
        commands["streamckpt ls PREFIX"] = [script, "ls", small]
    return commands


def _time(argv: list[str], env: dict[str, str]) -> float:
    """Wall seconds of one child; its stderr (the peers' warnings) is kept, shown on failure."""
    started = time.perf_counter()
    done = subprocess.run(
        argv, env=env, cwd=harness.ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        timeout=600, check=False,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    if done.returncode:
        tail = done.stderr.decode(errors="replace")[-1500:]
        raise RuntimeError(f"{argv[1:3]} exited with {done.returncode}:\n{tail}")
    return seconds


def measure(
    directory: Path,
    *,
    runs: int,
    peer_rounds: int,
    size_mib: int,
    tools: list[str],
    cli: bool = True,
) -> dict[str, list[float]]:
    """Label -> seconds of each round (``tools``: peers' ids, streamckpt always; the
    installed ones run, all but safetensors in the first ``peer_rounds`` rounds only; the
    command line's two commands with ``cli``)."""
    directory = directory.resolve()
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    wanted = ["streamckpt"] + [t for t in tools if t != "streamckpt"]
    wanted = [t for t in wanted if t in LIGHT or peer_rounds]
    installed, _skipped = peers.available(wanted)
    spec = {
        "size_mib": size_mib,
        "dir": str(directory),
        "big": str(directory / "big"),
        "small": str(directory / "small"),
        "peers": [t for t in installed if t != "streamckpt"],
    }
    made = harness.run_child("cold_start.prepare", spec, workdir=str(directory), label="prepare")
    if not made.get("ok"):
        raise RuntimeError(f"cold start: the checkpoints were not written: {made.get('error')}")
    commands = _commands(directory, installed, cli)
    heavy = {LABELS[t] for t in installed if t not in LIGHT}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env |= harness.CHILD_ENV
    for argv in commands.values():  # untimed: bytecode caches, page cache
        _time(argv, env)
    seconds: dict[str, list[float]] = {label: [] for label in commands}
    print(f"{runs} alternating rounds ({peer_rounds} with the peers); load average {loadavg()}")
    for round_number in range(runs):
        for label, argv in commands.items():
            if label in heavy and round_number >= peer_rounds:
                continue
            seconds[label].append(_time(argv, env))
    return seconds


def main(args: argparse.Namespace) -> dict[str, Any]:
    runs = args.runs or (2 if args.quick else 9)
    peer_rounds = args.peer_rounds if args.peer_rounds is not None else (0 if args.quick else 3)
    size_mib = args.size_mib or (16 if args.quick else 256)
    try:
        seconds = measure(
            Path(args.dir or "bench-out") / "cold-start",
            runs=runs,
            peer_rounds=peer_rounds,
            size_mib=size_mib,
            tools=list(READERS),
        )
    except RuntimeError as exc:
        print(f"FAILED: {exc}")
        return {"ok": False, "error": str(exc)}
    floor = median(seconds[FLOOR])
    safetensors = median(seconds.get(LABELS["safetensors"], []))
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
    read = median(seconds[LABELS["streamckpt"]])
    goals = {
        "read_at_most_safetensors": None
        if read is None or safetensors is None
        else bool(read <= safetensors),
        "help_within_1.5x_floor": _within(seconds.get("streamckpt --help"), floor),
        "ls_within_1.5x_floor": _within(seconds.get("streamckpt ls PREFIX"), floor),
    }
    print("goals: " + ", ".join(f"{k} {v}" for k, v in goals.items()))
    return {"seconds": seconds, "goals": goals, "size_mib": size_mib, "load": loadavg()}


def _within(values: list[float] | None, floor: float | None) -> bool | None:
    if not values or floor is None:
        return None
    return bool((median(values) or 0) <= 1.5 * floor)
