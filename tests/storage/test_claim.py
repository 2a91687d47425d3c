"""The guards of a save's storage: its prefix claim, its check before the commit, symlinks.

- A live claim makes a second save fail fast, naming the holder, and touching nothing.
- A crashed save's claim never blocks for ever: on local disk its lock died with it; on an
  object store its lease runs out, and the next save breaks it and reclaims what the crashed
  save left (staged shards, temporary parts, shards no index points to).
- A save whose shards vanished before its commit (a server restarted) fails, with no index.
- A save cancelled mid-upload leaves no multipart upload open.
- A shard name planted as a symlink is refused; nothing is written through it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import numpy as np
import pytest
from support import BUCKET, StoreUnderTest

import streamckpt
from streamckpt.errors import CheckpointNotFoundError, SaveInProgressError, StorageError
from streamckpt.storage import LocalStore, resolve
from streamckpt.storage.claim import claim_filename

pytestmark = pytest.mark.anyio


def tensors(seed: int, *, elements: int = 50_000) -> dict[str, np.ndarray[Any, Any]]:
    rng = np.random.default_rng(seed)
    return {f"t{i}": rng.integers(0, 2**31, size=elements + i, dtype=np.int32) for i in range(4)}


async def assert_exact(prefix: str, expected: dict[str, Any], **kwargs: Any) -> None:
    loaded = await streamckpt.load(prefix, **kwargs)
    assert sorted(loaded) == sorted(expected)
    assert all(loaded[n].tobytes() == v.tobytes() for n, v in expected.items())


def names(store: StoreUnderTest, directory: str) -> list[str]:
    fs = store.filesystem()
    fs.invalidate_cache()
    if not fs.exists(store.strip(directory)):
        return []
    return sorted(
        p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(store.strip(directory), detail=False)
    )


async def test_a_live_claim_refuses_a_second_save(store: StoreUnderTest) -> None:
    prefix = store.prefix("ckpt")
    options = store.storage_options or None
    target, path = resolve(prefix, storage_options=options)
    await target.make_dirs(target.dirname(path))
    claim = await target.claim(claim_filename(path))  # as a running save holds it
    try:
        with pytest.raises(SaveInProgressError, match=f"pid {os.getpid()}") as caught:
            await streamckpt.save(prefix, tensors(1), overwrite=True, storage_options=options)
        assert caught.value.uri is not None and caught.value.uri.endswith("ckpt.claim")
        assert names(store, store.base) == ["ckpt.claim"]  # nothing else written
    finally:
        await claim.release()
    await streamckpt.save(prefix, tensors(1), storage_options=options)
    await assert_exact(prefix, tensors(1), storage_options=options)
    assert "ckpt.claim" not in names(store, store.base)


async def test_a_killed_local_save_does_not_block_the_prefix(tmp_path: Path) -> None:
    prefix = str(tmp_path / "ckpt")
    # A process that takes the claim, as a save does first, and dies holding it.
    code = (
        "import anyio, os, signal\n"
        "from streamckpt.storage import LocalStore\n"
        "async def main():\n"
        f"    await LocalStore().claim({prefix + '.claim'!r})\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "anyio.run(main)\n"
    )
    done = await anyio.run_process([sys.executable, "-c", code], check=False)
    assert done.returncode == -9
    assert await anyio.Path(prefix + ".claim").exists()  # left behind, but no longer locked
    await anyio.Path(prefix + ".data-00000-of-00003").write_bytes(b"a crashed save's shard")
    await anyio.Path(f"{tmp_path}/.ckpt.index.tmp-0123456789ab").write_bytes(b"a crashed write")
    await streamckpt.save(prefix, tensors(2))
    await assert_exact(prefix, tensors(2))
    assert sorted(os.listdir(tmp_path)) == ["ckpt.data-00000-of-00001", "ckpt.index"]


async def test_an_expired_claim_is_broken_and_leftovers_reclaimed(store: StoreUnderTest) -> None:
    if store.kind in ("local", "memory"):
        pytest.skip("object-store claims: a lease (local disk: see the test above)")
    fs = store.filesystem()
    prefix = store.prefix("ckpt")
    base = store.strip(prefix)
    stale = {
        "token": "crashed",
        "host": "gone",
        "pid": 1,
        "renewed_at": time.time() - 3600,
        "lease_s": 120.0,
    }
    fs.pipe_file(base + ".claim", json.dumps(stale).encode())
    fs.pipe_file(base + ".data-00000-of-00003", b"a crashed save's shard, no index")
    fs.pipe_file(base + ".data-00000-of-00001.part-0123456789ab.00001", b"a temporary part")
    await streamckpt.save(prefix, tensors(3), num_shards=1, storage_options=store.storage_options)
    await assert_exact(prefix, tensors(3), storage_options=store.storage_options)
    assert names(store, store.base) == ["ckpt.data-00000-of-00001", "ckpt.index"]

    # a claim renewed a moment ago is a running save's: refused, nothing touched
    fresh = dict(stale, token="running", renewed_at=time.time())
    fs.pipe_file(base + ".claim", json.dumps(fresh).encode())
    with pytest.raises(SaveInProgressError, match="running"):
        await streamckpt.save(
            prefix, tensors(4), overwrite=True, storage_options=store.storage_options
        )
    await assert_exact(prefix, tensors(3), storage_options=store.storage_options)


async def test_a_save_whose_shards_vanished_before_the_commit_fails(servers: Any) -> None:
    """moto restarted (its reset endpoint) after the shards were written: no index."""
    server = servers.get("moto")
    server.reset()
    server.create_bucket(BUCKET)
    prefix = f"s3://{BUCKET}/vanish/ckpt"
    values = tensors(5)
    total = sum(v.nbytes for v in values.values())
    sent = 0

    def progress(nbytes: int) -> None:
        nonlocal sent
        sent += nbytes
        if sent >= total and sent - nbytes < total:  # every shard byte is on the server
            server.reset()
            server.create_bucket(BUCKET)

    with pytest.raises(CheckpointNotFoundError) as caught:
        await streamckpt.save(
            prefix,
            values,
            num_shards=2,
            storage_options=server.storage_options(),
            progress=progress,
        )
    assert caught.value.shard is not None and ".data-" in str(caught.value.uri)
    fs = server.filesystem()
    assert not fs.exists(f"{BUCKET}/vanish/ckpt.index")


async def test_a_cancelled_upload_leaves_no_multipart_upload_open(store: StoreUnderTest) -> None:
    if store.kind not in ("moto", "seaweedfs"):
        pytest.skip("S3 multipart uploads")
    prefix = store.prefix("big/ckpt")
    values = {"big": np.random.default_rng(6).integers(0, 255, size=24 << 20, dtype=np.uint8)}
    with anyio.CancelScope() as scope:

        def progress(nbytes: int) -> None:  # from a writer thread: cancel once a part is up
            if nbytes >= 5 << 20:
                anyio.from_thread.run_sync(scope.cancel)

        await streamckpt.save(
            prefix, values, num_shards=1, storage_options=store.storage_options, progress=progress
        )
    assert scope.cancelled_caught
    fs = store.filesystem()
    answer = fs.call_s3("list_multipart_uploads", Bucket=BUCKET)
    assert answer.get("Uploads", []) == []
    assert [n for n in names(store, store.base + "/big") if n.startswith("ckpt.")] == []


async def test_a_symlink_at_a_checkpoint_name_is_never_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_bytes(b"not a checkpoint's")
    directory = tmp_path / "ckpts"
    directory.mkdir()
    # at a shard's name: a leftover no index points to, so the save removes the link itself
    (directory / "ckpt.data-00000-of-00001").symlink_to(outside)
    await streamckpt.save(str(directory / "ckpt"), tensors(7))
    await assert_exact(str(directory / "ckpt"), tensors(7))
    assert not (directory / "ckpt.data-00000-of-00001").is_symlink()
    # at the claim's name, and at a shard's name the writer opens: refused, with a clear error
    (directory / "other.claim").symlink_to(outside)
    with pytest.raises(StorageError, match="symbolic link") as caught:
        await streamckpt.save(str(directory / "other"), tensors(8))
    assert caught.value.uri is not None and caught.value.uri.endswith("other.claim")
    (directory / "planted.data-00000-of-00001").symlink_to(outside)
    with pytest.raises(StorageError, match="symbolic link"):
        LocalStore().open_writer(str(directory / "planted.data-00000-of-00001"))
    assert outside.read_bytes() == b"not a checkpoint's"
    assert not (directory / "other.index").exists()


async def test_an_object_store_claim_is_renewed_and_a_takeover_is_seen() -> None:
    """keep_alive rewrites the lease while the save runs; a claim taken over stops the save."""
    from streamckpt.errors import unwrap_task_group
    from streamckpt.storage.claim import StoreClaim, parse_claim

    target, path = resolve(f"memory://claims-{os.getpid()}/ckpt.claim")
    claim = StoreClaim(target, path, lease_s=0.2)
    await claim.take()
    first = parse_claim(await target.read_all(path))["renewed_at"]
    with pytest.raises(SaveInProgressError, match="taken over"), unwrap_task_group():
        async with anyio.create_task_group() as tg:
            tg.start_soon(claim.keep_alive)
            await anyio.sleep(0.15)
            renewed = parse_claim(await target.read_all(path))
            assert renewed["renewed_at"] > first and renewed["token"] == claim._token
            other = dict(renewed, token="another save", renewed_at=time.time())
            await target.write_atomic(path, json.dumps(other).encode(), exclusive=False)
            await anyio.sleep(1)
    assert claim.lost
    await claim.release()  # not ours any more: left in place
    assert parse_claim(await target.read_all(path))["token"] == "another save"
    await target.delete([path])


async def test_uploads_left_open_under_the_prefix_are_aborted(store: StoreUnderTest) -> None:
    """An upload no writer knows of (its creation's answer lost, its abort failed) is swept."""
    if store.kind not in ("moto", "seaweedfs"):
        pytest.skip("S3 multipart uploads")
    fs = store.filesystem()
    key = store.strip(store.prefix("ckpt")).split("/", 1)[1] + ".data-00000-of-00001"
    fs.call_s3("create_multipart_upload", Bucket=BUCKET, Key=key)
    assert fs.call_s3("list_multipart_uploads", Bucket=BUCKET).get("Uploads")
    await streamckpt.save(store.prefix("ckpt"), tensors(9), storage_options=store.storage_options)
    assert fs.call_s3("list_multipart_uploads", Bucket=BUCKET).get("Uploads", []) == []
    await assert_exact(store.prefix("ckpt"), tensors(9), storage_options=store.storage_options)
