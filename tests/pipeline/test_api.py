"""The public surface: names, import boundary, dtype round trips, sync face, CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from support import TF_FIXTURES

import streamckpt
import streamckpt.sync
from streamckpt.format.bundle import BundleEntry, BundleHeader
from streamckpt.format.crc import crc32c, mask
from streamckpt.format.dtypes import DataType
from streamckpt.format.index_file import encode_index
from streamckpt.format.strings import encode_strings


def test_public_names_are_pinned() -> None:
    assert sorted(streamckpt.__all__) == [
        "Checkpoint",
        "CheckpointExistsError",
        "CheckpointManager",
        "CheckpointNotFoundError",
        "CheckpointReader",
        "ChecksumError",
        "CoordinationError",
        "CorruptCheckpointError",
        "DataType",
        "Deferred",
        "NameMismatchError",
        "NamingError",
        "ObjectMatchError",
        "PermissionDeniedError",
        "RestoreStatus",
        "RetriesExhaustedError",
        "SaveHandle",
        "SaveInProgressError",
        "SaveInfo",
        "Slice",
        "StorageError",
        "StreamCkptError",
        "TensorInfo",
        "TensorNotFoundError",
        "TruncatedError",
        "Typed",
        "UnsupportedError",
        "ValueMismatchError",
        "assign_into",
        "clear_index_cache",
        "copy_checkpoint",
        "flatten",
        "identity_map",
        "latest_checkpoint",
        "list_tensors",
        "load",
        "load_nested",
        "lookup_map",
        "open",
        "read_tensor",
        "save",
        "unflatten",
        "verify_checkpoint",
    ]
    for name in streamckpt.__all__:
        assert getattr(streamckpt, name) is not None
    errors = {
        name
        for name in dir(streamckpt.errors)
        if isinstance(getattr(streamckpt.errors, name), type)
        and issubclass(getattr(streamckpt.errors, name), streamckpt.StreamCkptError)
    }
    assert errors <= set(streamckpt.__all__)  # every error class is exported
    assert sorted(streamckpt.sync.__all__) == [
        "Checkpoint",
        "CheckpointManager",
        "SyncCheckpointReader",
        "copy_checkpoint",
        "latest_checkpoint",
        "list_tensors",
        "load",
        "load_nested",
        "open",
        "read_tensor",
        "run",
        "save",
        "verify_checkpoint",
    ]


def test_format_layer_imports_no_io_libraries() -> None:
    code = (
        "import sys, pkgutil, importlib, streamckpt.format as f\n"
        "for m in pkgutil.iter_modules(f.__path__):\n"
        "    importlib.import_module(f'{f.__name__}.{m.name}')\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('anyio', 'fsspec'))\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_error_tree_also_builtin() -> None:
    assert issubclass(streamckpt.CheckpointNotFoundError, FileNotFoundError)
    assert issubclass(streamckpt.CorruptCheckpointError, ValueError)
    assert issubclass(streamckpt.ChecksumError, streamckpt.CorruptCheckpointError)
    assert issubclass(streamckpt.TensorNotFoundError, KeyError)
    for cls in (
        streamckpt.CheckpointExistsError,
        streamckpt.StorageError,
        streamckpt.UnsupportedError,
    ):
        assert issubclass(cls, streamckpt.StreamCkptError)


EVERY_DTYPE = {
    "f32": np.array([0.0, -0.0, 1.5, np.nan, np.inf], dtype=np.float32),
    "f64": np.array([[1e300, -2.5]], dtype=np.float64),
    "f16": np.array([1.0, 65504.0], dtype=np.float16),
    "bf16": np.array([1.0, -3.0], dtype=ml_dtypes.bfloat16),
    "i8": np.array([-128, 127], dtype=np.int8),
    "i16": np.array([-(2**15)], dtype=np.int16),
    "i32": np.arange(6, dtype=np.int32).reshape(2, 3),
    "i64": np.array([-(2**63), 2**63 - 1], dtype=np.int64),
    "u8": np.array([0, 255], dtype=np.uint8),
    "u16": np.array([65535], dtype=np.uint16),
    "u32": np.array([2**32 - 1], dtype=np.uint32),
    "u64": np.array([2**64 - 1], dtype=np.uint64),
    "bool": np.array([True, False, True]),
    "c64": np.array([1 + 2j], dtype=np.complex64),
    "c128": np.array([[3 - 4j]], dtype=np.complex128),
    "f8e5m2": np.array([1.0, -2.0], dtype=ml_dtypes.float8_e5m2),
    "f8e4m3fn": np.array([1.0, 0.5], dtype=ml_dtypes.float8_e4m3fn),
    "f8e4m3fnuz": np.array([1.0], dtype=ml_dtypes.float8_e4m3fnuz),
    "f8e4m3b11fnuz": np.array([1.0], dtype=ml_dtypes.float8_e4m3b11fnuz),
    "f8e5m2fnuz": np.array([1.0], dtype=ml_dtypes.float8_e5m2fnuz),
    "f4e2m1fn": np.array([1.0, -1.0], dtype=ml_dtypes.float4_e2m1fn),
    "i4": np.array([-8, 7, -1], dtype=ml_dtypes.int4),
    "u4": np.array([15, 0], dtype=ml_dtypes.uint4),
    "i2": np.array([-2, 1], dtype=ml_dtypes.int2),
    "u2": np.array([3], dtype=ml_dtypes.uint2),
    "scalar": np.float32(2.5),
    "empty": np.zeros((3, 0), dtype=np.float32),
    "strings": np.array([b"", b"\x00\xff", b"x" * 1000], dtype=object),
}


@pytest.mark.anyio
async def test_every_dtype_round_trips(tmp_path: Path) -> None:
    quantized = {
        "qi8": streamckpt.Typed(np.array([-1, 2], dtype=np.int8), DataType.DT_QINT8),
        "qu16": streamckpt.Typed(np.array([7], dtype=np.uint16), DataType.DT_QUINT16),
        "variant": streamckpt.Typed(np.array([b"opaque"], dtype=object), DataType.DT_VARIANT),
    }
    await streamckpt.save(tmp_path / "c", {**EVERY_DTYPE, **quantized}, num_shards=3)
    async with streamckpt.open(tmp_path / "c") as ckpt:
        assert ckpt.entries["qi8"].tf_dtype == DataType.DT_QINT8
        assert ckpt.entries["variant"].tf_dtype == DataType.DT_VARIANT
        assert ckpt.entries["bf16"].tf_dtype == DataType.DT_BFLOAT16
        assert {e.shard for e in ckpt.entries.values()} == {0, 1, 2}
    loaded = await streamckpt.load(tmp_path / "c")
    for name, value in EVERY_DTYPE.items():
        expected = np.asarray(value)
        assert loaded[name].dtype == expected.dtype, name
        assert loaded[name].shape == expected.shape, name
        assert loaded[name].tobytes() == expected.tobytes() or name == "strings", name
    assert list(loaded["strings"]) == list(EVERY_DTYPE["strings"])
    assert loaded["qi8"].tolist() == [-1, 2]
    assert loaded["variant"].tolist() == [b"opaque"]


@pytest.mark.anyio
async def test_python_values_and_names(tmp_path: Path) -> None:
    values = {"int": 7, "float": 0.5, "text": "héllo", "raw": b"\xff", "ü/名前": np.ones(2)}
    values["n" * 5000] = np.zeros(1)
    values[b"\xff\xfenot-utf8".decode("utf-8", "surrogateescape")] = np.ones(1)
    await streamckpt.save(str(tmp_path / "c"), values)
    loaded = await streamckpt.load(str(tmp_path / "c"))
    assert loaded["int"].dtype == np.int64 and loaded["int"] == 7
    assert loaded["text"].item() == "héllo".encode()
    assert set(loaded) == set(values)
    one = await streamckpt.read_tensor(str(tmp_path / "c"), b"\xff\xfenot-utf8")
    assert one.tolist() == [1.0]


@pytest.mark.anyio
async def test_big_endian_bundles_are_readable(tmp_path: Path) -> None:
    floats = np.array([1.5, -2.0, 3.25], dtype=">f4").tobytes()
    ints = np.array([[1, -2]], dtype=">i8").tobytes()
    strings, string_crc = encode_strings([b"ab", b"", b"xyz"], big_endian=True)
    data = floats + ints + strings
    entries = [
        (b"f", BundleEntry(DataType.DT_FLOAT, (3,), 0, 0, 12, mask(crc32c(floats)))),
        (b"i", BundleEntry(DataType.DT_INT64, (1, 2), 0, 12, 16, mask(crc32c(ints)))),
        (b"s", BundleEntry(DataType.DT_STRING, (3,), 0, 28, len(strings), string_crc)),
    ]
    (tmp_path / "be.data-00000-of-00001").write_bytes(data)
    (tmp_path / "be.index").write_bytes(encode_index(BundleHeader(1, big_endian=True), entries))
    loaded = await streamckpt.load(tmp_path / "be")
    assert loaded["f"].tolist() == [1.5, -2.0, 3.25]
    assert loaded["f"].dtype == np.dtype("<f4")
    assert loaded["i"].tolist() == [[1, -2]]
    assert loaded["s"].tolist() == [b"ab", b"", b"xyz"]
    part = await streamckpt.read_tensor(tmp_path / "be", "f", index=np.s_[1:])
    assert part.tolist() == [-2.0, 3.25]


def test_sync_face_round_trip(tmp_path: Path) -> None:
    a = np.random.default_rng(1).standard_normal((64, 32)).astype(np.float32)
    info = streamckpt.sync.save(tmp_path / "s", {"a": a, "step": np.int64(3)}, num_shards=2)
    assert info.num_tensors == 2 and info.num_shards == 2
    assert np.array_equal(streamckpt.sync.load(tmp_path / "s")["a"], a)
    assert np.array_equal(streamckpt.sync.read_tensor(tmp_path / "s", "a", index=np.s_[3]), a[3])
    with streamckpt.sync.open(tmp_path / "s") as ckpt:
        assert ckpt.entries["a"].shape == (64, 32)
        assert np.array_equal(ckpt.read("a", index=np.s_[:, 5]), a[:, 5])


@pytest.mark.anyio
async def test_sync_face_works_inside_a_running_loop(tmp_path: Path) -> None:
    # A notebook calls sync code from inside an event loop; the portal path must handle it.
    streamckpt.sync.save(tmp_path / "n", {"x": np.arange(3)})
    assert streamckpt.sync.load(tmp_path / "n")["x"].tolist() == [0, 1, 2]


@pytest.mark.anyio
async def test_memory_filesystem(tmp_path: Path) -> None:
    a = np.arange(1000, dtype=np.int32)
    await streamckpt.save("memory://bucket/run/ckpt-1", {"a": a}, num_shards=2)
    assert np.array_equal((await streamckpt.load("memory://bucket/run/ckpt-1"))["a"], a)
    part = await streamckpt.read_tensor("memory://bucket/run/ckpt-1", "a", index=np.s_[10:20])
    assert part.tolist() == list(range(10, 20))


def test_ml_dtypes_is_imported_only_for_its_types(tmp_path: Path) -> None:
    """Its import costs more than a small read; a float32 checkpoint never needs it."""
    code = (
        "import sys, numpy as np, streamckpt.sync as sc\n"
        f"sc.save({str(tmp_path / 'f')!r}, {{'x': np.arange(4.0)}})\n"
        f"assert sc.read_tensor({str(tmp_path / 'f')!r}, 'x').tolist() == [0, 1, 2, 3]\n"
        "assert 'ml_dtypes' not in sys.modules, 'float32 pulled in ml_dtypes'\n"
        f"sc.load({str(TF_FIXTURES / 'dtypes' / 'ckpt')!r})\n"
        "assert 'ml_dtypes' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
