"""streamckpt and its peers on local disk, one measured operation per child interpreter.

Rule: every tool gets the same treatment. Building arrays, tf.Variables, torch tensors and
other in-memory state is untimed (``prepare_*``); a save is timed until its bytes are durable
(streamckpt fsyncs its files, torch DCP with ``sync_files=True``, and every peer's timed
region ends with an fsync of every file and directory it wrote, which TensorFlow, safetensors
and orbax do not do themselves); a restore is timed from the call to the returned arrays.

A tool: ``prepare_save(arrays) -> state``; ``save(state, root)``; ``prepare_restore(wl) ->
state``; ``restore(state, root) -> {name: array-like}``; ``check(restored) -> {name:
ndarray}``. ``root`` is an empty directory owned by the tool's checkpoint. Peers that are not
installed are reported as skipped.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks import harness
from benchmarks.workloads import Workload, by_name, check_equal, expected_views, make_arrays

#: tool id -> (label printed in the tables, module that must be importable)
TOOLS: dict[str, tuple[str, str]] = {
    "streamckpt-1": ("streamckpt (1 shard)", "streamckpt"),
    "streamckpt-4": ("streamckpt (4 shards)", "streamckpt"),
    "tensorflow": ("tf.train.Checkpoint", "tensorflow"),
    "orbax": ("orbax-checkpoint", "orbax.checkpoint"),
    "torch-dcp": ("torch DCP", "torch.distributed.checkpoint"),
    "safetensors": ("safetensors", "safetensors.numpy"),
}
BASELINE = "tensorflow"


def available(requested: list[str]) -> tuple[list[str], dict[str, str]]:
    """The requested tools that can run here, and why each other one cannot."""
    tools, skipped = [], {}
    for tool in requested:
        if tool not in TOOLS:
            raise SystemExit(f"unknown tool {tool!r}; known: {', '.join(TOOLS)}")
        top = TOOLS[tool][1].split(".")[0]
        if importlib.util.find_spec(top) is None:
            skipped[tool] = f"{top} is not installed"
        else:
            tools.append(tool)
    return tools, skipped


class Tool:
    """The defaults: save the arrays as they are, restore into nothing, check as returned."""

    def prepare_save(self, arrays: dict[str, np.ndarray[Any, Any]]) -> Any:
        return arrays

    def save(self, state: Any, root: str) -> None:
        raise NotImplementedError

    def prepare_restore(self, wl: Workload) -> Any:
        return None

    def restore(self, state: Any, root: str) -> dict[str, Any]:
        raise NotImplementedError

    def check(self, restored: dict[str, Any]) -> dict[str, Any]:
        return restored


class StreamCkpt(Tool):
    """``streamckpt.sync.save`` / ``load`` with ``num_shards``."""

    def __init__(self, num_shards: int) -> None:
        import streamckpt.sync

        self.sync = streamckpt.sync
        self.num_shards = num_shards

    def save(self, state: Any, root: str) -> None:
        self.sync.save(os.path.join(root, "ckpt"), state, num_shards=self.num_shards)

    def restore(self, state: Any, root: str) -> dict[str, Any]:
        return self.sync.load(os.path.join(root, "ckpt"))


class TensorFlow(Tool):
    """tf.train.Checkpoint over tf.Variables made before the timer; ``write`` then fsync;
    ``read`` restores in place into zero-filled variables made before the timer."""

    def __init__(self) -> None:
        self.tf = importlib.import_module("tensorflow")

    def prepare_save(self, arrays: dict[str, np.ndarray[Any, Any]]) -> Any:
        variables = {name: self.tf.Variable(a) for name, a in arrays.items()}
        arrays.clear()  # the variables hold their own copies: the model is in TF now
        return self.tf.train.Checkpoint(params=variables)

    def save(self, state: Any, root: str) -> None:
        state.write(os.path.join(root, "ckpt"))
        harness.fsync_tree(root)

    def prepare_restore(self, wl: Workload) -> Any:
        zeros = self.tf.zeros
        variables = {n: self.tf.Variable(zeros(s, self.tf.float32)) for n, s in wl.tensors}
        return variables, self.tf.train.Checkpoint(params=variables)

    def restore(self, state: Any, root: str) -> dict[str, Any]:
        variables, ckpt = state
        self.status = ckpt.read(os.path.join(root, "ckpt"))
        return variables  # type: ignore[no-any-return]

    def check(self, restored: dict[str, Any]) -> dict[str, Any]:
        self.status.assert_existing_objects_matched()
        return {k: v.numpy() for k, v in restored.items()}


class Orbax(Tool):
    """orbax-checkpoint's synchronous ``Checkpointer(StandardCheckpointHandler())`` with its
    defaults (OCDBT + zarr3, compressed); restore returns numpy arrays."""

    def __init__(self) -> None:
        ocp = importlib.import_module("orbax.checkpoint")
        self.ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler())

    def save(self, state: Any, root: str) -> None:
        path = os.path.join(os.path.abspath(root), "ckpt")
        self.ckptr.save(path, state)
        harness.fsync_tree(path)

    def restore(self, state: Any, root: str) -> dict[str, Any]:
        return self.ckptr.restore(os.path.join(os.path.abspath(root), "ckpt"))  # type: ignore[no-any-return]


class TorchDCP(Tool):
    """torch.distributed.checkpoint in one process, FileSystemWriter(sync_files=True), over
    tensors sharing the arrays' memory; loads in place into tensors allocated before the
    timer."""

    def __init__(self) -> None:
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        self.torch = importlib.import_module("torch")
        self.dcp = importlib.import_module("torch.distributed.checkpoint")

    def prepare_save(self, arrays: dict[str, np.ndarray[Any, Any]]) -> Any:
        return {name: self.torch.from_numpy(a) for name, a in arrays.items()}

    def save(self, state: Any, root: str) -> None:
        path = os.path.join(root, "ckpt")
        self.dcp.save(state, storage_writer=self.dcp.FileSystemWriter(path, sync_files=True))
        harness.fsync_tree(path)

    def prepare_restore(self, wl: Workload) -> Any:
        return {n: self.torch.empty(s, dtype=self.torch.float32) for n, s in wl.tensors}

    def restore(self, state: Any, root: str) -> dict[str, Any]:
        self.dcp.load(state, storage_reader=self.dcp.FileSystemReader(os.path.join(root, "ckpt")))
        return state  # type: ignore[no-any-return]

    def check(self, restored: dict[str, Any]) -> dict[str, Any]:
        return {k: v.numpy() for k, v in restored.items()}


class SafeTensors(Tool):
    """safetensors.numpy: ``save_file`` then fsync of the file and directory; ``load_file``."""

    def __init__(self) -> None:
        self.st = importlib.import_module("safetensors.numpy")

    def save(self, state: Any, root: str) -> None:
        self.st.save_file(state, os.path.join(root, "ckpt.safetensors"))
        harness.fsync_tree(root)

    def restore(self, state: Any, root: str) -> dict[str, Any]:
        return self.st.load_file(os.path.join(root, "ckpt.safetensors"))  # type: ignore[no-any-return]


def make_tool(tool: str) -> Tool:
    if tool.startswith("streamckpt-"):
        return StreamCkpt(int(tool.split("-", 1)[1]))
    peer: Callable[[], Tool] = {
        "tensorflow": TensorFlow,
        "orbax": Orbax,
        "torch-dcp": TorchDCP,
        "safetensors": SafeTensors,
    }[tool]
    return peer()


# -- the child's side ---------------------------------------------------------------------------


def run_save(spec: dict[str, Any], tool: Tool, wl: Workload) -> dict[str, Any]:
    """Untimed: arrays, the tool's state, one warm-up save (its time is the "1st save": TF
    traces, DCP plans). Timed: ``repeats`` saves, each into an empty directory after the
    previous checkpoint was deleted and synced away, stopping once ``budget`` seconds went
    by. The last checkpoint stays for the restore."""
    out: dict[str, Any] = {}
    state = tool.prepare_save(make_arrays(wl))
    target = os.path.join(spec["dir"], "ckpt")
    if spec.get("warmup", True):
        os.makedirs(target)
        os.sync()
        out["first_save_seconds"] = harness.measure(lambda: tool.save(state, target))["seconds"]
    runs: list[dict[str, Any]] = []
    started = time.perf_counter()
    for _ in range(spec["repeats"]):
        if runs and time.perf_counter() - started > spec.get("budget", math.inf):
            break  # a slow cell: fewer repeats (the table's n shows it)
        shutil.rmtree(target, ignore_errors=True)
        os.makedirs(target)
        os.sync()  # nothing dirty left from setup or the previous run
        harness.fsync_path(spec["dir"])
        run = harness.measure(lambda: tool.save(state, target))
        del run["value"]
        runs.append(run)
    out["runs"] = runs
    out["bytes_on_disk"] = harness.disk_usage(target)
    return out


def run_restore(spec: dict[str, Any], tool: Tool, wl: Workload) -> dict[str, Any]:
    """One restore (the checkpoint's files evicted from the page cache first when ``cold``),
    then, when ``verify``, every tensor compared with the data, untimed."""
    target = os.path.join(spec["dir"], "ckpt")
    state = tool.prepare_restore(wl)
    cold = harness.evict_from_page_cache(target) if spec.get("cold") else False
    run = harness.measure(lambda: tool.restore(state, target))
    restored = run.pop("value")
    if spec.get("verify", True):
        check_equal(expected_views(wl), tool.check(restored), spec["tool"])
    return {"runs": [run], "cold": cold}


def run_op(spec: dict[str, Any]) -> dict[str, Any]:
    """Child: ``spec["ops"]`` (``save``, ``restore`` or both, in order) of one tool on one
    workload; the workload is rebuilt from ``spec["workload"]`` = [name, size]."""
    wl = by_name(*spec["workload"])
    t0 = time.perf_counter()
    tool = make_tool(spec["tool"])
    result: dict[str, Any] = {"import_seconds": time.perf_counter() - t0}
    for op in spec["ops"]:
        result[op] = (run_save if op == "save" else run_restore)(spec, tool, wl)
    return result
