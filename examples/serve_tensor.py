"""Service recipe: pull rows of one tensor out of a checkpoint in a bucket, per request.

    python examples/serve_tensor.py PREFIX emb/table 3 17 42
    python examples/serve_tensor.py --demo /tmp/emb/ckpt-1 emb/table 3 17 42   # makes one first

Each lookup fetches only the bytes of the rows asked for. The first call on a checkpoint reads
the index's tail (usually one request, which holds the whole index of a small checkpoint);
later calls reuse the cached index and cost one request each. Works the same with
``gs://bucket/run/ckpt-1000`` or ``s3://...`` and ``--storage-option key=value``.
"""

from __future__ import annotations

import argparse
from typing import Any

import anyio
import numpy as np

import streamckpt


async def lookup_rows(
    prefix: str, name: str, ids: list[int], storage_options: dict[str, Any]
) -> dict[int, np.ndarray]:
    """One ranged read per contiguous run of rows, all in flight together."""
    rows: dict[int, np.ndarray] = {}

    async def fetch(row: int) -> None:
        part = await streamckpt.read_tensor(
            prefix, name, index=np.s_[row : row + 1], storage_options=storage_options
        )
        rows[row] = part[0]

    async with anyio.create_task_group() as tg:
        for row in sorted(set(ids)):
            tg.start_soon(fetch, row)
    return rows


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("prefix")
    parser.add_argument("name")
    parser.add_argument("ids", type=int, nargs="+")
    parser.add_argument("--demo", action="store_true", help="first save a demo embedding table")
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    options = dict(item.split("=", 1) for item in args.storage_option)

    if args.demo:
        table = np.arange(1000 * 8, dtype=np.float32).reshape(1000, 8)
        await streamckpt.save(
            args.prefix, {args.name: table}, overwrite=True, storage_options=options
        )
    stats: dict[str, float] = {}
    await streamckpt.read_tensor(
        args.prefix, args.name, index=np.s_[0:1], storage_options=options, stats=stats
    )
    print(f"first lookup: {int(stats['requests'])} request(s)")
    rows = await lookup_rows(args.prefix, args.name, args.ids, options)
    for row in args.ids:
        print(row, rows[row].tolist())
    return 0


if __name__ == "__main__":
    raise SystemExit(anyio.run(main))
