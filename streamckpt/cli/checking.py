"""``verify`` and ``diff``: every tensor read, under a byte budget, however large.

Rules:

- at most about ``--budget-mib`` of tensor data is held at once, whatever the size of the
  checkpoint or of its largest tensor;
- ``verify`` checks stored bytes (``streamckpt.verify_checkpoint``): every crc32c, a large
  tensor's extended chunk by chunk, and every failure (name, shard, offset) reported before
  it exits 1;
- ``diff`` reads tensors in batches of whole tensors (each verified by its crc32c); a tensor
  larger than half the budget is read and compared block by block, boxes of rows (not
  verified: a crc32c covers a whole tensor; ``verify`` checks it); values are compared in
  chunks of elements, so the scratch memory of a comparison is bounded too.
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import anyio
import anyio.to_thread
import numpy as np

import streamckpt
from streamckpt.cli._output import DIFFERENT, Output, human
from streamckpt.cli._where import check_url
from streamckpt.cli.inspecting import prefix_arg

MiB = 1 << 20
_CHUNK_ELEMENTS = 1 << 18


def batches(
    infos: Iterable[streamckpt.TensorInfo], budget_bytes: int
) -> list[list[streamckpt.TensorInfo]]:
    """Tensors in file order, grouped so that each group's bytes fit the budget."""
    groups: list[list[streamckpt.TensorInfo]] = []
    current: list[streamckpt.TensorInfo] = []
    held = 0
    for info in sorted(infos, key=lambda e: (e.shard, e.offset, e.name)):
        size = max(info.size, info.nbytes)
        if current and held + size > budget_bytes:
            groups.append(current)
            current, held = [], 0
        current.append(info)
        held += size
    if current:
        groups.append(current)
    return groups


