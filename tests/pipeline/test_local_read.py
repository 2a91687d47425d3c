"""The blocking local reads answer as the async pipeline does, values and errors alike.

``streamckpt.sync.read_tensor`` of a whole local tensor and ``streamckpt.sync.list_tensors``
of a local checkpoint skip the event loop (``streamckpt.pipeline.local_read``). A user must
not be able to tell, except by the clock: every golden TensorFlow fixture reads the same both
ways, and every damaged checkpoint below fails with the same error class, message, URI,
tensor, shard and offset.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import ml_dtypes
import numpy as np
import pytest
from support import TF_FIXTURES, load_manifest
from support.builders import flip

import streamckpt
import streamckpt.sync
from streamckpt.pipeline import local_load, local_read

PREFIXES = sorted(
    {bundle["prefix"] for fixture in load_manifest()["fixtures"] for bundle in fixture["bundles"]}
)


def async_read(prefix: str, name: str) -> np.ndarray[Any, Any]:
    streamckpt.clear_index_cache()
    return anyio.run(lambda: streamckpt.read_tensor(prefix, name))


def async_load(prefix: str, names: list[str] | None = None) -> dict[str, np.ndarray[Any, Any]]:
    streamckpt.clear_index_cache()
    return anyio.run(lambda: streamckpt.load(prefix, names=names))


def async_list(prefix: str) -> dict[str, streamckpt.TensorInfo]:
    streamckpt.clear_index_cache()
    return anyio.run(lambda: streamckpt.list_tensors(prefix))


def same_array(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> None:
    assert (a.dtype, a.shape) == (b.dtype, b.shape)
    if a.dtype == object:
        assert a.tolist() == b.tolist()
    else:
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("prefix", PREFIXES)
def test_golden_checkpoints_read_the_same_both_ways(prefix: str) -> None:
    path = str(TF_FIXTURES / prefix)
    listed = streamckpt.sync.list_tensors(path)
    assert listed == async_list(path)
    assert listed
    for name in listed:
        same_array(streamckpt.sync.read_tensor(path, name), async_read(path, name))
    loaded, looped = streamckpt.sync.load(path), async_load(path)
    assert list(loaded) == list(looped)
    for name in loaded:
        same_array(loaded[name], looped[name])


def test_loads_merge_reads_and_run_them_on_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small merged reads (forced) over three shards: many tasks, each value exact."""
    monkeypatch.setattr(local_read, "MAX_GROUP_BYTES", 3000)
    prefix = str(tmp_path / "ckpt")
    rng = np.random.default_rng(5)
    tensors = {f"t{i:03d}": rng.standard_normal(rng.integers(0, 900)) for i in range(120)}
    streamckpt.sync.save(prefix, tensors, num_shards=3)
    loaded = local_load.load_whole(prefix)
    assert loaded is not None and list(loaded) == sorted(tensors)
    for name, value in tensors.items():
        same_array(loaded[name], value)
    some = ["t007", "t100", "t003"]
    picked = local_load.load_whole(prefix, some)
    assert picked is not None and list(picked) == some
    for name in some:
        same_array(picked[name], tensors[name])


def test_the_shortcut_is_taken_for_whole_local_tensors_only(tmp_path: Path) -> None:
    prefix = str(tmp_path / "ckpt")
    value = np.arange(24, dtype=np.float32).reshape(4, 6)
    streamckpt.sync.save(prefix, {"w": value})
    assert local_read.local_path(prefix, None) == prefix
    assert local_read.local_path(f"file://{prefix}", None) == prefix
    assert local_read.local_path(Path(prefix), None) == prefix
    assert local_read.local_path("memory://x/ckpt", None) is None
    assert local_read.local_path("simplecache::file:///x", None) is None
    assert local_read.local_path(prefix, object()) is None
    same_array(local_read.read_whole(prefix, "w"), value)  # type: ignore[arg-type]
    same_array(streamckpt.sync.read_tensor(f"file://{prefix}", "w"), value)
    # a box goes the async way and still reads only its part
    same_array(streamckpt.sync.read_tensor(prefix, "w", index=np.s_[1:3, 2]), value[1:3, 2])
    stats: dict[str, float] = {}
    streamckpt.sync.read_tensor(prefix, "w", stats=stats)
    assert stats["requests"] >= 1  # stats asked: the pipeline that counts them ran


def test_dtypes_numpy_lacks_read_back_exactly(tmp_path: Path) -> None:
    prefix = str(tmp_path / "ckpt")
    tensors = {
        "bf16": np.linspace(-3, 3, 7).astype(ml_dtypes.bfloat16),
        "empty": np.zeros((0, 5), np.int64),
        "scalar": np.float64(2.5),
        "strings": np.array([b"a", b"", b"\x00" * 300], dtype=object),
    }
    streamckpt.sync.save(prefix, tensors)
    for name, value in tensors.items():
        got = streamckpt.sync.read_tensor(prefix, name)
        same_array(got, np.asarray(value))
        same_array(got, async_read(prefix, name))


