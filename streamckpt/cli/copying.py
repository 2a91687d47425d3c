"""``cp`` and ``demo``.

Rules:

- a destination is checked before the first byte is read (``_where.check_url``), and
  ``memory://`` is refused as one: it would vanish with the process;
- ``cp`` streams stored bytes (``streamckpt.copy_checkpoint``): at most ``--budget-mib`` is
  held whatever the checkpoint's size, every crc32c is checked on the way, and the index
  is written last, so a failed copy leaves nothing readable at the destination.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from typing import Any

import anyio
import numpy as np

import streamckpt
from streamckpt.cli._output import Output, human
from streamckpt.cli._where import check_url, writing_to
from streamckpt.cli.inspecting import prefix_arg

MiB = 1 << 20


def cmd_cp(args: argparse.Namespace, out: Output) -> int:
    src, dst = prefix_arg(args.src), prefix_arg(args.dst)
    check_url(src)
    check_url(dst, writing=True)

    async def copy() -> tuple[streamckpt.SaveInfo, int]:
        async with streamckpt.open(src) as reader:
            total = sum(e.size for e in reader.entries.values())
        with out.progress("copying", total) as advance, writing_to(dst):
            info = await streamckpt.copy_checkpoint(
                src,
                dst,
                num_shards=args.shards,
                overwrite=args.overwrite,
                budget_bytes=args.budget_mib * MiB,
                progress=advance,
            )
        return info, total

    started = time.perf_counter()
    info, total = anyio.run(copy)
    seconds = time.perf_counter() - started
    out.document(
        {
            "src": src,
            "dst": info.prefix,
            "tensors": info.num_tensors,
            "bytes": info.bytes_written,
            "shards": info.num_shards,
            "files": list(info.files),
            "seconds": seconds,
        }
    )
    out.line(
        f"copied {info.num_tensors} tensors ({human(total)}) to {info.prefix} as "
        f"{info.num_shards} shard(s) in {seconds:.2f} s"
    )
    return 0


def sample_model(total_mib: int, seed: int = 0) -> dict[str, Any]:
    """A transformer-ish set of float32 weights adding up to about ``total_mib`` MiB."""
    rng = np.random.default_rng(seed)
    width = 1024
    tensors: dict[str, Any] = {}
    vocab = max(1, (total_mib * MiB // 4) // (4 * width))  # the embedding takes ~1/4
    tensors["embedding/table"] = rng.standard_normal((vocab, width), dtype=np.float32)
    remaining = total_mib * MiB - tensors["embedding/table"].nbytes
    layer = 0
    per_layer = 2 * width * 4 * width * 4 + 2 * width * 4  # two dense kernels + two norms
    while remaining >= per_layer:
        prefix = f"layers/{layer:02d}"
        tensors[f"{prefix}/mlp/up/kernel"] = rng.standard_normal(
            (width, 4 * width), dtype=np.float32
        )
        tensors[f"{prefix}/mlp/down/kernel"] = rng.standard_normal(
            (4 * width, width), dtype=np.float32
        )
        tensors[f"{prefix}/norm/scale"] = np.ones(width, dtype=np.float32)
        tensors[f"{prefix}/norm/bias"] = np.zeros(width, dtype=np.float32)
        remaining -= per_layer
        layer += 1
    if remaining >= 4 * width:  # an output head takes what is left
        rows = remaining // (4 * width)
        tensors["head/kernel"] = rng.standard_normal((rows, width), dtype=np.float32)
    tensors["step"] = np.int64(1000)
    tensors["model_name"] = b"streamckpt-demo"
    return tensors


def cmd_demo(args: argparse.Namespace, out: Output) -> int:
    directory = args.dir or tempfile.mkdtemp(prefix="streamckpt-demo-")
    check_url(directory, writing=True)
    os.makedirs(directory, exist_ok=True)
    prefix = os.path.join(directory, "ckpt-1000")
    out.line(f"building a sample model of about {args.size_mib} MiB ...")
    model = sample_model(args.size_mib)
    total = sum(np.asarray(v).nbytes for v in model.values() if not isinstance(v, bytes))
    out.line(f"  {len(model)} tensors, {human(total)}")
    report: dict[str, Any] = {"prefix": prefix, "tensors": len(model), "bytes": total}

    async def run() -> int:
        with out.progress("saving", total) as advance:
            info = await streamckpt.save(
                prefix, model, num_shards=args.shards, overwrite=True, progress=advance
            )
        report.update(save_seconds=info.seconds, shards=info.num_shards, files=list(info.files))
        out.line(
            f"saved {info.num_tensors} tensors as {info.num_shards} shards to {prefix} in "
            f"{info.seconds:.2f} s ({total / info.seconds / 1e9:.2f} GB/s, fsync'd)"
        )
        for path in info.files:
            out.line(f"  {path}  {human((await anyio.Path(path).stat()).st_size)}")

        started = time.perf_counter()
        with out.progress("loading", total) as advance:
            restored = await streamckpt.load(prefix, progress=advance)
        seconds = time.perf_counter() - started
        for name, value in model.items():
            same = (
                restored[name].item() == value
                if isinstance(value, bytes)
                else np.array_equal(restored[name], value)
            )
            if not same:
                out.note(f"MISMATCH in {name}")
                return 1
        report["load_seconds"] = seconds
        out.line(
            f"loaded all {len(restored)} tensors back in {seconds:.2f} s "
            f"({total / seconds / 1e9:.2f} GB/s), every crc32c verified, values identical"
        )
        started = time.perf_counter()
        rows = await streamckpt.read_tensor(prefix, "embedding/table", index=np.s_[100:164])
        seconds = time.perf_counter() - started
        report["ranged_read_ms"] = seconds * 1000
        out.line(
            f"read rows 100:164 of embedding/table {rows.shape} with one ranged read: "
            f"{human(rows.nbytes)} in {seconds * 1000:.1f} ms"
        )
        return 0

    code = anyio.run(run)
    if not args.keep and args.dir is None:
        shutil.rmtree(directory, ignore_errors=True)
        out.line(f"removed {directory} (use --keep or --dir to keep it)")
        report["removed"] = True
    out.document(report)
    return code
