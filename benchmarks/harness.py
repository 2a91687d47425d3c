"""What every benchmark needs around the code it measures: child processes, the page cache,
peak RSS, and the machine's own limits.

Rule: a measured operation that must start cold (a restore at job start, a first save, a peak
RSS) runs in a child interpreter started by ``run_child``; the child calls one function of
this package with a JSON spec and writes what it returns as JSON. Nothing here imports
streamckpt or a peer, so that each child pays only for what it measures.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.workloads import MIB

ROOT = Path(__file__).resolve().parent.parent  # children run here, so -m benchmarks resolves
#: Keep TensorFlow, JAX and torch quiet and on the CPU in every child.
CHILD_ENV = {
    "TF_CPP_MIN_LOG_LEVEL": "3",
    "JAX_PLATFORMS": "cpu",
    "CUDA_VISIBLE_DEVICES": "",
    "PYTHONWARNINGS": "ignore",
}


# -- children -----------------------------------------------------------------------------------


def run_child(
    target: str, spec: dict[str, Any], *, workdir: str, label: str, timeout: float = 600
) -> dict[str, Any]:
    """Run ``benchmarks.<target>(spec)`` in a fresh interpreter; its result, and ``ok``.

    ``target`` is ``module.function`` inside this package. The child's output goes to a log
    in ``workdir``; on failure its tail is printed and kept in the result's ``log_tail``.
    """
    result_path = os.path.join(workdir, f"result-{label}.json")
    log_path = os.path.join(workdir, f"log-{label}.txt")
    argv = [sys.executable, "-m", "benchmarks", "_child", target, json.dumps(spec), result_path]
    started = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            done = subprocess.run(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
                cwd=ROOT,
                env=os.environ | CHILD_ENV,
            )
            rc: int | str = done.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    result: dict[str, Any]
    try:
        with open(result_path) as f:
            result = json.load(f)
    except (OSError, ValueError):
        result = {"ok": False, "error": f"child exited with {rc} and wrote no result"}
    result["wall_seconds"] = time.perf_counter() - started
    if not result.get("ok"):
        with open(log_path, errors="replace") as f:
            result["log_tail"] = f.read()[-2000:]
        print(
            f"    ! {label}: {result['error']}\n      "
            + result["log_tail"].replace("\n", "\n      ")
        )
    return result


def child_main(target: str, spec_json: str, result_path: str) -> int:
    """The child's side of ``run_child``."""
    module, function = target.rsplit(".", 1)
    try:
        fn = getattr(importlib.import_module(f"benchmarks.{module}"), function)
        result = dict(fn(json.loads(spec_json)))
        result["ok"] = True
    except BaseException as exc:  # reported to the parent, which shows it
        traceback.print_exc()
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
    with open(result_path, "w") as f:
        json.dump(result, f)
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    return 0 if result["ok"] else 1


# -- timing and memory --------------------------------------------------------------------------


def proc_status_kib(field: str) -> int | None:
    """A ``/proc/self/status`` field in KiB (VmRSS, VmHWM), None where there is none."""
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(fn: Callable[[], Any]) -> dict[str, Any]:
    """Time one call; ``peak_rss_mib`` is the kernel's high-water mark since just before it."""
    peak_reset = reset_peak_rss()
    before = proc_status_kib("VmRSS")
    t0 = time.perf_counter()
    value = fn()
    seconds = time.perf_counter() - t0
    peak = proc_status_kib("VmHWM") if peak_reset else None
    return {
        "seconds": seconds,
        "rss_before_mib": None if before is None else before / 1024,
        "peak_rss_mib": None if peak is None else peak / 1024,
        "value": value,
    }


