"""Workloads and single-operation children for ``scripts/bench.py``.

``bench.py`` imports this module for the workload definitions only (no heavy imports at module
level). It also runs it as a script, one fresh interpreter per child:

    python scripts/_bench_peers.py '{"tool": ..., "workload": ..., "op": "save", ...}'

The child imports the tool and builds what the operation needs (untimed). A save child does
one untimed warm-up save (timed separately as the "first save"), then ``repeats`` timed saves,
each into an empty directory after the previous checkpoint was deleted and ``sync`` ran; the
last checkpoint stays for the restore children. A restore child evicts the checkpoint's files
from the page cache (when asked), times exactly one restore and, when asked, compares every
tensor with the regenerated data. Around each timed call the kernel's peak-RSS counter is
reset (``/proc/self/clear_refs``) and read back (VmHWM). The result is one JSON object written
to the ``result`` path.

Durability: every save is timed until its bytes are on disk. streamckpt and torch DCP
(``sync_files=True``) fsync their files themselves; every peer's timed region additionally ends
with an fsync of every file and directory it produced (a no-op cost for already-synced files),
which is what TensorFlow, safetensors and orbax need to be comparable.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30

# tool id -> label printed in the table
TOOLS: dict[str, str] = {
    "streamckpt-1": "streamckpt (1 shard)",
    "streamckpt-4": "streamckpt (4 shards)",
    "tensorflow": "tf.train.Checkpoint",
    "orbax": "orbax-checkpoint",
    "torch-dcp": "torch DCP",
    "safetensors": "safetensors",
}
# tool id -> module that must be importable for the tool to run
TOOL_MODULES: dict[str, str] = {
    "streamckpt-1": "streamckpt",
    "streamckpt-4": "streamckpt",
    "tensorflow": "tensorflow",
    "orbax": "orbax.checkpoint",
    "torch-dcp": "torch.distributed.checkpoint",
    "safetensors": "safetensors.numpy",
}

CKPT_DIR = "ckpt"  # the checkpoint's directory under the directory a child is given
_POOL_SEED = 20240611
_POOL_ELEMS = 12 * MIB  # 48 MiB of random float32; every tensor is a slice of it (copied)


# -- workloads --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    tensors: tuple[tuple[str, tuple[int, ...]], ...]  # (name, shape), float32

    @property
    def nbytes(self) -> int:
        return sum(4 * math.prod(shape) for _, shape in self.tensors)

    @property
    def count(self) -> int:
        return len(self.tensors)


def _mixed_sizes(count: int, total: int, lo: int, hi: int) -> list[int]:
    """``count`` sizes log-spread from ``lo`` to ``hi`` bytes, skewed so they sum to ~``total``.

    Size i is ``lo * (hi/lo) ** (q_i ** p)`` with q_i evenly spaced in (0, 1); the exponent p
    is found by bisection. Sizes are rounded to 4 KiB. Deterministic.
    """
    ratio = hi / lo

    def sizes(p: float) -> list[int]:
        out = []
        for i in range(count):
            q = ((i + 0.5) / count) ** p
            out.append(max(lo, round(lo * ratio**q / (4 * KIB)) * 4 * KIB))
        return out

    low, high = 0.05, 20.0  # small p -> big sizes
    for _ in range(60):
        mid = (low + high) / 2
        if sum(sizes(mid)) > total:
            low = mid
        else:
            high = mid
    return sizes((low + high) / 2)


def workload_a(quick: bool) -> Workload:
    if quick:
        count, total, hi = 60, 128 * MIB, 8 * MIB
    else:
        count, total, hi = 200, GIB, 32 * MIB
    sizes = _mixed_sizes(count, total, 4 * KIB, hi)
    order = np.random.default_rng(1).permutation(count)  # sizes interleaved, not sorted
    tensors = []
    for j, i in enumerate(order):
        n = sizes[int(i)] // 4
        shape: tuple[int, ...] = (n,) if n <= 4096 else (n // 256, 256)
        tensors.append((f"model/layer_{j:03d}/{'bias' if n <= 4096 else 'kernel'}", shape))
    return Workload(
        "A",
        f"{count} float32 tensors, 4 KiB..{hi // MIB} MiB log-mixed, {sum(sizes) / GIB:.3f} GiB",
        tuple(tensors),
    )


def workload_b(quick: bool) -> Workload:
    count = 2_000 if quick else 20_000
    rng = np.random.default_rng(2)
    # log-uniform 1..64 KiB, whole float32 elements
    nbytes = np.exp(rng.uniform(math.log(KIB), math.log(64 * KIB), size=count))
    elems = np.maximum(256, (nbytes // 4).astype(np.int64))
    tensors = tuple(
        (f"blocks/b{i // 20:04d}/p{i % 20:02d}", (int(n),)) for i, n in enumerate(elems)
    )
    total = int(elems.sum()) * 4
    return Workload(
        "B", f"{count:,} float32 tensors, 1..64 KiB log-uniform, {total / MIB:.0f} MiB", tensors
    )


def workloads(quick: bool) -> dict[str, Workload]:
    return {"A": workload_a(quick), "B": workload_b(quick)}


def _pool() -> np.ndarray:
    return np.random.default_rng(_POOL_SEED).random(_POOL_ELEMS, dtype=np.float32)


def _offset(i: int, n: int) -> int:
    return (i * 1_000_003) % (_POOL_ELEMS - n + 1)


def expected_views(wl: Workload, pool: np.ndarray) -> dict[str, np.ndarray]:
    """The workload's values as read-only views of the pool (for checking, no memory)."""
    out = {}
    for i, (name, shape) in enumerate(wl.tensors):
        n = math.prod(shape)
        view = pool[_offset(i, n) : _offset(i, n) + n].reshape(shape)
        view.flags.writeable = False
        out[name] = view
    return out


