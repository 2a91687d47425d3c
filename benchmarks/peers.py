"""streamckpt and its peers on local disk, one measured operation per child interpreter.

Rule: every tool gets the same treatment. Building arrays, tf.Variables, torch tensors and
other in-memory state is untimed (``prepare_*``); a save is timed until its bytes are durable
(streamckpt and TensorStore fsync their files, torch DCP with ``sync_files=True``, and every
peer's timed region ends with an fsync of every file and directory it wrote, which
TensorFlow, safetensors, torch.save and orbax do not do themselves); a restore is timed from
the call to the returned arrays. A background save is timed from the call until the caller
may change its arrays again (the call returns; TensorStore: its write futures' ``copy``
resolve), with each tool's own mechanism: streamckpt ``write_async`` (a copy into a reused
buffer), TensorFlow ``CheckpointOptions(enable_async=True)``, orbax ``AsyncCheckpointer``,
torch DCP ``async_save``; safetensors and torch.save have none. Its wait until durable is
timed apart; its files are not read back (the same writers' plain saves are).

A tool: ``prepare_save(arrays) -> state``; ``save(state, root)``; ``prepare_restore(wl) ->
state``; ``restore(state, root) -> {name: array-like}``; ``check(restored) -> {name:
ndarray}``; where ``background``: ``save_background(state, root) -> handle`` and
``finish_background(handle, root)``. ``root`` is an empty directory owned by the tool's
checkpoint, whose file or directory in it is ``FILENAME``. Peers that are not installed are
reported as skipped.
"""

from __future__ import annotations

import functools
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
    "streamckpt": ("streamckpt", "streamckpt"),
    "streamckpt-1": ("streamckpt (1 shard)", "streamckpt"),
    "streamckpt-4": ("streamckpt (4 shards)", "streamckpt"),
    "tensorflow": ("tf.train.Checkpoint", "tensorflow"),
    "orbax": ("orbax-checkpoint", "orbax.checkpoint"),
    "torch-dcp": ("torch DCP", "torch.distributed.checkpoint"),
    "safetensors": ("safetensors", "safetensors.numpy"),
    "torch-save": ("torch.save", "torch"),
    "tensorstore": ("TensorStore", "tensorstore"),
}
BASELINE = "tensorflow"
#: The checkpoint's file or directory inside a tool's root; a prefix for streamckpt and TF.
FILENAME = {"safetensors": "ckpt.safetensors", "torch-save": "ckpt.pt"}
#: Tools with their own background save.
BACKGROUND = {"streamckpt", "streamckpt-1", "streamckpt-4", "tensorflow", "orbax", "torch-dcp"}
BACKGROUND |= {"tensorstore"}


def checkpoint_path(tool: str, root: str) -> str:
    """Where ``tool``'s checkpoint in ``root`` is (absolute: orbax and TensorStore need it)."""
    return os.path.join(os.path.abspath(root), FILENAME.get(tool, "ckpt"))


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
    """The defaults: save the arrays as they are, restore into nothing, check as returned,
    no background save."""

    def __init__(self, tool: str) -> None:
        self.tool = tool

    def path(self, root: str) -> str:
        return checkpoint_path(self.tool, root)

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

    def prepare_background(self, arrays: dict[str, np.ndarray[Any, Any]]) -> Any:
        return self.prepare_save(arrays)

    def save_background(self, state: Any, root: str) -> Any:
        raise NotImplementedError(f"{self.tool} has no background save")

    def finish_background(self, handle: Any, root: str) -> None:
        raise NotImplementedError

    def close(self, state: Any) -> None:
        """Let go of what ``prepare_background`` made (untimed)."""


class StreamCkpt(Tool):
    """``streamckpt.sync.save`` / ``load`` with ``num_shards`` (None: the store's default,
    about 256 MiB a shard on local disk); background:
    ``streamckpt.Checkpoint(model=arrays).write_async``, which returns once the arrays are
    copied into the checkpoint's reused buffer."""

    def __init__(self, tool: str) -> None:
        super().__init__(tool)
        import streamckpt.sync

        self.sync = streamckpt.sync
        self.num_shards = int(tool.split("-", 1)[1]) if "-" in tool else None

    def save(self, state: Any, root: str) -> None:
        self.sync.save(self.path(root), state, num_shards=self.num_shards)

    def restore(self, state: Any, root: str) -> dict[str, Any]:
        return self.sync.load(self.path(root))

    def prepare_background(self, arrays: dict[str, np.ndarray[Any, Any]]) -> Any:
        import streamckpt

        return streamckpt.Checkpoint(model=arrays)

    def save_background(self, state: Any, root: str) -> Any:
        return state.write_async(self.path(root), num_shards=self.num_shards)

    def finish_background(self, handle: Any, root: str) -> None:
        handle.result()

    def close(self, state: Any) -> None:
        state.close()


