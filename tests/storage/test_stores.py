"""The core API on every store: local disk, memory://, GCS (fake-gcs-server), S3 (moto and
SeaweedFS). Real servers on 127.0.0.1, no mocks."""

from __future__ import annotations

import numpy as np
import pytest
from support import StoreUnderTest

import streamckpt

pytestmark = [
    pytest.mark.filterwarnings("ignore:Sending a large body directly:ResourceWarning:aiohttp"),
]

MiB = 1 << 20


def tensors(seed: int = 0) -> dict[str, object]:
    rng = np.random.default_rng(seed)
    return {
        "big": rng.standard_normal(3 * MiB // 4).astype(np.float32),  # 3 MiB
        "dense/kernel": rng.standard_normal((64, 32)).astype(np.float32),
        "step": np.int64(7),
        "names": np.array([b"a", b"", b"\xff" * 300], dtype=object),
        "empty": np.zeros((0, 4), dtype=np.float16),
    }


def assert_same(loaded: dict[str, np.ndarray], expected: dict[str, object]) -> None:
    assert set(loaded) == set(expected)
    for name, value in expected.items():
        want = np.asarray(value)
        assert loaded[name].dtype == want.dtype, name
        assert loaded[name].shape == want.shape, name
        assert list(loaded[name].reshape(-1)) == list(want.reshape(-1)), name


@pytest.mark.anyio
async def test_save_load_round_trip(store: StoreUnderTest) -> None:
    prefix = store.prefix("run/ckpt-1")
    values = tensors()
    info = await streamckpt.save(
        prefix, values, num_shards=3, storage_options=store.storage_options
    )
    assert info.num_shards == 3 and len(info.files) == 4
    assert info.stats["bytes_written"] >= sum(
        np.asarray(v).nbytes
        for v in values.values()
        if not isinstance(v, np.ndarray) or v.dtype != object
    )
    assert_same(await streamckpt.load(prefix, storage_options=store.storage_options), values)
    listed = sorted(
        p.rsplit("/", 1)[-1]
        for p in store.filesystem().ls(store.strip(store.prefix("run")), detail=False)
    )
    assert listed == [
        "ckpt-1.data-00000-of-00003",
        "ckpt-1.data-00001-of-00003",
        "ckpt-1.data-00002-of-00003",
        "ckpt-1.index",
    ]


@pytest.mark.anyio
async def test_default_shard_count_suits_the_store(
    store: StoreUnderTest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without ``num_shards``: one shard on local disk and memory://, ~shard_bytes on S3 / GCS.

    The shard size is lowered to 1 MiB here so that a small checkpoint shows it.
    """
    from streamckpt.storage import fsspec_store

    monkeypatch.setattr(fsspec_store, "AUTO_SHARD_BYTES", MiB)
    rng = np.random.default_rng(4)
    values = {f"t{i}": rng.standard_normal(MiB // 8).astype(np.float32) for i in range(9)}
    values["step"] = np.int64(3)  # 9 x 512 KiB: 4.5 MiB in all
    prefix = store.prefix("auto/ckpt")
    info = await streamckpt.save(prefix, values, storage_options=store.storage_options)
    expected = 1 if store.kind in ("local", "memory") else 5
    assert info.num_shards == expected and len(info.files) == expected + 1
    loaded = await streamckpt.load(prefix, storage_options=store.storage_options)
    assert_same(loaded, values)
    async with streamckpt.open(prefix, storage_options=store.storage_options) as ckpt:
        assert ckpt.header.num_shards == expected


@pytest.mark.anyio
async def test_read_tensor_and_partial_reads(store: StoreUnderTest) -> None:
    prefix = store.prefix("ckpt-2")
    values = tensors(1)
    await streamckpt.save(prefix, values, num_shards=2, storage_options=store.storage_options)
    kernel = await streamckpt.read_tensor(
        prefix, "dense/kernel", storage_options=store.storage_options
    )
    assert np.array_equal(kernel, values["dense/kernel"])
    async with streamckpt.open(prefix, storage_options=store.storage_options) as ckpt:
        entry = ckpt.entries["big"]
        assert entry.shape == (3 * MiB // 4,) and entry.size == 3 * MiB
        part = await ckpt.read("big", index=np.s_[1000:1010])
        assert np.array_equal(part, values["big"][1000:1010])
        rows = await ckpt.read("dense/kernel", index=np.s_[5, ::3])
        assert np.array_equal(rows, values["dense/kernel"][5, ::3])
        strings = await ckpt.read("names")
        assert strings.tolist() == [b"a", b"", b"\xff" * 300]


@pytest.mark.anyio
async def test_create_only_commit(store: StoreUnderTest) -> None:
    prefix = store.prefix("ckpt-3")
    first = {"x": np.arange(5)}
    await streamckpt.save(prefix, first, storage_options=store.storage_options)
    with pytest.raises(streamckpt.CheckpointExistsError):
        await streamckpt.save(prefix, {"x": np.arange(6)}, storage_options=store.storage_options)
    assert (await streamckpt.load(prefix, storage_options=store.storage_options))["x"].tolist() == [
        0,
        1,
        2,
        3,
        4,
    ]
    await streamckpt.save(
        prefix, {"y": np.ones(2)}, overwrite=True, storage_options=store.storage_options
    )
    assert list(await streamckpt.load(prefix, storage_options=store.storage_options)) == ["y"]


@pytest.mark.anyio
async def test_missing_and_corrupt(store: StoreUnderTest) -> None:
    with pytest.raises(streamckpt.CheckpointNotFoundError):
        await streamckpt.load(store.prefix("nothing-here"), storage_options=store.storage_options)
    prefix = store.prefix("ckpt-4")
    await streamckpt.save(
        prefix, {"a": np.arange(100, dtype=np.int32)}, storage_options=store.storage_options
    )
    fs = store.filesystem()
    shard = store.strip(prefix) + ".data-00000-of-00001"
    data = bytearray(fs.cat_file(shard))
    data[17] ^= 0xFF
    fs.pipe_file(shard, bytes(data))
    with pytest.raises(streamckpt.ChecksumError) as caught:
        await streamckpt.load(prefix, storage_options=store.storage_options)
    assert caught.value.tensor == "a" and caught.value.shard == 0
    assert caught.value.uri is not None and caught.value.uri.endswith(".data-00000-of-00001")
    fs.rm_file(shard)
    with pytest.raises(streamckpt.CheckpointNotFoundError):
        await streamckpt.load(prefix, storage_options=store.storage_options)


@pytest.mark.anyio
async def test_large_tensor_uses_parallel_parts(store: StoreUnderTest) -> None:
    if store.kind in ("local",):
        pytest.skip("local reads go straight into the array")
    prefix = store.prefix("ckpt-5")
    big = np.arange(10 * MiB // 8, dtype=np.int64)  # 10 MiB
    await streamckpt.save(prefix, {"big": big}, storage_options=store.storage_options)
    from streamckpt.pipeline.read import open_reader
    from streamckpt.storage import resolve

    reader_store, path = resolve(prefix, storage_options=store.storage_options)
    reader_store.read_part_size = 1 * MiB  # type: ignore[attr-defined]
    reader = await open_reader(reader_store, path)
    loaded = await reader.read_many(["big"])
    assert np.array_equal(loaded["big"], big)
    assert reader_store.stats.requests >= 10  # 10 parts, fetched in parallel


@pytest.mark.anyio
async def test_store_level_create_only_write(store: StoreUnderTest) -> None:
    """The index commit itself refuses an existing object (not only the early check)."""
    from streamckpt.storage import resolve

    target, path = resolve(store.prefix("exclusive.index"), storage_options=store.storage_options)
    if store.kind == "local":
        import os

        os.makedirs(os.path.dirname(path), exist_ok=True)
    await target.write_atomic(path, b"first", exclusive=True)
    with pytest.raises(streamckpt.CheckpointExistsError):
        await target.write_atomic(path, b"second", exclusive=True)
    assert await target.read_all(path) == b"first"
    await target.write_atomic(path, b"third", exclusive=False)
    assert await target.read_all(path) == b"third"


@pytest.mark.anyio
async def test_statistics_and_progress(store: StoreUnderTest) -> None:
    prefix = store.prefix("ckpt-6")
    values = {"a": np.ones(300_000, dtype=np.float32), "b": np.arange(10)}
    moved: list[int] = []
    info = await streamckpt.save(
        prefix, values, num_shards=2, storage_options=store.storage_options, progress=moved.append
    )
    payload = 300_000 * 4 + 10 * 8
    assert sum(moved) == info.stats["bytes_written"] >= payload  # payload + the index
    assert set(info.seconds_by_phase) == {"write_shards", "commit_index"}
    if store.kind != "local":
        assert info.stats["requests"] >= 3  # two shard uploads and the index
    stats: dict[str, float] = {}
    arrived: list[int] = []
    await streamckpt.load(
        prefix, storage_options=store.storage_options, stats=stats, progress=arrived.append
    )
    assert stats["bytes_read"] == sum(arrived) >= payload
    assert stats["requests"] >= 2 and stats["retries"] == 0 and stats["throttles"] == 0
    assert {"seconds_open", "seconds_fetch_verify_decode"} <= set(stats)


@pytest.mark.anyio
async def test_index_cache_makes_repeated_reads_one_request(store: StoreUnderTest) -> None:
    from streamckpt.pipeline.index import INDEX_CACHE

    prefix = store.prefix("cached")
    values = {f"t{i:03d}": np.full(8, i, dtype=np.int32) for i in range(50)}
    await streamckpt.save(prefix, values, storage_options=store.storage_options)
    INDEX_CACHE.clear()
    cold: dict[str, float] = {}
    await streamckpt.read_tensor(prefix, "t007", storage_options=store.storage_options, stats=cold)
    assert cold["requests"] == 2  # the index's tail holds everything; then the tensor
    for name in ("t001", "t042", "t007"):
        warm: dict[str, float] = {}
        got = await streamckpt.read_tensor(
            prefix, name, storage_options=store.storage_options, stats=warm
        )
        assert got.tolist() == values[name].tolist()
        assert warm["requests"] == 1
    # An overwrite in place through streamckpt drops the cached index.
    await streamckpt.save(
        prefix, {"t001": np.zeros(3)}, overwrite=True, storage_options=store.storage_options
    )
    assert (
        await streamckpt.read_tensor(prefix, "t001", storage_options=store.storage_options)
    ).tolist() == [0.0, 0.0, 0.0]


@pytest.mark.anyio
async def test_stale_cached_index_is_detected(store: StoreUnderTest) -> None:
    """Another writer replaced the checkpoint behind the cache's back: a whole-tensor read
    fails its crc32c on the stale index, and the read is retried on a fresh one."""
    from streamckpt.pipeline.index import INDEX_CACHE

    first, second = store.prefix("a"), store.prefix("b")
    await streamckpt.save(first, {"x": np.arange(4.0)}, storage_options=store.storage_options)
    await streamckpt.save(second, {"x": np.arange(4.0) + 10}, storage_options=store.storage_options)
    INDEX_CACHE.clear()
    assert (await streamckpt.load(first, storage_options=store.storage_options))["x"][0] == 0
    fs = store.filesystem()
    for suffix in (".index", ".data-00000-of-00001"):  # "another process" swaps the files
        fs.pipe_file(store.strip(first) + suffix, fs.cat_file(store.strip(second) + suffix))
    loaded = await streamckpt.load(first, storage_options=store.storage_options)
    assert loaded["x"].tolist() == [10.0, 11.0, 12.0, 13.0]


@pytest.mark.anyio
async def test_overwrite_with_another_shard_count_leaves_no_stale_files(
    store: StoreUnderTest,
) -> None:
    prefix = store.prefix("over")
    await streamckpt.save(
        prefix,
        {"a": np.arange(50), "b": np.ones(9)},
        num_shards=3,
        storage_options=store.storage_options,
    )
    await streamckpt.save(
        prefix,
        {"c": np.zeros(4)},
        num_shards=1,
        overwrite=True,
        storage_options=store.storage_options,
    )
    names = sorted(
        p.rsplit("/", 1)[-1]
        for p in store.filesystem().ls(store.strip(store.base), detail=False)
        if "over" in p
    )
    assert names == ["over.data-00000-of-00001", "over.index"]
    assert list(await streamckpt.load(prefix, storage_options=store.storage_options)) == ["c"]


@pytest.mark.anyio
async def test_multipart_shards_round_trip(store: StoreUnderTest) -> None:
    """Shards larger than an upload part (several parts in flight on S3)."""
    prefix = store.prefix("multi")
    big = np.random.default_rng(3).standard_normal(6 * MiB // 4 * 4).astype(np.float32)  # 24 MiB
    info = await streamckpt.save(
        prefix,
        {"big": big, "small": np.arange(3)},
        num_shards=2,
        max_inflight_bytes=32 * MiB,
        storage_options=store.storage_options,
    )
    assert info.stats["bytes_written"] >= big.nbytes
    loaded = await streamckpt.load(prefix, storage_options=store.storage_options)
    assert np.array_equal(loaded["big"], big) and loaded["small"].tolist() == [0, 1, 2]


def test_owned_s3_client_sends_bodies_unhashed_unless_asked() -> None:
    """Over plain http botocore would SHA-256 every body on fsspec's one loop thread."""
    from streamckpt.storage.owned import owned_filesystem

    options = {"endpoint_url": "http://127.0.0.1:9", "key": "k", "secret": "s"}
    fs = owned_filesystem("s3", options)
    assert fs.config_kwargs["s3"] == {"payload_signing_enabled": False}
    assert fs.config_kwargs["retries"] == {"total_max_attempts": 1}  # our policy decides
    signed = owned_filesystem(
        "s3", options | {"config_kwargs": {"s3": {"payload_signing_enabled": True}}}
    )
    assert signed.config_kwargs["s3"] == {"payload_signing_enabled": True}  # the caller's say