def make_arrays(wl: Workload) -> dict[str, np.ndarray]:
    """The workload's values as separate, materialized arrays (what a model holds)."""
    return {name: view.copy() for name, view in expected_views(wl, _pool()).items()}


# -- process helpers --------------------------------------------------------------------------


def proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def evict_from_page_cache(root: str) -> bool:
    """Make the next read of every file under ``root`` (a file or a directory) come from disk.

    ``sync``, then ``posix_fadvise(POSIX_FADV_DONTNEED)`` on each file: the kernel drops those
    files' clean pages only (no root needed, and the tools' own libraries stay cached). Where
    fadvise is missing, falls back to ``echo 3 > /proc/sys/vm/drop_caches`` (root only).
    """
    os.sync()
    fadvise = getattr(os, "posix_fadvise", None)
    if fadvise is None:
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3")
            return True
        except OSError:
            return False
    paths = [root] if os.path.isfile(root) else []
    for dirpath, _dirs, files in os.walk(root):
        paths.extend(os.path.join(dirpath, f) for f in files)
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # directories on some filesystems
    finally:
        os.close(fd)


def fsync_tree(root: str) -> int:
    """fsync every file and directory under ``root`` (and ``root`` and its parent)."""
    n = 0
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            fsync_path(os.path.join(dirpath, f))
            n += 1
        fsync_path(dirpath)
    fsync_path(os.path.dirname(os.path.abspath(root)))
    return n


def disk_usage(root: str) -> tuple[int, int]:
    files = size = 0
    for dirpath, _dirs, names in os.walk(root):
        for f in names:
            files += 1
            size += os.path.getsize(os.path.join(dirpath, f))
    return files, size


# -- tools --------------------------------------------------------------------------------------
# Each tool: prepare_save(arrays) -> state (untimed); save(state, root) (timed, durable);
# prepare_restore(wl) -> state (untimed); restore(state, root) -> {name: array-like} (timed).
# ``root`` is an empty directory owned by the tool's checkpoint.


class StreamCkpt:
    def __init__(self, num_shards: int) -> None:
        import streamckpt.sync

        self.sync = streamckpt.sync
        self.num_shards = num_shards
        self.extra: dict[str, Any] = {}

    def prepare_save(self, arrays: dict[str, np.ndarray]) -> Any:
        return arrays

    def save(self, state: Any, root: str) -> None:
        info = self.sync.save(os.path.join(root, "ckpt"), state, num_shards=self.num_shards)
        self.extra = {"phases": dict(info.seconds_by_phase), "inner_seconds": info.seconds}

    def prepare_restore(self, wl: Workload) -> Any:
        return None

    def restore(self, state: Any, root: str) -> dict[str, Any]:
        return self.sync.load(os.path.join(root, "ckpt"))


