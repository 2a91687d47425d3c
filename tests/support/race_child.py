"""A save worker that test_racing_writers starts several of, to race saves of one prefix.

Reads one JSON command a line on stdin: ``{"prefix", "seed", "overwrite", "storage_options",
"start_at"}``; waits until ``start_at`` (``time.time()``), saves ``race_tensors(seed)`` at the
prefix, and answers one JSON line: ``{"outcome": "saved"}`` or the error's class and message.
A worker serves many trials, so the import and the clients' connections are paid once.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

# Imported first: it sets the gcsfs environment before anything imports gcsfs.
import streamckpt.testing.servers  # isort: skip
import anyio
import numpy as np

import streamckpt


def race_tensors(seed: int) -> dict[str, np.ndarray[Any, Any]]:
    """About 1 MiB in a few tensors; every seed's bytes differ from every other's."""
    rng = np.random.default_rng(seed)
    return {f"t{i}": rng.integers(0, 2**31, size=65_536 + 13 * i, dtype=np.int32) for i in range(4)}


async def serve() -> None:
    for line in sys.stdin:
        command = json.loads(line)
        tensors = race_tensors(command["seed"])
        await anyio.sleep(max(0.0, command["start_at"] - time.time()))
        try:
            await streamckpt.save(
                command["prefix"],
                tensors,
                num_shards=2,
                overwrite=command["overwrite"],
                storage_options=command["storage_options"] or None,
            )
            answer = {"outcome": "saved"}
        except Exception as exc:
            answer = {"outcome": type(exc).__name__, "message": str(exc)}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    anyio.run(serve)
