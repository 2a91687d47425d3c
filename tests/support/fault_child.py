"""A save that test_faults kills with SIGKILL part-way through its upload.

Usage: ``python fault_child.py URL STORAGE_OPTIONS_JSON SHARD_BYTES``. It saves two shards of
``SHARD_BYTES`` random bytes each at URL (through the parent's slow fault proxy), then prints
"saved". The parent kills it long before that; the exit status tells the parent it did.
"""

from __future__ import annotations

import json
import sys

import anyio
import numpy as np

import streamckpt


def main(argv: list[str]) -> None:
    url, options_json, shard_bytes = argv[1], argv[2], int(argv[3])
    storage_options = json.loads(options_json)
    rng = np.random.default_rng(2)
    tensors = {f"big/{i}": rng.integers(0, 256, size=shard_bytes, dtype=np.uint8) for i in range(2)}

    async def save() -> None:
        await streamckpt.save(url, tensors, num_shards=2, storage_options=storage_options)

    anyio.run(save)
    print("saved", flush=True)


if __name__ == "__main__":
    main(sys.argv)