class TensorFlow(Tool):
    """tf.train.Checkpoint over tf.Variables made before the timer; ``write`` then fsync;
    ``read`` restores in place into zero-filled variables made before the timer. Background:
    ``write(prefix, options=CheckpointOptions(enable_async=True))``, then ``sync()``."""

    def __init__(self, tool: str) -> None:
        super().__init__(tool)
        self.tf = importlib.import_module("tensorflow")

    def prepare_save(self, arrays: dict[str, np.ndarray[Any, Any]]) -> Any:
        variables = {name: self.tf.Variable(a) for name, a in arrays.items()}
        arrays.clear()  # the variables hold their own copies: the model is in TF now
        return self.tf.train.Checkpoint(params=variables)

    def save(self, state: Any, root: str) -> None:
        state.write(self.path(root))
        harness.fsync_tree(root)

    def prepare_restore(self, wl: Workload) -> Any:
        zeros = self.tf.zeros
        variables = {n: self.tf.Variable(zeros(s, self.tf.float32)) for n, s in wl.tensors}
        return variables, self.tf.train.Checkpoint(params=variables)

    def restore(self, state: Any, root: str) -> dict[str, Any]:
        variables, ckpt = state
        self.status = ckpt.read(self.path(root))
        return variables  # type: ignore[no-any-return]

    def check(self, restored: dict[str, Any]) -> dict[str, Any]:
        self.status.assert_existing_objects_matched()
        return {k: v.numpy() for k, v in restored.items()}

    def save_background(self, state: Any, root: str) -> Any:
        state.write(self.path(root), options=self.tf.train.CheckpointOptions(enable_async=True))
        return state

    def finish_background(self, handle: Any, root: str) -> None:
        handle.sync()
        harness.fsync_tree(root)


class Orbax(Tool):
    """orbax-checkpoint's synchronous ``Checkpointer(StandardCheckpointHandler())`` with its
    defaults (OCDBT + zarr3, compressed); restore returns numpy arrays. Background:
    ``AsyncCheckpointer(StandardCheckpointHandler())``, then ``wait_until_finished()``."""

    def __init__(self, tool: str) -> None:
        super().__init__(tool)
        self.ocp = importlib.import_module("orbax.checkpoint")
        self.ckptr = self.ocp.Checkpointer(self.ocp.StandardCheckpointHandler())
        self.async_ckptr: Any = None

    def save(self, state: Any, root: str) -> None:
        self.ckptr.save(self.path(root), state)
        harness.fsync_tree(self.path(root))

    def restore(self, state: Any, root: str) -> dict[str, Any]:
        return self.ckptr.restore(self.path(root))  # type: ignore[no-any-return]

    def save_background(self, state: Any, root: str) -> Any:
        if self.async_ckptr is None:
            self.async_ckptr = self.ocp.AsyncCheckpointer(self.ocp.StandardCheckpointHandler())
        self.async_ckptr.save(self.path(root), args=self.ocp.args.StandardSave(state))
        return self.async_ckptr

    def finish_background(self, handle: Any, root: str) -> None:
        handle.wait_until_finished()
        harness.fsync_tree(self.path(root))

    def close(self, state: Any) -> None:
        if self.async_ckptr is not None:
            self.async_ckptr.close()