def blocks(shape: tuple[int, ...], itemsize: int, limit: int) -> Iterator[tuple[Any, ...]]:
    """Basic indexes of contiguous boxes tiling ``shape`` in C order, each of <= ``limit`` bytes.

    Whole rows of the first axis where they fit; where a single row does not, one index of
    the outer axes at a time and a run of the next axis, down to single elements.
    """
    inner = itemsize
    axis = len(shape)
    while axis > 0 and inner * shape[axis - 1] <= limit:
        axis -= 1
        inner *= shape[axis]
    if axis == 0:
        yield ()
        return
    step = max(1, limit // inner)  # of axis - 1, each ``inner`` bytes
    for outer in itertools.product(*(range(n) for n in shape[: axis - 1])):
        for start in range(0, shape[axis - 1], step):
            yield (*outer, slice(start, min(start + step, shape[axis - 1])))


@dataclass(frozen=True, slots=True)
class Failure:
    """One tensor that did not verify, and where."""

    name: str
    shard: int
    offset: int
    error: str
    message: str


def cmd_verify(args: argparse.Namespace, out: Output) -> int:
    prefix = prefix_arg(args.prefix)
    check_url(prefix)
    budget = args.budget_mib * MiB

    async def total_bytes() -> int:
        async with streamckpt.open(prefix) as reader:
            return sum(e.size for e in reader.entries.values())

    started = time.perf_counter()
    total = anyio.run(total_bytes)
    with out.progress("verifying", total) as advance:
        count, failures = anyio.run(_verify, prefix, budget, advance)
    seconds = time.perf_counter() - started
    out.document(
        {
            "prefix": prefix,
            "ok": not failures,
            "tensors": count,
            "bytes": total,
            "seconds": seconds,
            "failures": [asdict(f) for f in failures],
        }
    )
    for failure in failures:
        out.line(
            f"FAIL {failure.name}  shard={failure.shard} offset={failure.offset}: "
            f"{failure.message} [{failure.error}]"
        )
    if failures:
        out.line(f"FAILED {len(failures)} of {count} tensors in {prefix}")
        out.note(f"{len(failures)} of {count} tensors failed verification")
        return DIFFERENT
    out.line(f"OK {count} tensors, {human(total)} verified in {seconds:.2f} s")
    return 0


async def _verify(
    prefix: str, budget: int, advance: Callable[[int], None]
) -> tuple[int, list[Failure]]:
    async with streamckpt.open(prefix) as reader:
        infos = reader.entries
    errors = await streamckpt.verify_checkpoint(prefix, budget_bytes=budget, progress=advance)
    failures = []
    for name, exc in errors.items():
        info = infos.get(name)
        failures.append(
            Failure(
                name=name,
                shard=exc.shard if exc.shard is not None else (info.shard if info else -1),
                offset=exc.offset if exc.offset is not None else (info.offset if info else -1),
                error=type(exc).__name__,
                message=exc.message,
            )
        )
    return len(infos), failures


@dataclass(frozen=True, slots=True)
class Difference:
    """How two values of one tensor differ (for equal tensors: ``differing == 0``)."""

    differing: int
    elements: int
    max_abs: float | None  # None for strings
    max_rel: float | None


def merged(first: Difference, second: Difference) -> Difference:
    """The difference of two tensors from those of two blocks of them."""

    def larger(x: float | None, y: float | None) -> float | None:
        return None if x is None or y is None else max(x, y)

    return Difference(
        first.differing + second.differing,
        first.elements + second.elements,
        larger(first.max_abs, second.max_abs),
        larger(first.max_rel, second.max_rel),
    )


def compare(
    a: np.ndarray[Any, Any], b: np.ndarray[Any, Any], atol: float, rtol: float
) -> Difference:
    """Element counts and extremes of ``|a - b|``, chunk by chunk; NaN equals NaN."""
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    numeric = a.dtype != object and b.dtype != object
    differing, max_abs, max_rel = 0, 0.0, 0.0
    for start in range(0, flat_a.size, _CHUNK_ELEMENTS):
        part_a = flat_a[start : start + _CHUNK_ELEMENTS]
        part_b = flat_b[start : start + _CHUNK_ELEMENTS]
        if not numeric:
            differing += int(np.count_nonzero(part_a != part_b))
            continue
        kind = "c" if a.dtype.kind == "c" else "f"
        x = part_a.astype(np.complex128 if kind == "c" else np.float64)
        y = part_b.astype(np.complex128 if kind == "c" else np.float64)
        nan_pair = np.isnan(x) | np.isnan(y)
        same = (x == y) | (np.isnan(x) & np.isnan(y))
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            delta = np.where(same | nan_pair, 0.0, np.abs(x - y))
            scale = np.where(nan_pair, 0.0, np.abs(y))
            rel = np.where(delta == 0, 0.0, np.where(scale > 0, delta / scale, np.inf))
            # a NaN against a number always differs; its distance is left out of the maxima
            bad = ~same & (nan_pair | ~(delta <= atol + rtol * scale))
        if atol == 0 and rtol == 0 and a.dtype.kind in "iub":  # exact, beyond float64's 2**53
            bad = part_a != part_b
        differing += int(np.count_nonzero(bad))
        if delta.size:
            max_abs = max(max_abs, float(delta.max()))
            max_rel = max(max_rel, float(rel.max()))
    return Difference(
        differing,
        int(flat_a.size),
        max_abs if numeric else None,
        max_rel if numeric else None,
    )


def cmd_diff(args: argparse.Namespace, out: Output) -> int:
    a, b = prefix_arg(args.a), prefix_arg(args.b)
    check_url(a)
    check_url(b)

    async def sizes() -> int:
        async with streamckpt.open(a) as ra, streamckpt.open(b) as rb:
            return sum(e.size for e in ra.entries.values()) + sum(
                e.size for e in rb.entries.values()
            )

    total = anyio.run(sizes)
    with out.progress("comparing", total) as advance:
        rows, equal = anyio.run(_diff, a, b, args, advance)
    out.document(
        {
            "a": a,
            "b": b,
            "atol": args.atol,
            "rtol": args.rtol,
            "equal_tensors": equal,
            "differences": len(rows),
            "tensors": rows,
        }
    )
    for row in rows:
        if row["status"] == "only in a":
            out.line(f"- {row['name']}")
        elif row["status"] == "only in b":
            out.line(f"+ {row['name']}")
        elif row["status"] == "changed type":
            out.line(f"~ {row['name']}: {row['a']} -> {row['b']}")
        else:
            numbers = (
                f"max_abs={row['max_abs']:.6g} max_rel={row['max_rel']:.6g} "
                if row["max_abs"] is not None
                else ""
            )
            out.line(f"~ {row['name']}: {numbers}differing={row['differing']}/{row['elements']}")
    out.line(f"{len(rows)} difference(s), {equal} tensor(s) equal")
    return DIFFERENT if rows else 0


def _spelling(info: streamckpt.TensorInfo) -> str:
    return f"{info.tf_dtype.name}{list(info.shape)}"


async def _diff(
    a: str, b: str, args: argparse.Namespace, advance: Callable[[int], None]
) -> tuple[list[dict[str, Any]], int]:
    rows: list[dict[str, Any]] = []
    equal = 0
    async with (
        streamckpt.open(a, progress=advance) as ra,
        streamckpt.open(b, progress=advance) as rb,
    ):
        common: list[streamckpt.TensorInfo] = []
        for name in sorted(set(ra.entries) | set(rb.entries)):
            info_a, info_b = ra.entries.get(name), rb.entries.get(name)
            if info_a is None or info_b is None:
                rows.append(
                    {"name": name, "status": "only in b" if info_a is None else "only in a"}
                )
            elif info_a.tf_dtype != info_b.tf_dtype or info_a.shape != info_b.shape:
                rows.append(
                    {
                        "name": name,
                        "status": "changed type",
                        "a": _spelling(info_a),
                        "b": _spelling(info_b),
                    }
                )
            else:
                common.append(info_a)
        half = max(1, args.budget_mib * MiB // 2)  # per checkpoint
        large = [i for i in common if i.nbytes > half and i.dtype != object]
        small = [i for i in common if not (i.nbytes > half and i.dtype != object)]
        for group in batches(small, half):
            names = [info.name for info in group]
            values_a = await ra.read_many(names)
            values_b = await rb.read_many(names)
            for name in names:
                found = await anyio.to_thread.run_sync(
                    compare, values_a.pop(name), values_b.pop(name), args.atol, args.rtol
                )
                if found.differing:
                    rows.append({"name": name, "status": "different", **asdict(found)})
                else:
                    equal += 1
        for info in large:
            total = Difference(0, 0, 0.0, 0.0)
            # a block read holds its bytes and their copy for a moment: quarters, not halves
            for index in blocks(info.shape, info.dtype.itemsize, max(1, half // 2)):
                block_a = await ra.read(info.name, index=index)
                block_b = await rb.read(info.name, index=index)
                found = await anyio.to_thread.run_sync(
                    compare, block_a, block_b, args.atol, args.rtol
                )
                del block_a, block_b
                total = merged(total, found)
            if total.differing:
                rows.append({"name": info.name, "status": "different", **asdict(total)})
            else:
                equal += 1
    rows.sort(key=lambda row: row["name"])
    return rows, equal
