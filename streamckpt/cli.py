"""The ``streamckpt`` command: demo, ls, inspect, cat, verify, diff, cp.

Every subcommand takes checkpoint prefixes as local paths or fsspec URLs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from streamckpt import sync
from streamckpt.errors import StreamCkptError

MiB = 1 << 20


def _human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    return f"{nbytes:.1f} GiB"


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


def cmd_demo(args: argparse.Namespace) -> int:
    directory = args.dir or tempfile.mkdtemp(prefix="streamckpt-demo-")
    os.makedirs(directory, exist_ok=True)
    prefix = os.path.join(directory, "ckpt-1000")
    print(f"building a sample model of about {args.size_mib} MiB ...")
    model = sample_model(args.size_mib)
    total = sum(np.asarray(v).nbytes for v in model.values() if not isinstance(v, bytes))
    print(f"  {len(model)} tensors, {_human(total)}")

    info = sync.save(prefix, model, num_shards=args.shards, overwrite=True)
    print(
        f"saved {info.num_tensors} tensors as {info.num_shards} shards to {prefix} in "
        f"{info.seconds:.2f} s ({total / info.seconds / 1e9:.2f} GB/s, fsync'd)"
    )
    for path in info.files:
        print(f"  {path}  {_human(os.path.getsize(path))}")

    t0 = time.perf_counter()
    restored = sync.load(prefix)
    seconds = time.perf_counter() - t0
    for name, value in model.items():
        same = (
            restored[name].item() == value
            if isinstance(value, bytes)
            else np.array_equal(restored[name], value)
        )
        if not same:
            print(f"MISMATCH in {name}", file=sys.stderr)
            return 1
    print(
        f"loaded all {len(restored)} tensors back in {seconds:.2f} s "
        f"({total / seconds / 1e9:.2f} GB/s), every crc32c verified, values identical"
    )

    t0 = time.perf_counter()
    rows = sync.read_tensor(prefix, "embedding/table", index=np.s_[100:164])
    seconds = time.perf_counter() - t0
    assert np.array_equal(rows, model["embedding/table"][100:164])
    print(
        f"read rows 100:164 of embedding/table {rows.shape} with one ranged read: "
        f"{_human(rows.nbytes)} in {seconds * 1000:.1f} ms"
    )
    if not args.keep and args.dir is None:
        for path in info.files:
            os.unlink(path)
        os.rmdir(directory)
        print(f"removed {directory} (use --keep or --dir to keep it)")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    with sync.open(args.prefix) as ckpt:
        for name, entry in sorted(ckpt.entries.items()):
            kind = " partitioned" if entry.slices else ""
            print(
                f"{name}\t{entry.tf_dtype.name}\t{list(entry.shape)}\tshard={entry.shard}\t"
                f"{_human(entry.size)}{kind}"
            )
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    with sync.open(args.prefix) as ckpt:
        header = ckpt.header
        per_shard: dict[int, int] = {}
        for entry in ckpt.entries.values():
            per_shard[entry.shard] = per_shard.get(entry.shard, 0) + entry.size
        report = {
            "uri": ckpt.uri,
            "num_shards": header.num_shards,
            "endianness": "big" if header.big_endian else "little",
            "version": {"producer": header.producer, "min_consumer": header.min_consumer},
            "num_tensors": len(ckpt.entries),
            "tensor_bytes": sum(per_shard.values()),
            "bytes_per_shard": {str(k): v for k, v in sorted(per_shard.items())},
        }
    print(json.dumps(report, indent=2))
    return 0


def _parse_index(text: str | None) -> Any:
    if not text:
        return None
    parts: list[Any] = []
    for item in text.split(","):
        item = item.strip()
        if item == "...":
            parts.append(Ellipsis)
        elif ":" in item:
            bounds = [int(x) if x else None for x in item.split(":")]
            parts.append(slice(*bounds))
        else:
            parts.append(int(item))
    return tuple(parts)


def cmd_cat(args: argparse.Namespace) -> int:
    value = sync.read_tensor(args.prefix, args.name, index=_parse_index(args.index))
    with np.printoptions(threshold=args.max_items, edgeitems=3):
        print(value)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    with sync.open(args.prefix) as ckpt:
        names = list(ckpt.entries)
        values = ckpt.read_many(names)
    nbytes = sum(v.nbytes for v in values.values())
    print(f"OK {len(names)} tensors, {_human(nbytes)} verified in {time.perf_counter() - t0:.2f} s")
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    a = sync.load(args.a)
    b = sync.load(args.b)
    differences = 0
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            print(f"{'-' if name in a else '+'} {name}")
            differences += 1
        elif a[name].shape != b[name].shape or a[name].dtype != b[name].dtype:
            print(
                f"~ {name}: {a[name].dtype}{list(a[name].shape)} -> "
                f"{b[name].dtype}{list(b[name].shape)}"
            )
            differences += 1
        elif not np.array_equal(a[name], b[name], equal_nan=a[name].dtype.kind in "fc"):
            print(f"~ {name}: values differ")
            differences += 1
    print(f"{differences} difference(s)")
    return 1 if differences else 0


def cmd_cp(args: argparse.Namespace) -> int:
    values = sync.load(args.src)
    info = sync.save(args.dst, values, num_shards=args.shards, overwrite=args.overwrite)
    print(f"copied {info.num_tensors} tensors to {info.prefix} in {info.seconds:.2f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamckpt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="save a sample model, load it back, read one tensor")
    demo.add_argument("--dir", help="directory to write to (default: a temporary one)")
    demo.add_argument("--size-mib", type=int, default=256)
    demo.add_argument("--shards", type=int, default=4)
    demo.add_argument("--keep", action="store_true", help="keep the files written")
    demo.set_defaults(fn=cmd_demo)

    for name, fn, text in (
        ("ls", cmd_ls, "list tensors"),
        ("inspect", cmd_inspect, "header and sizes as JSON"),
        ("verify", cmd_verify, "read every tensor and check its crc32c"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("prefix")
        p.set_defaults(fn=fn)

    cat = sub.add_parser("cat", help="print one tensor (or part of it)")
    cat.add_argument("prefix")
    cat.add_argument("name")
    cat.add_argument("--index", help='numpy-style index, e.g. "0:10,...,3"')
    cat.add_argument("--max-items", type=int, default=1000)
    cat.set_defaults(fn=cmd_cat)

    diff = sub.add_parser("diff", help="compare two checkpoints tensor by tensor")
    diff.add_argument("a")
    diff.add_argument("b")
    diff.set_defaults(fn=cmd_diff)

    cp = sub.add_parser("cp", help="copy a checkpoint, e.g. from local disk to gs://")
    cp.add_argument("src")
    cp.add_argument("dst")
    cp.add_argument(
        "--shards",
        type=int,
        default=None,
        help="shards to write (default: about 64 MiB each on S3 and GCS, one elsewhere)",
    )
    cp.add_argument("--overwrite", action="store_true")
    cp.set_defaults(fn=cmd_cp)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.fn(args)
    except StreamCkptError as exc:
        print(f"streamckpt: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