class TorchDCP(Tool):
    """torch.distributed.checkpoint in one process, FileSystemWriter(sync_files=True), over
    tensors sharing the arrays' memory; loads in place into tensors allocated before the
    timer. Background: ``async_save`` (it stages a copy), then the future's ``result()``."""

    def __init__(self, tool: str) -> None:
        super().__init__(tool)
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        self.torch = importlib.import_module("torch")
        self.dcp = importlib.import_module("torch.distributed.checkpoint")

    def prepare_save(self, arrays: dict[str, np.ndarray[Any, Any]]) -> Any:
        return {name: self.torch.from_numpy(a) for name, a in arrays.items()}

    def save(self, state: Any, root: str) -> None:
        writer = self.dcp.FileSystemWriter(self.path(root), sync_files=True)
        self.dcp.save(state, storage_writer=writer)
        harness.fsync_tree(self.path(root))

    def prepare_restore(self, wl: Workload) -> Any:
        return {n: self.torch.empty(s, dtype=self.torch.float32) for n, s in wl.tensors}

    def restore(self, state: Any, root: str) -> dict[str, Any]:
        self.dcp.load(state, storage_reader=self.dcp.FileSystemReader(self.path(root)))
        return state  # type: ignore[no-any-return]

    def check(self, restored: dict[str, Any]) -> dict[str, Any]:
        return {k: v.numpy() for k, v in restored.items()}

    def save_background(self, state: Any, root: str) -> Any:
        writer = self.dcp.FileSystemWriter(self.path(root), sync_files=True)
        return self.dcp.async_save(state, storage_writer=writer)

    def finish_background(self, handle: Any, root: str) -> None:
        handle.result()
        harness.fsync_tree(self.path(root))


class SafeTensors(Tool):
    """safetensors.numpy: ``save_file`` then fsync of the file and directory; ``load_file``."""

    def __init__(self, tool: str) -> None:
        super().__init__(tool)
        self.st = importlib.import_module("safetensors.numpy")

    def save(self, state: Any, root: str) -> None:
        self.st.save_file(state, self.path(root))
        harness.fsync_tree(root)

    def restore(self, state: Any, root: str) -> dict[str, Any]:
        return self.st.load_file(self.path(root))  # type: ignore[no-any-return]


class TorchSave(Tool):
    """``torch.save`` of a dict of tensors sharing the arrays' memory, then fsync of the file
    and directory; ``torch.load(path, weights_only=True)`` (reads the whole file)."""

    def __init__(self, tool: str) -> None:
        super().__init__(tool)
        self.torch = importlib.import_module("torch")

    def prepare_save(self, arrays: dict[str, np.ndarray[Any, Any]]) -> Any:
        return {name: self.torch.from_numpy(a) for name, a in arrays.items()}

    def save(self, state: Any, root: str) -> None:
        self.torch.save(state, self.path(root))
        harness.fsync_tree(root)

    def restore(self, state: Any, root: str) -> dict[str, Any]:
        return self.torch.load(self.path(root), weights_only=True)  # type: ignore[no-any-return]

    def check(self, restored: dict[str, Any]) -> dict[str, Any]:
        return {k: v.numpy() for k, v in restored.items()}


class TensorStore(Tool):
    """TensorStore's own layout for many arrays in one store: one zarr array per tensor
    (uncompressed, one chunk) in one OCDBT database on the file kvstore (what orbax builds
    on, without its tree layer and compression; one plain zarr directory per tensor costs
    four fsyncs a tensor). Every open and write is issued at once, then waited on; TensorStore
    fsyncs its files itself, and the tree is fsync'd after. Restore: the names and shapes
    given, every open and read issued at once. Background: the same save, returning once
    every write's ``copy`` future resolved (the arrays may change from then on)."""

    def __init__(self, tool: str) -> None:
        super().__init__(tool)
        self.ts = importlib.import_module("tensorstore")

    def spec(self, root: str, name: str) -> dict[str, Any]:
        base = {"driver": "ocdbt", "base": f"file://{self.path(root)}/", "path": f"{name}/"}
        return {"driver": "zarr", "kvstore": base}

    def save_background(self, state: Any, root: str) -> Any:
        context = self.ts.Context()

        def metadata(a: np.ndarray[Any, Any]) -> dict[str, Any]:
            shape = list(a.shape)
            return {"shape": shape, "chunks": shape, "dtype": a.dtype.str, "compressor": None}

        opening = [
            self.ts.open(
                self.spec(root, name) | {"metadata": metadata(a)}, create=True, context=context
            )
            for name, a in state.items()
        ]
        writes = [f.result().write(a) for f, a in zip(opening, state.values(), strict=True)]
        for write in writes:
            write.copy.result()
        return writes

    def finish_background(self, handle: Any, root: str) -> None:
        for write in handle:
            write.commit.result()
        harness.fsync_tree(self.path(root))

    def save(self, state: Any, root: str) -> None:
        self.finish_background(self.save_background(state, root), root)

    def prepare_restore(self, wl: Workload) -> Any:
        return [name for name, _ in wl.tensors]

    def restore(self, state: Any, root: str) -> dict[str, Any]:
        context = self.ts.Context()
        opening = [self.ts.open(self.spec(root, n), open=True, context=context) for n in state]
        reads = [f.result().read() for f in opening]
        return {name: r.result() for name, r in zip(state, reads, strict=True)}