class TensorFlow:
    """tf.train.Checkpoint over a dict of tf.Variables, created before timing.

    save: ``ckpt.write(prefix)``, then fsync of every file TF left under the directory and of
    the directory (TF does not fsync). restore: ``ckpt.read(prefix)`` into variables of the
    right shapes created (zero-filled) before timing; it restores in place, eagerly.
    """

    def __init__(self) -> None:
        import tensorflow as tf

        self.tf = tf

    def _checkpoint(self, variables: dict[str, Any]) -> Any:
        return self.tf.train.Checkpoint(params=variables)

    def prepare_save(self, arrays: dict[str, np.ndarray]) -> Any:
        variables = {name: self.tf.Variable(a) for name, a in arrays.items()}
        arrays.clear()  # the variables hold their own copies; the model is in TF now
        return self._checkpoint(variables)

    def save(self, state: Any, root: str) -> None:
        state.write(os.path.join(root, "ckpt"))
        fsync_tree(root)

    def prepare_restore(self, wl: Workload) -> Any:
        variables = {
            name: self.tf.Variable(self.tf.zeros(shape, self.tf.float32))
            for name, shape in wl.tensors
        }
        return variables, self._checkpoint(variables)

    def restore(self, state: Any, root: str) -> dict[str, Any]:
        variables, ckpt = state
        status = ckpt.read(os.path.join(root, "ckpt"))
        self._status = status
        return variables

    def check(self, restored: dict[str, Any]) -> dict[str, np.ndarray]:
        self._status.assert_existing_objects_matched()
        return {k: v.numpy() for k, v in restored.items()}


class Orbax:
    """orbax-checkpoint's synchronous ``Checkpointer(StandardCheckpointHandler())`` with its
    defaults (OCDBT + zarr3); restore returns numpy arrays (the saved leaves were numpy)."""

    def __init__(self) -> None:
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler())

    def prepare_save(self, arrays: dict[str, np.ndarray]) -> Any:
        return arrays

    def save(self, state: Any, root: str) -> None:
        path = os.path.join(os.path.abspath(root), "ckpt")
        self.ckptr.save(path, state)
        fsync_tree(path)

    def prepare_restore(self, wl: Workload) -> Any:
        return None

    def restore(self, state: Any, root: str) -> dict[str, Any]:
        return self.ckptr.restore(os.path.join(os.path.abspath(root), "ckpt"))


class TorchDCP:
    """torch.distributed.checkpoint in one process: FileSystemWriter(sync_files=True); the
    state dict holds torch tensors sharing the numpy arrays' memory. Restore loads in place
    into tensors of the right shapes allocated (``torch.empty``) before timing."""

    def __init__(self) -> None:
        import torch
        import torch.distributed.checkpoint as dcp

        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        self.torch = torch
        self.dcp = dcp

    def prepare_save(self, arrays: dict[str, np.ndarray]) -> Any:
        return {name: self.torch.from_numpy(a) for name, a in arrays.items()}

    def save(self, state: Any, root: str) -> None:
        path = os.path.join(root, "ckpt")
        self.dcp.save(state, storage_writer=self.dcp.FileSystemWriter(path, sync_files=True))
        fsync_tree(path)

    def prepare_restore(self, wl: Workload) -> Any:
        empty = self.torch.empty
        return {name: empty(shape, dtype=self.torch.float32) for name, shape in wl.tensors}

    def restore(self, state: Any, root: str) -> dict[str, Any]:
        self.dcp.load(state, storage_reader=self.dcp.FileSystemReader(os.path.join(root, "ckpt")))
        return state

    def check(self, restored: dict[str, Any]) -> dict[str, np.ndarray]:
        return {k: v.numpy() for k, v in restored.items()}