def test_partitioned_tensors_are_assembled_by_the_pipeline() -> None:
    path = str(TF_FIXTURES / "partitioned_v1" / "model-7")
    partitioned = [i.name for i in streamckpt.sync.list_tensors(path).values() if i.slices]
    assert partitioned
    for name in partitioned:
        assert local_read.read_whole(path, name) is None
        assert local_load.load_whole(path, [name]) is None
        same_array(streamckpt.sync.read_tensor(path, name), async_read(path, name))
        same_array(streamckpt.sync.load(path, names=[name])[name], async_read(path, name))


# -- damaged checkpoints: the same error both ways ---------------------------------------------


def _shard(prefix: str) -> str:
    return f"{prefix}.data-00000-of-00001"


def _truncate(path: str, size: int) -> None:
    os.truncate(path, size)


def _entry_offset(prefix: str, name: str) -> int:
    return streamckpt.sync.list_tensors(prefix)[name].offset


DAMAGE: dict[str, tuple[Callable[[str], None], str, type[Exception]]] = {
    "no index": (lambda p: os.remove(f"{p}.index"), "w", streamckpt.CheckpointNotFoundError),
    "no shard": (lambda p: os.remove(_shard(p)), "w", streamckpt.CheckpointNotFoundError),
    "no such tensor": (lambda p: None, "nope", streamckpt.TensorNotFoundError),
    "the header's key": (lambda p: None, "", streamckpt.TensorNotFoundError),
    "shard cut short": (lambda p: _truncate(_shard(p), 100), "w", streamckpt.TruncatedError),
    "a flipped data byte": (
        lambda p: flip(_shard(p), _entry_offset(p, "w") + 17),
        "w",
        streamckpt.ChecksumError,
    ),
    "a flipped footer byte": (
        lambda p: flip(f"{p}.index", os.path.getsize(f"{p}.index") - 1),
        "w",
        streamckpt.CorruptCheckpointError,
    ),
    "a flipped index block byte": (
        lambda p: flip(f"{p}.index", os.path.getsize(f"{p}.index") - 60),
        "w",
        streamckpt.CorruptCheckpointError,
    ),
    "a flipped data block byte": (
        lambda p: flip(f"{p}.index", 3),
        "w",
        streamckpt.CorruptCheckpointError,
    ),
    "index cut to 10 bytes": (
        lambda p: _truncate(f"{p}.index", 10),
        "w",
        streamckpt.CorruptCheckpointError,
    ),
    "empty index": (lambda p: _truncate(f"{p}.index", 0), "w", streamckpt.CorruptCheckpointError),
}


def _failure(call: Callable[[], Any]) -> streamckpt.StreamCkptError:
    with pytest.raises(streamckpt.StreamCkptError) as caught:
        call()
    return caught.value


@pytest.mark.parametrize("call", ["read_tensor", "load"])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damage_fails_the_same_way_both_ways(tmp_path: Path, damage: str, call: str) -> None:
    prefix = str(tmp_path / "ckpt")
    rng = np.random.default_rng(3)
    streamckpt.sync.save(
        prefix, {"a": rng.standard_normal(50), "w": rng.standard_normal((64, 64)).astype("f4")}
    )
    harm, name, expected = DAMAGE[damage]
    harm(prefix)
    if call == "read_tensor":
        blocking = _failure(lambda: streamckpt.sync.read_tensor(prefix, name))
        looped = _failure(lambda: async_read(prefix, name))
    else:  # both tensors: "a"'s read comes first and must not hide "w"'s failure
        names = ["a", name]
        blocking = _failure(lambda: streamckpt.sync.load(prefix, names=names))
        looped = _failure(lambda: async_load(prefix, names))
    assert isinstance(blocking, expected), repr(blocking)
    assert type(blocking) is type(looped)
    assert str(blocking) == str(looped)
    context = ("uri", "tensor", "shard", "offset")
    assert [getattr(blocking, k) for k in context] == [getattr(looped, k) for k in context]
    if name and damage != "no index":
        assert blocking.uri is not None