def make_tool(tool: str) -> Tool:
    if tool.startswith("streamckpt"):
        return StreamCkpt(tool)
    peer: Callable[[str], Tool] = {
        "tensorflow": TensorFlow,
        "orbax": Orbax,
        "torch-dcp": TorchDCP,
        "safetensors": SafeTensors,
        "torch-save": TorchSave,
        "tensorstore": TensorStore,
    }[tool]
    return peer(tool)


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


def run_background(spec: dict[str, Any], tool: Tool, wl: Workload) -> dict[str, Any]:
    """As ``run_save`` (a warm-up first, then up to ``repeats`` runs within ``budget``),
    timing ``save_background`` until it returns; ``finish_seconds`` is the wait after it until
    the checkpoint is durable. Each run starts after the previous one finished and its
    checkpoint was deleted and synced away; the last one is deleted too."""
    state = tool.prepare_background(make_arrays(wl))
    target = os.path.join(spec["dir"], "background")
    out: dict[str, Any] = {}
    runs: list[dict[str, Any]] = []
    try:
        os.makedirs(target)
        os.sync()
        t0 = time.perf_counter()
        tool.finish_background(tool.save_background(state, target), target)
        out["first_save_seconds"] = time.perf_counter() - t0
        started = time.perf_counter()
        for _ in range(spec["repeats"]):
            if runs and time.perf_counter() - started > spec.get("budget", math.inf):
                break
            shutil.rmtree(target, ignore_errors=True)
            os.makedirs(target)
            os.sync()
            harness.fsync_path(spec["dir"])
            run = harness.measure(lambda: tool.save_background(state, target))
            handle = run.pop("value")
            finish = functools.partial(tool.finish_background, handle, target)
            run["finish_seconds"] = harness.seconds_of(finish)
            runs.append(run)
        out["bytes_on_disk"] = harness.disk_usage(target)
    finally:
        tool.close(state)
        shutil.rmtree(target, ignore_errors=True)
    out["runs"] = runs
    return out


def run_restore(spec: dict[str, Any], tool: Tool, wl: Workload, cold: bool) -> dict[str, Any]:
    """One restore: the checkpoint's files evicted from the page cache first when ``cold``,
    read into it first otherwise (a warm cache, whatever wrote them); then, when
    ``verify``, every tensor compared with the data, untimed."""
    target = os.path.join(spec["dir"], "ckpt")
    state = tool.prepare_restore(wl)
    if cold:
        cold = harness.evict_from_page_cache(target)
    else:
        harness.load_into_page_cache(target)
    run = harness.measure(lambda: tool.restore(state, target))
    restored = run.pop("value")
    if spec.get("verify", True):
        check_equal(expected_views(wl), tool.check(restored), spec["tool"])
    return {"runs": [run], "cold": cold}


def run_op(spec: dict[str, Any]) -> dict[str, Any]:
    """Child: ``spec["ops"]`` in order, each ``save``, ``background`` or a restore named in
    ``spec["restores"]`` (op -> cold), of one tool on one workload; the workload is rebuilt
    from ``spec["workload"]`` = [name, size, count]."""
    wl = by_name(*spec["workload"])
    t0 = time.perf_counter()
    tool = make_tool(spec["tool"])
    result: dict[str, Any] = {"import_seconds": time.perf_counter() - t0}
    for op in spec["ops"]:
        if op == "save":
            result[op] = run_save(spec, tool, wl)
        elif op == "background":
            result[op] = run_background(spec, tool, wl)
        else:
            result[op] = run_restore(spec, tool, wl, bool(spec["restores"][op]))
    return result