class SafeTensors:
    """safetensors.numpy: ``save_file`` then fsync of the file and directory; ``load_file``."""

    def __init__(self) -> None:
        import safetensors.numpy

        self.st = safetensors.numpy

    def prepare_save(self, arrays: dict[str, np.ndarray]) -> Any:
        return arrays

    def save(self, state: Any, root: str) -> None:
        self.st.save_file(state, os.path.join(root, "ckpt.safetensors"))
        fsync_tree(root)

    def prepare_restore(self, wl: Workload) -> Any:
        return None

    def restore(self, state: Any, root: str) -> dict[str, Any]:
        return self.st.load_file(os.path.join(root, "ckpt.safetensors"))


def make_tool(tool: str) -> Any:
    if tool.startswith("streamckpt-"):
        return StreamCkpt(int(tool.split("-", 1)[1]))
    return {
        "tensorflow": TensorFlow,
        "orbax": Orbax,
        "torch-dcp": TorchDCP,
        "safetensors": SafeTensors,
    }[tool]()


# -- one measured operation ---------------------------------------------------------------------


def _rss_mib(kib: int | None) -> float | None:
    return None if kib is None else kib / 1024


def _measure(fn: Any) -> dict[str, Any]:
    """Time one call; peak RSS is the kernel's high-water mark since the reset just before."""
    peak_reset = reset_peak_rss()
    rss_before = proc_status_kib("VmRSS")
    t0 = time.perf_counter()
    value = fn()
    seconds = time.perf_counter() - t0
    peak = proc_status_kib("VmHWM") if peak_reset else None
    return {
        "seconds": seconds,
        "rss_before_mib": _rss_mib(rss_before),
        "peak_rss_mib": _rss_mib(peak),
        "value": value,
    }


def run_save(spec: dict[str, Any], tool: Any, wl: Workload, result: dict[str, Any]) -> None:
    """Untimed: build the arrays and the tool's state, one warm-up save. Timed: ``repeats``
    saves, each into a fresh directory, the previous checkpoint deleted and synced away first.
    The last checkpoint stays for the restore children."""
    root = spec["dir"]
    t0 = time.perf_counter()
    state = tool.prepare_save(make_arrays(wl))
    result["prepare_seconds"] = time.perf_counter() - t0
    target = os.path.join(root, CKPT_DIR)
    if spec.get("warmup", True):
        # The first save in a process pays one-time costs (TF traces its save function,
        # DCP builds its planner, ...). It is reported, but not in the medians: the timed saves
        # are the steady state, like the Nth checkpoint of a training job.
        os.makedirs(target)
        os.sync()
        first = _measure(lambda: tool.save(state, target))
        result["first_save_seconds"] = first["seconds"]
    runs: list[dict[str, Any]] = []
    loop_started = time.perf_counter()
    for _ in range(spec["repeats"]):
        if runs and time.perf_counter() - loop_started > spec.get("budget", math.inf):
            break  # a slow cell: fewer repeats (the table shows n)
        if os.path.exists(target):
            shutil.rmtree(target)
        os.makedirs(target)
        os.sync()  # nothing dirty left from setup or the previous run
        fsync_path(root)
        run = _measure(lambda: tool.save(state, target))
        run.pop("value")
        run["extra"] = dict(getattr(tool, "extra", {}))
        runs.append(run)
    result["runs"] = runs
    result["files"], result["bytes_on_disk"] = disk_usage(target)


def run_restore(spec: dict[str, Any], tool: Any, wl: Workload, result: dict[str, Any]) -> None:
    """One restore, the first in this process (as at job start), the checkpoint's files evicted
    from the page cache first when ``cold``; then (``verify``) every tensor is compared with the
    regenerated data, untimed."""
    target = os.path.join(spec["dir"], CKPT_DIR)
    t0 = time.perf_counter()
    state = tool.prepare_restore(wl)
    result["prepare_seconds"] = time.perf_counter() - t0
    result["cold"] = evict_from_page_cache(target) if spec.get("cold") else False
    run = _measure(lambda: tool.restore(state, target))
    restored = run.pop("value")
    result["runs"] = [run]
    if not spec.get("verify", True):
        return
    t0 = time.perf_counter()
    arrays = tool.check(restored) if hasattr(tool, "check") else restored
    expected = expected_views(wl, _pool())
    if set(arrays) != set(expected):
        missing = sorted(set(expected) - set(arrays))[:3]
        raise AssertionError(f"restored names differ from the saved ones (missing: {missing})")
    bad = [
        k
        for k, v in expected.items()
        if np.asarray(arrays[k]).dtype != np.float32 or not np.array_equal(arrays[k], v)
    ]
    if bad:
        raise AssertionError(f"{len(bad)} tensors differ after restore, e.g. {bad[0]!r}")
    result["verified_tensors"] = len(expected)
    result["check_seconds"] = time.perf_counter() - t0


