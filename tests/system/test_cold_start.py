"""What a fresh process imports: the modules behind a cold start (issue 15.1, issue 14.8).

Every module a process imports is paid for on each start, before the first byte is read. A
process that reads one local tensor needs numpy, crc32c, the format code and the blocking
local reader; not anyio and the event loop's pipeline, fsspec and its backends, protobuf,
ml_dtypes, cramjam (for snappy blocks alone), the high level or the save pipeline, nor the
standard library's slow imports (``dataclasses`` builds each class with ``exec``). These
tests run real subprocesses and pin the modules each step loads, so that an eager import that
slips back in fails here (its cost is measured by ``python -m benchmarks cold-start``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import streamckpt.api
import streamckpt.format.bundle
import streamckpt.pipeline.save
import streamckpt.sync

# Run in the child: the modules loaded at each step beyond those of a bare interpreter (so
# that whatever this environment's site hooks import does not count).
_PROBE = """
import json, sys
before = set(sys.modules)
def loaded():
    new = [n for n in sys.modules if n not in before and n != "__main__"]
    ours = sorted(n for n in new if n == "streamckpt" or n.startswith("streamckpt."))
    third = sorted({
        n.split(".")[0] for n in new
        if n.split(".")[0] not in sys.stdlib_module_names and not n.startswith("streamckpt")
    })
    return {"third_party": third, "streamckpt": ours}
steps = {}
import streamckpt
steps["import"] = loaded()
import streamckpt.sync
streamckpt.sync.read_tensor(sys.argv[1], "dense/kernel")
steps["read_tensor"] = loaded()
steps["read_slow_stdlib"] = sorted(set(sys.argv[2].split(",")) & set(sys.modules))
streamckpt.sync.list_tensors(sys.argv[1])
steps["list_tensors"] = loaded()
print(json.dumps(steps))
"""

# Never loaded by ``import streamckpt`` and a local read (their top-level names).
HEAVY_THIRD_PARTY = {
    "fsspec",
    "gcsfs",
    "s3fs",
    "google",
    "ml_dtypes",
    "aiohttp",
    "botocore",
    "anyio",
}
HEAVY_OURS = {
    "streamckpt.checkpoint",
    "streamckpt.manager",
    "streamckpt.objectgraph",
    "streamckpt.pipeline.save",
    "streamckpt.pipeline.bytewise",
    "streamckpt.distributed",
    "streamckpt.format.index_file",
    "streamckpt.format.table_write",
    "streamckpt.storage.fsspec_store",
    "streamckpt.proto",
    # the event loop's side: a whole local tensor is read with plain file reads
    "streamckpt.api",
    "streamckpt.bridge",
    "streamckpt.pipeline.read",
    "streamckpt.pipeline.read_index",
    "streamckpt.pipeline.read_ranges",
    "streamckpt.storage",
}

# Standard modules that numpy does not import and that cost a read's start real time:
# ``dataclasses`` (about 1.5 ms a class, hence ``format.record``), ``numpy.typing`` (whose
# aliases only annotations need), ``heapq`` (the save planner's), ``bisect`` (a shared
# library loaded with dlopen, 0.2-0.3 ms, for the index block's search of a few keys).
SLOW_STDLIB = {
    "asyncio",
    "bisect",
    "concurrent.futures",
    "dataclasses",
    "heapq",
    "importlib.metadata",
    "logging",
    "numpy.typing",
}

READ_THIRD_PARTY = ["crc32c", "numpy"]
READ_OURS = [
    "streamckpt",
    "streamckpt.errors",
    "streamckpt.fileio",
    "streamckpt.format",
    "streamckpt.format.block",
    "streamckpt.format.bundle",
    "streamckpt.format.crc",
    "streamckpt.format.dtypes",
    "streamckpt.format.entries",
    "streamckpt.format.payload",
    "streamckpt.format.record",
    "streamckpt.format.table",
    "streamckpt.format.varint",
    "streamckpt.pipeline",
    "streamckpt.pipeline.local_read",
    "streamckpt.pipeline.plan",
    "streamckpt.sync",
]


@pytest.fixture(scope="module")
def steps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, list[str]]]:
    prefix = str(tmp_path_factory.mktemp("cold") / "ckpt")
    streamckpt.sync.save(prefix, {"dense/kernel": np.arange(12, dtype=np.float32)})
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(Path(streamckpt.__file__).parent.parent)
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, prefix, ",".join(sorted(SLOW_STDLIB))],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    result: dict[str, dict[str, list[str]]] = json.loads(done.stdout)
    return result


def _heavy(step: dict[str, list[str]]) -> list[str]:
    ours = [
        m for m in step["streamckpt"] if any(m == h or m.startswith(h + ".") for h in HEAVY_OURS)
    ]
    return sorted(set(step["third_party"]) & HEAVY_THIRD_PARTY) + ours


def test_import_streamckpt_loads_only_the_errors(steps: dict[str, Any]) -> None:
    assert steps["import"] == {"third_party": [], "streamckpt": ["streamckpt", "streamckpt.errors"]}


def test_a_local_read_loads_no_heavy_module(steps: dict[str, Any]) -> None:
    assert _heavy(steps["read_tensor"]) == []


def test_a_local_read_loads_no_slow_standard_module(steps: dict[str, Any]) -> None:
    assert steps["read_slow_stdlib"] == []


def test_a_local_read_loads_exactly_the_read_path(steps: dict[str, Any]) -> None:
    """Pinned whole: a new module on this path is a choice to make here, with its cost."""
    assert steps["read_tensor"] == {"third_party": READ_THIRD_PARTY, "streamckpt": READ_OURS}


# What a listing adds to a read: every entry decoded in bulk, the description of each tensor
# and the grouping of pieces.
LIST_ADDS = [
    "streamckpt.format.index_file",
    "streamckpt.format.partitioned",
    "streamckpt.format.slices",
    "streamckpt.pipeline.info",
]


def test_a_local_listing_loads_only_what_describes_tensors(steps: dict[str, Any]) -> None:
    """``streamckpt.sync.list_tensors`` (and so ``streamckpt ls PREFIX``) of a local
    checkpoint needs, beyond the read's modules, only those that describe tensors."""
    listed, read = steps["list_tensors"], steps["read_tensor"]
    assert listed["third_party"] == read["third_party"]
    assert listed["streamckpt"] == sorted(read["streamckpt"] + LIST_ADDS)