def seconds_of(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# -- files and the page cache -------------------------------------------------------------------


def files_under(root: str) -> list[str]:
    """``root`` if it is a file, else every file under it, each directory's in name order."""
    paths = [root] if os.path.isfile(root) else []
    for dirpath, _dirs, files in os.walk(root):
        paths.extend(os.path.join(dirpath, f) for f in sorted(files))
    return paths


def evict_from_page_cache(root: str) -> bool:
    """Make the next read of every file under ``root`` (a file or a directory) come from disk.

    ``sync``, then ``posix_fadvise(POSIX_FADV_DONTNEED)`` on each file: the kernel drops those
    files' clean pages only (what ``echo 3 > drop_caches`` does, for them alone: no root
    needed, and the tools' libraries stay cached). Without fadvise: drop_caches (root only).
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
    paths = files_under(root)
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def can_evict(workdir: str) -> bool:
    probe = os.path.join(workdir, "evict-probe")
    with open(probe, "wb") as f:
        f.write(b"x" * 4096)
    try:
        return evict_from_page_cache(probe)
    finally:
        os.unlink(probe)


def load_into_page_cache(root: str) -> None:
    """Read every file under ``root`` (a file or a directory) once, so that the next read of
    it comes from the page cache (files written with O_DIRECT are not cached otherwise)."""
    paths = files_under(root)
    buffer = memoryview(bytearray(8 * MIB))
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            while os.readv(fd, [buffer]):
                pass
        finally:
            os.close(fd)


#: ``read_files``' ways (``spec["how"]``), each a limit of a restore of the files
READ_WAYS = ("fresh", "reused", "copy")


def read_files(spec: dict[str, Any]) -> dict[str, Any]:
    """Child: every file under ``spec["root"]`` once, in order: a limit of a restore of those
    very files, measured as the restores are (a fresh process, the files evicted first when
    ``spec["cold"]``, read into the page cache first otherwise). ``spec["how"]``:

    - ``fresh`` (default): plain 8 MiB ``preadv`` into one fresh buffer, one after the other:
      what a simple reader gets, no tuning, fresh memory's first touch included;
    - ``reused``: the same reads into one reused 8 MiB buffer: the disk's (or the page
      cache's) speed alone, the cold read limit of these files at this moment;
    - ``copy`` (warm only): the files mapped (populated) and copied into one fresh buffer,
      ``ndarray`` to ``ndarray``: the warm limit, a copy into fresh memory, in a process
      that touches no more fresh memory than a restore does.

    Why beside the limits child: on a VM the disk's host caches what was written or read
    lately, so a "cold" read of the 1 GiB file the limits child just wrote can run at 2.4
    GB/s while a checkpoint written minutes earlier reads at 0.6; and fresh memory's first
    touch varies as much from process to process (copies of 1 GiB into fresh memory by fresh
    processes, measured alternating with restores: 0.18 to 3.2 s, most near 0.2), while the
    limits child's copies, repeated in one process, reuse what it freed. Measured in the same
    rounds as the restores, the same files give each restore row limits taken under the same
    conditions.
    """
    import mmap

    import numpy as np

    how = spec.get("how", "fresh")
    if how not in READ_WAYS or (how == "copy" and spec["cold"]):
        raise ValueError(f"no such way to read files: {how!r} (cold: {spec['cold']})")
    paths = files_under(spec["root"])
    cold = bool(spec["cold"]) and evict_from_page_cache(spec["root"])
    if not cold:
        load_into_page_cache(spec["root"])
    sizes = [os.path.getsize(path) for path in paths]
    if how == "copy":
        sources = []
        for path in (p for p, size in zip(paths, sizes, strict=True) if size):  # mmap: not empty
            with open(path, "rb") as f:
                flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
                mapped = mmap.mmap(f.fileno(), 0, flags=flags, prot=mmap.PROT_READ)
            sources.append(np.frombuffer(mapped, np.uint8))
        t0 = time.perf_counter()
        out = np.empty(sum(sizes), np.uint8)
        at = 0
        for source in sources:
            out[at : at + source.size] = source
            at += source.size
        return {"seconds": time.perf_counter() - t0, "bytes": at, "cold": False, "how": how}
    t0 = time.perf_counter()
    if how == "fresh":
        buffer = np.empty(sum(sizes), np.uint8)
    else:
        buffer = np.empty(8 * MIB, np.uint8)
        buffer.fill(0)  # faulted in before the clock's next read
        t0 = time.perf_counter()
    view = memoryview(buffer).cast("B")
    done = 0
    for path, size in zip(paths, sizes, strict=True):
        fd = os.open(path, os.O_RDONLY)
        try:
            offset = 0
            while offset < size:
                at = done if how == "fresh" else 0
                step = min(size - offset, 8 * MIB)
                got = os.preadv(fd, [view[at : at + step]], offset)
                if not got:
                    raise OSError(f"{path} ended early")
                offset += got
                done += got
        finally:
            os.close(fd)
    return {"seconds": time.perf_counter() - t0, "bytes": done, "cold": cold, "how": how}


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # directories on some filesystems
    finally:
        os.close(fd)


def fsync_tree(root: str) -> None:
    """fsync every file and directory under ``root``, and ``root``'s parent."""
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            fsync_path(os.path.join(dirpath, f))
        fsync_path(dirpath)
    fsync_path(os.path.dirname(os.path.abspath(root)))


def disk_usage(root: str) -> int:
    """Bytes in the files under ``root``."""
    return sum(
        os.path.getsize(os.path.join(dirpath, f))
        for dirpath, _dirs, files in os.walk(root)
        for f in files
    )


# -- the machine's limits -----------------------------------------------------------------------

LIMIT_NAMES = {
    "disk_write": "disk sequential write (8 MiB os.write + fsync)",
    "writeback_write": "disk write, each 8 MiB's writeback started (+ sync_file_range)",
    "direct_write_1": "disk O_DIRECT write, 1 request in flight (8 MiB pwrite + fsync)",
    "direct_write_16": "disk O_DIRECT write, 16 requests in flight (8 MiB pwrite + fsync)",
    "disk_read_cold": "disk sequential read, cold cache",
    "memcpy": "memcpy into mapped memory (np.copyto, pre-faulted)",
    "copy_fresh": "copy into fresh memory (ndarray.copy)",
    "first_touch": "first touch of fresh memory (np.empty + fill)",
    "crc32c": "crc32c (crc32c package, 1 thread)",
}
DIRECT_DEPTHS = (1, 16)  # O_DIRECT requests in flight: one thread each


def direct_write(path: str, size: int, source: Any, depth: int) -> float | None:
    """Seconds to write ``size`` bytes with O_DIRECT, ``depth`` 8 MiB pwrites in flight (one
    thread each, the GIL released in the call), then fsync of the file and its directory;
    None where the filesystem refuses O_DIRECT (tmpfs). ``source``: an aligned 8 MiB buffer."""
    import concurrent.futures

    chunk = len(source)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_DIRECT", 0)
    if flags == os.O_WRONLY | os.O_CREAT | os.O_TRUNC:
        return None
    os.sync()
    t0 = time.perf_counter()
    try:
        fd = os.open(path, flags, 0o644)
    except OSError:
        return None
    try:

        def writer(first: int) -> None:
            for index in range(first, size // chunk, depth):
                offset, rest = index * chunk, memoryview(source)
                while rest:
                    done = os.pwrite(fd, rest, offset)
                    rest, offset = rest[done:], offset + done

        with concurrent.futures.ThreadPoolExecutor(depth) as pool:
            list(pool.map(writer, range(depth)))
        os.fsync(fd)
    except OSError:
        return None  # EINVAL: O_DIRECT accepted at open, refused at write
    finally:
        os.close(fd)
        fsync_path(os.path.dirname(path))
    seconds = time.perf_counter() - t0
    os.unlink(path)
    return seconds


def writeback_write(path: str, size: int, source: Any) -> float:
    """Seconds to write ``size`` bytes through the page cache as a waited local save does:
    8 MiB os.write calls, the writeback of each started at once (``sync_file_range``), then
    fsync of the file and its directory."""
    from streamckpt.storage.local_writer import start_writeback

    os.sync()
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        written = 0
        for _ in range(size // len(source)):
            rest = source
            while rest:
                rest = rest[os.write(fd, rest) :]
            start_writeback(fd, written, len(source))
            written += len(source)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_path(os.path.dirname(path))
    return time.perf_counter() - t0


def limits(spec: dict[str, Any]) -> dict[str, Any]:
    """Child: each limit ``repeats`` times over ``size`` bytes; seconds per run.

    Disk write: 8 MiB os.write calls, then fsync of the file and its directory (one untimed
    warm-up round first); the same with each write's writeback started (``writeback_write``).
    O_DIRECT write: 8 MiB pwrites from one page-aligned buffer, 1 and 16 in flight
    (``direct_write``). Cold read: the file evicted from the page cache, os.readv into one
    reused 8 MiB buffer (with ``cold``). memcpy into mapped memory: np.copyto between two
    pre-faulted buffers. Copy into fresh memory: ``ndarray.copy()`` of one contiguous block
    (allocation and page faults included). First touch: np.empty + fill. crc32c: the
    ``crc32c`` package over 8 MiB pieces.
    """
    import mmap

    import crc32c
    import numpy as np

    size, repeats, chunk = spec["size"], spec["repeats"], 8 * MIB
    view = np.random.default_rng(3).integers(0, 256, chunk, dtype=np.uint8).data
    aligned = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT needs
    aligned[:] = view
    out: dict[str, list[float]] = {name: [] for name in LIMIT_NAMES}
    path = os.path.join(spec["dir"], "limits.bin")
    for i in range(repeats + 1):
        os.sync()
        t0 = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for _ in range(size // chunk):
                rest = view
                while rest:
                    rest = rest[os.write(fd, rest) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_path(spec["dir"])
        if i:
            out["disk_write"].append(time.perf_counter() - t0)
        os.unlink(path)
        seconds = writeback_write(path, size, view)
        if i:
            out["writeback_write"].append(seconds)
        if spec.get("cold") and evict_from_page_cache(path):
            buffer = memoryview(bytearray(chunk))
            t0 = time.perf_counter()
            fd = os.open(path, os.O_RDONLY)
            try:
                while os.readv(fd, [buffer]):
                    pass
            finally:
                os.close(fd)
            if i:
                out["disk_read_cold"].append(time.perf_counter() - t0)
        os.unlink(path)
        for depth in DIRECT_DEPTHS if spec.get("direct", True) else ():
            seconds = direct_write(path, size, aligned, depth)
            if i and seconds is not None:
                out[f"direct_write_{depth}"].append(seconds)
    os.sync()
    for _ in range(repeats):
        t0 = time.perf_counter()
        fresh = np.empty(size, np.uint8)
        fresh.fill(1)
        out["first_touch"].append(time.perf_counter() - t0)
        del fresh  # freed outside the timed region
    src = np.full(size, 7, np.uint8)
    for _ in range(repeats):
        t0 = time.perf_counter()
        fresh = src.copy()
        out["copy_fresh"].append(time.perf_counter() - t0)
        del fresh
    dst = np.zeros(size, np.uint8)
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        out["memcpy"].append(time.perf_counter() - t0)
    del dst
    pieces = [src.data[start : start + chunk] for start in range(0, size, chunk)]

    def crc() -> None:
        value = 0
        for piece in pieces:
            value = crc32c.crc32c(piece, value)

    for _ in range(repeats):
        out["crc32c"].append(seconds_of(crc))
    return {"size": size, "seconds": {k: v for k, v in out.items() if v}}