def run_op(spec: dict[str, Any]) -> dict[str, Any]:
    if spec["op"] == "limits":
        return run_limits(spec)
    wl = workloads(spec["quick"])[spec["workload"]]
    t0 = time.perf_counter()
    tool = make_tool(spec["tool"])
    result: dict[str, Any] = {"import_seconds": time.perf_counter() - t0}
    if spec["op"] == "save":
        run_save(spec, tool, wl, result)
    else:
        run_restore(spec, tool, wl, result)
    return result


# -- physical limits ----------------------------------------------------------------------------


def run_limits(spec: dict[str, Any]) -> dict[str, Any]:
    """Disk sequential write (os.write of 8 MiB chunks, then fsync of file and directory),
    cold sequential read (page cache dropped; os.readv into one reused 8 MiB buffer), memcpy
    (np.copyto between two pre-faulted buffers), first touch of fresh memory (np.empty + fill),
    crc32c (the ``crc32c`` package, 8 MiB calls). Each ``repeats`` times over ``size`` bytes."""
    import crc32c

    size, repeats, chunk = spec["size"], spec["repeats"], 8 * MIB
    chunk_buf = np.random.default_rng(3).integers(0, 256, chunk, dtype=np.uint8)
    view = memoryview(chunk_buf)
    out: dict[str, list[float]] = {k: [] for k in ("disk_write", "disk_read_cold")}
    path = os.path.join(spec["dir"], "limits.bin")
    for i in range(repeats + 1):  # the first round is an untimed warm-up
        os.sync()
        t0 = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for _ in range(size // chunk):
                mv = view
                while mv:
                    mv = mv[os.write(fd, mv) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_path(spec["dir"])
        if i:
            out["disk_write"].append(time.perf_counter() - t0)
        if spec.get("cold") and evict_from_page_cache(path):
            rbuf = bytearray(chunk)
            rview = memoryview(rbuf)
            t0 = time.perf_counter()
            fd = os.open(path, os.O_RDONLY)
            try:
                while os.readv(fd, [rview]):
                    pass
            finally:
                os.close(fd)
            if i:
                out["disk_read_cold"].append(time.perf_counter() - t0)
        os.unlink(path)
    os.sync()

    times: dict[str, list[float]] = {"first_touch": [], "memcpy": [], "crc32c": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        fresh = np.empty(size, dtype=np.uint8)
        fresh.fill(1)
        times["first_touch"].append(time.perf_counter() - t0)
        del fresh
    src = np.empty(size, dtype=np.uint8)
    src.fill(7)
    dst = np.empty(size, dtype=np.uint8)
    dst.fill(0)
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times["memcpy"].append(time.perf_counter() - t0)
    del dst
    src_view = memoryview(src)
    for _ in range(repeats):
        t0 = time.perf_counter()
        crc = 0
        for start in range(0, size, chunk):
            crc = crc32c.crc32c(src_view[start : start + chunk], crc)
        times["crc32c"].append(time.perf_counter() - t0)
    out.update(times)
    return {"size": size, "seconds": out}


def main(argv: list[str]) -> int:
    spec = json.loads(argv[1])
    try:
        result = run_op(spec)
        result["ok"] = True
    except BaseException as exc:  # reported to the parent, which shows it
        import traceback

        traceback.print_exc()
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
    with open(spec["result"], "w") as f:
        json.dump(result, f)
    sys.stdout.flush()
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    # Keep TF / JAX quiet and on the CPU; decided before any of them is imported.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    sys.exit(main(sys.argv))