def test_the_api_default_chunk_is_the_save_pipelines() -> None:
    """api keeps its own copy so that a reader never imports the save pipeline."""
    assert streamckpt.api.DEFAULT_CHUNK_BYTES == streamckpt.pipeline.save.DEFAULT_CHUNK_BYTES


@pytest.mark.parametrize(
    "header",
    [
        streamckpt.format.bundle.BundleHeader(num_shards=1),
        streamckpt.format.bundle.BundleHeader(num_shards=7, big_endian=True, producer=3),
        streamckpt.format.bundle.BundleHeader(num_shards=0, producer=0, min_consumer=1),
        streamckpt.format.bundle.BundleHeader(num_shards=2, bad_consumers=(5, 9)),
    ],
)
def test_headers_decode_as_protobuf_decodes_them(
    header: streamckpt.format.bundle.BundleHeader,
) -> None:
    """The hand-written header walk (no protobuf import) and protobuf agree."""
    assert streamckpt.format.bundle.decode_header(header.encode()) == header


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (bytes.fromhex("08ffffffffffffffffff01"), "shards"),  # num_shards -1
        (bytes.fromhex("1002"), "endianness"),
        (bytes.fromhex("1a021002"), "reader version"),  # min_consumer 2
        (bytes.fromhex("1a021801"), "refuses"),  # bad_consumers [1]
        (bytes.fromhex("1a05"), "bad bundle header"),  # version runs past the end
    ],
)
def test_odd_headers_are_judged_as_before(raw: bytes, problem: str) -> None:
    with pytest.raises(streamckpt.StreamCkptError, match=problem):
        streamckpt.format.bundle.decode_header(raw)