def test_a_hostile_size_is_refused_before_any_allocation(tmp_path: Path) -> None:
    """An entry that claims 2**40 bytes in a small shard: refused from the shard's size."""
    from streamckpt.format.bundle import BundleEntry, BundleHeader
    from streamckpt.format.dtypes import DataType
    from streamckpt.format.index_file import encode_index

    prefix = str(tmp_path / "ckpt")
    streamckpt.sync.save(prefix, {"w": np.zeros(4, np.float32)})
    entry = BundleEntry(
        dtype=DataType.DT_FLOAT, shape=(1 << 38,), shard_id=0, offset=0, size=1 << 40, crc32c=0
    )
    Path(f"{prefix}.index").write_bytes(encode_index(BundleHeader(num_shards=1), [(b"w", entry)]))
    blocking = _failure(lambda: streamckpt.sync.read_tensor(prefix, "w"))
    looped = _failure(lambda: async_read(prefix, "w"))
    assert isinstance(blocking, streamckpt.TruncatedError)
    assert type(blocking) is type(looped)
    # the async reader words a claim this large as the shard's size check does
    context = ("uri", "tensor", "shard", "offset")
    assert [getattr(blocking, k) for k in context] == [getattr(looped, k) for k in context]


# --- a load checks each tensor's crc32c as its bytes arrive, chunk by chunk --------------------


def _mixed(rng: np.random.Generator) -> dict[str, Any]:
    tensors: dict[str, Any] = {
        f"t{i:02d}": rng.standard_normal(int(rng.integers(0, 700))).astype("f4") for i in range(30)
    }
    tensors["s"] = np.array([b"x" * int(n) for n in rng.integers(0, 300, 9)], dtype=object)
    return tensors


@pytest.mark.parametrize("chunk", [1, 7, 256, 4093, 1 << 20])
def test_loads_check_crcs_across_chunk_boundaries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    """Tensors spanning many chunks, ending inside one, strings among them: values exact."""
    monkeypatch.setattr(local_read, "_CHUNK", chunk)
    prefix = str(tmp_path / "ckpt")
    tensors = _mixed(np.random.default_rng(chunk))
    streamckpt.sync.save(prefix, tensors, num_shards=2)
    loaded = streamckpt.sync.load(prefix)
    assert list(loaded) == sorted(tensors)
    for name, value in tensors.items():
        assert loaded[name].tolist() == value.tolist()


@pytest.mark.parametrize("damage", ["flip", "truncate"])
@pytest.mark.parametrize("chunk", [5, 1000])
def test_damage_in_a_later_chunk_fails_as_the_async_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int, damage: str
) -> None:
    """A byte of a tensor deep in a merged read, or the shard cut inside that read."""
    monkeypatch.setattr(local_read, "_CHUNK", chunk)
    prefix = str(tmp_path / "ckpt")
    tensors = _mixed(np.random.default_rng(1))
    streamckpt.sync.save(prefix, tensors)
    info = streamckpt.sync.list_tensors(prefix)
    victim = max((i for i in info.values() if i.name != "s"), key=lambda i: i.offset)
    assert victim.offset > 3 * chunk  # a tensor past the first chunks of its read
    if damage == "flip":
        flip(_shard(prefix), victim.offset + victim.size - 1)
    else:
        _truncate(_shard(prefix), victim.offset + victim.size // 2)
    blocking = _failure(lambda: streamckpt.sync.load(prefix))
    looped = _failure(lambda: async_load(prefix))
    expected = streamckpt.ChecksumError if damage == "flip" else streamckpt.TruncatedError
    assert isinstance(blocking, expected) and type(blocking) is type(looped)
    assert str(blocking) == str(looped)
    context = ("uri", "tensor", "shard", "offset")
    assert [getattr(blocking, k) for k in context] == [getattr(looped, k) for k in context]


def test_entries_sharing_bytes_each_get_their_own_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crafted index whose entries overlap (one inside another): each is checked alone."""
    from streamckpt.format.bundle import BundleEntry, BundleHeader
    from streamckpt.format.crc import crc32c, mask
    from streamckpt.format.dtypes import DataType
    from streamckpt.format.index_file import encode_index

    monkeypatch.setattr(local_read, "_CHUNK", 24)
    prefix = str(tmp_path / "ckpt")
    streamckpt.sync.save(prefix, {"w": np.arange(40, dtype=np.float32)})
    data = Path(_shard(prefix)).read_bytes()

    def entry(start: int, count: int) -> BundleEntry:
        piece = data[start : start + 4 * count]
        return BundleEntry(DataType.DT_FLOAT, (count,), 0, start, len(piece), mask(crc32c(piece)))

    entries = [(b"inner", entry(40, 10)), (b"outer", entry(0, 40)), (b"tail", entry(100, 15))]
    Path(f"{prefix}.index").write_bytes(encode_index(BundleHeader(num_shards=1), entries))
    loaded = streamckpt.sync.load(prefix)
    whole = np.arange(40, dtype=np.float32)
    assert loaded["outer"].tolist() == whole.tolist()
    assert loaded["inner"].tolist() == whole[10:20].tolist()
    assert loaded["tail"].tolist() == whole[25:40].tolist()
    flip(_shard(prefix), 45)  # inside inner and outer
    failed = _failure(lambda: streamckpt.sync.load(prefix))
    assert isinstance(failed, streamckpt.ChecksumError) and failed.tensor in ("inner", "outer")
