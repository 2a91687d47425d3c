"""GCS shards go up as parts sent at once and composed, against the real fake-gcs-server.

Small parts make the compose tree two levels deep (more than 32 parts) with little data.
"""

from __future__ import annotations

import os
from typing import Any

import anyio.to_thread
import crc32c
import pytest
from support import BUCKET, Servers

from streamckpt.errors import ChecksumError
from streamckpt.storage.base import ShardWriter
from streamckpt.storage.fsspec_store import FsspecStore
from streamckpt.storage.gcs_upload import MAX_COMPOSE_SOURCES

pytestmark = pytest.mark.anyio
KiB = 1 << 10
PART = 256 * KiB


@pytest.fixture
def gcs(servers: Servers) -> Any:
    server = servers.get("gcs")
    fs = server.filesystem()
    root = f"{BUCKET}/compose-{os.urandom(6).hex()}"
    yield fs, root
    fs.invalidate_cache()
    if fs.exists(root):
        fs.rm(root, recursive=True)


def streamer(data: bytes, chunk: int = 100 * KiB) -> Any:
    def stream(writer: ShardWriter) -> int:
        for start in range(0, len(data), chunk):
            writer.write(memoryview(data)[start : start + chunk])
        return len(data)

    return stream


def listed(fs: Any, root: str) -> list[str]:
    fs.invalidate_cache()
    return (
        sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)) if fs.exists(root) else []
    )


@pytest.mark.parametrize("parts", [1, 3, 2 * MAX_COMPOSE_SOURCES + 5])
async def test_composed_shard_holds_exactly_the_bytes_and_leaves_no_parts(
    gcs: Any, parts: int
) -> None:
    fs, root = gcs
    store = FsspecStore(fs, write_block_size=PART, max_inflight_bytes=16 * PART)
    assert store.write_block_size == PART
    store.plan_writers([parts * PART])
    data = os.urandom(parts * PART - 1234) if parts > 1 else os.urandom(1000)
    path = f"{root}/ckpt.data-00000-of-00001"
    await anyio.to_thread.run_sync(store.write_object, path, streamer(data))
    await store.drain()  # the temporary parts' deletes, left running by the commit
    sent = store.stats.requests
    # GCS's crc, as the store has the object now (a save checks right before its commit)
    await store.verify_upload(path, size=len(data), crc32c=crc32c.crc32c(data))
    assert store.stats.requests == sent + 1
    sent += 1
    fs.invalidate_cache()
    assert fs.cat_file(path) == data
    assert listed(fs, root) == ["ckpt.data-00000-of-00001"]
    if parts == 1:
        assert store.stats.requests == 1 + 1  # one simple upload, nothing composed; the check
    else:
        composes = 1 + (-(-parts // MAX_COMPOSE_SOURCES) if parts > MAX_COMPOSE_SOURCES else 0)
        deletes = parts + composes - 1  # every temporary object: parts and inner composes
        assert store.stats.requests == parts + composes + deletes + 1  # and the check


async def test_wrong_crc_of_a_composed_shard_is_caught(gcs: Any) -> None:
    fs, root = gcs
    store = FsspecStore(fs, write_block_size=PART, max_inflight_bytes=16 * PART)
    store.plan_writers([3 * PART])
    data = os.urandom(3 * PART)
    path = f"{root}/s.data-00000-of-00001"
    await anyio.to_thread.run_sync(store.write_object, path, streamer(data))
    with pytest.raises(ChecksumError, match="crc32c"):
        await store.verify_upload(path, size=len(data), crc32c=crc32c.crc32c(data) ^ 1)
    with pytest.raises(ChecksumError, match="crc32c"):  # the same, read back from the store
        await store.verify_upload(path, size=len(data), crc32c=crc32c.crc32c(data) ^ 1)
    await store.drain()


async def test_failed_stream_removes_its_parts(gcs: Any) -> None:
    fs, root = gcs
    store = FsspecStore(fs, write_block_size=PART, max_inflight_bytes=16 * PART)
    store.plan_writers([8 * PART])
    data = os.urandom(8 * PART)

    def stream(writer: ShardWriter) -> int:
        streamer(data[: 5 * PART])(writer)  # five parts sent, then the caller fails
        raise ValueError("the caller failed mid-shard")

    path = f"{root}/f.data-00000-of-00001"
    with pytest.raises(ValueError, match="mid-shard"):
        await anyio.to_thread.run_sync(store.write_object, path, stream)
    assert listed(fs, root) == []
