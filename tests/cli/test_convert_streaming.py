"""``convert`` into the TF format streams: tensors are read from SRC as the save writes them.

The memory test runs the real command in a child process and reads its peak RSS, as
``test_streaming.py`` does for ``cp``, ``verify`` and ``diff``: a conversion that loaded every
tensor before saving would exceed the bound it checks. The library tests pin what the CLI
relies on: a :class:`streamckpt.Deferred` is fetched once, checked, and not kept.
"""

from __future__ import annotations

import json
import sys
import threading
import weakref
from pathlib import Path

import anyio
import fsspec
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from support.peak import peak_mib

import streamckpt
import streamckpt.cli._formats as formats
import streamckpt.sync
from streamckpt.cli import main

MiB = 1 << 20
CLI = [sys.executable, "-m", "streamckpt.cli"]


def _peak_mib(*argv: str) -> float:
    return peak_mib(*CLI, *argv)


def _hf_directory(folder: Path, values: dict[str, np.ndarray], per_file: int) -> Path:
    """A Hugging Face directory: ``per_file`` tensors a file, and the index naming them."""
    folder.mkdir()
    names = list(values)
    groups = [names[i : i + per_file] for i in range(0, len(names), per_file)]
    weight_map = {}
    for number, group in enumerate(groups, start=1):
        file = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        safetensors.numpy.save_file({n: values[n] for n in group}, folder / file)
        weight_map.update({n: file for n in group})
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / formats.HF_INDEX).write_text(json.dumps(index))
    return folder


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss in KiB is Linux's")
def test_peak_memory_of_a_tf_output_stays_near_the_budget(tmp_path: Path) -> None:
    """128 MiB in eight 16 MiB tensors, through a 16 MiB budget, from each kind of SRC.

    Loading every tensor before the save (as ``convert`` once did) adds the whole 128 MiB to
    the peak of converting a tiny file (measured: +142 MiB; streamed: +30 MiB, one tensor
    and the disk writer's two 8 MiB staging buffers).
    """
    rng = np.random.default_rng(0)
    values = {f"layer{i}/w": rng.standard_normal(4 * MiB, dtype=np.float32) for i in range(8)}
    single = tmp_path / "model.safetensors"
    safetensors.numpy.save_file(values, single)
    hf = _hf_directory(tmp_path / "hf", values, per_file=2)
    del values
    tiny = tmp_path / "tiny.safetensors"
    safetensors.numpy.save_file({"a": np.ones(4, np.float32)}, tiny)
    baseline = _peak_mib("convert", str(tiny), str(tmp_path / "tiny"), "-q")
    budget = ("--budget-mib", "16", "-q")
    peaks = {
        "safetensors": _peak_mib("convert", str(single), str(tmp_path / "a"), *budget),
        "hf": _peak_mib("convert", str(hf), str(tmp_path / "b"), *budget),
        "tf": _peak_mib("convert", str(tmp_path / "a"), str(tmp_path / "c"), *budget),
    }
    extra = {kind: peak - baseline for kind, peak in peaks.items()}
    print(f"peak RSS above a tiny convert ({baseline:.0f} MiB):", extra)
    assert all(mib < 72 for mib in extra.values()), (baseline, extra)
    expected = streamckpt.sync.load(str(tmp_path / "a"))
    for prefix in ("b", "c"):
        loaded = streamckpt.sync.load(str(tmp_path / prefix))
        assert all(loaded[k].tobytes() == expected[k].tobytes() for k in expected)


@pytest.fixture
def mixed() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "enc/kernel": rng.standard_normal((64, 48), dtype=np.float32).astype(ml_dtypes.bfloat16),
        "enc/bias": rng.standard_normal(48).astype(np.float16),
        "head/kernel": rng.standard_normal((3000, 200), dtype=np.float32),  # 2.3 MiB
        "step": np.array(7, dtype=np.int64),
        "mask": np.array([True, False, True]),
        "ids": np.arange(10, dtype=np.int32).reshape(2, 5),
    }


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.tf
def test_tensorflow_reads_every_byte_of_streamed_conversions(
    mixed: dict[str, np.ndarray], tmp_path: Path
) -> None:
    """A 1 MiB budget (one tensor above it), three data files; renamed and dropped names."""
    tf = pytest.importorskip("tensorflow")
    single = tmp_path / "model.safetensors"
    safetensors.numpy.save_file(mixed, single)
    hf = _hf_directory(tmp_path / "hf", mixed, per_file=4)
    name_map = tmp_path / "names.json"
    name_map.write_text(json.dumps({"enc/kernel": "encoder/w", "mask": None}))
    expected = {("encoder/w" if k == "enc/kernel" else k): v for k, v in mixed.items()}
    del expected["mask"]
    for source in (single, hf):
        prefix = str(tmp_path / f"out-{source.stem}")
        argv = ["convert", str(source), prefix, "--budget-mib", "1", "--shards", "3", "-q"]
        assert main([*argv, "--name-map", str(name_map)]) == 0
        reader = tf.train.load_checkpoint(prefix)
        assert set(reader.get_variable_to_dtype_map()) == set(expected)
        for name, value in expected.items():
            assert _same(np.asarray(reader.get_tensor(name)), value), name
        assert reader.get_tensor("encoder/w").dtype == ml_dtypes.bfloat16


def test_a_tf_source_damaged_midway_leaves_no_checkpoint(tmp_path: Path) -> None:
    """The later tensor's read fails its checksum: exit 3, and nothing at DST."""
    src = str(tmp_path / "src")
    values = {f"t{i}": np.full(MiB // 4, i, np.float32) for i in range(6)}
    streamckpt.sync.save(src, values)
    with streamckpt.sync.open(src) as reader:
        last = max(reader.entries.values(), key=lambda e: e.offset)
    shard = Path(f"{src}.data-00000-of-00001")
    data = bytearray(shard.read_bytes())
    data[last.offset + 100] ^= 0xFF
    shard.write_bytes(bytes(data))
    out = tmp_path / "out"
    out.mkdir()
    assert main(["convert", src, str(out / "ckpt"), "--budget-mib", "1", "-q"]) == 3
    assert list(out.iterdir()) == []


def test_a_safetensors_source_cut_short_midway_leaves_no_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file loses its tail after the first tensor was streamed: exit 3, nothing at DST."""
    single = tmp_path / "model.safetensors"
    safetensors.numpy.save_file(
        {f"t{i}": np.full(MiB // 4, i, np.float32) for i in range(6)}, single
    )
    fetch = formats.SafetensorsSource.fetch
    fetched: list[str] = []

    def cut_after_first(source: formats.SafetensorsSource, name: str) -> np.ndarray:
        if len(fetched) == 1:
            with open(single, "r+b") as stream:
                stream.truncate(single.stat().st_size - 1000)
        fetched.append(name)
        return fetch(source, name)

    monkeypatch.setattr(formats.SafetensorsSource, "fetch", cut_after_first)
    out = tmp_path / "out"
    out.mkdir()
    assert main(["convert", str(single), str(out / "ckpt"), "--budget-mib", "1", "-q"]) == 3
    assert len(fetched) > 1 and list(out.iterdir()) == []


class _Fetches:
    """Deferred values of ``arrays`` that count their fetches and the fetched arrays alive."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.arrays = arrays
        self.calls: dict[str, int] = dict.fromkeys(arrays, 0)
        self.alive = 0
        self.most_alive = 0
        self.lock = threading.Lock()

    def fetch(self, name: str) -> np.ndarray:
        fresh = self.arrays[name].copy()  # the source's own memory, as a read gives
        with self.lock:
            self.calls[name] += 1
            self.alive += 1
            self.most_alive = max(self.most_alive, self.alive)
        weakref.finalize(fresh, self.freed)
        return fresh

    def freed(self) -> None:
        with self.lock:
            self.alive -= 1

    def values(self) -> dict[str, streamckpt.Deferred]:
        return {
            name: streamckpt.Deferred(a.shape, a.dtype, lambda n=name: self.fetch(n))
            for name, a in self.arrays.items()
        }


def test_deferred_values_are_fetched_once_and_saved_byte_for_byte(
    mixed: dict[str, np.ndarray], tmp_path: Path
) -> None:
    fetches = _Fetches(mixed)
    info = streamckpt.sync.save(str(tmp_path / "ckpt"), fetches.values(), num_shards=2)
    assert info.num_tensors == len(mixed)
    assert fetches.calls == dict.fromkeys(mixed, 1)
    loaded = streamckpt.sync.load(str(tmp_path / "ckpt"))
    assert all(_same(loaded[k], v) for k, v in mixed.items())


def test_fetched_arrays_alive_at_once_stay_within_max_inflight_bytes(tmp_path: Path) -> None:
    """Eight shards streamed side by side, yet no more than two 1 MiB tensors fetched at once.

    Each is dropped once written: without the budget, every shard thread would hold its own.
    """
    arrays = {f"t{i:02d}": np.full(MiB // 4, i, np.float32) for i in range(32)}
    fetches = _Fetches(arrays)
    streamckpt.sync.save(
        str(tmp_path / "ckpt"), fetches.values(), num_shards=8, max_inflight_bytes=2 * MiB
    )
    assert fetches.calls == dict.fromkeys(arrays, 1)
    assert fetches.alive == 0 and 1 <= fetches.most_alive <= 2


@pytest.mark.parametrize(
    "wrong", [np.zeros((2, 4), np.float32), np.zeros((2, 3), np.float64)], ids=["shape", "dtype"]
)
def test_a_fetch_of_the_wrong_shape_or_dtype_fails_naming_the_tensor(
    wrong: np.ndarray, tmp_path: Path
) -> None:
    values = {
        "fine": np.ones(3, np.float32),
        "liar": streamckpt.Deferred((2, 3), np.float32, lambda: wrong),
    }
    with pytest.raises(streamckpt.NamingError, match="promised float32") as caught:
        streamckpt.sync.save(str(tmp_path / "ckpt"), values)
    assert caught.value.tensor == "liar"
    assert list(tmp_path.iterdir()) == []  # the save removed what it wrote


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss in KiB is Linux's")
def test_a_tensor_larger_than_the_budget_goes_to_safetensors_in_rows(tmp_path: Path) -> None:
    """One 96 MiB tensor through an 8 MiB budget, from TF and from safetensors.

    Reading it whole adds at least its 96 MiB to the peak; in blocks of rows a few MiB.
    """
    rng = np.random.default_rng(2)
    big = rng.standard_normal((3 * 1024, 8192), dtype=np.float32)  # 96 MiB, 32 KiB rows
    values = {"big": big, "small": np.arange(5, dtype=np.int64)}
    src = str(tmp_path / "src")
    streamckpt.sync.save(src, values)
    safetensors.numpy.save_file(values, tmp_path / "src.safetensors")
    del big
    tiny = tmp_path / "tiny.safetensors"
    safetensors.numpy.save_file({"a": np.ones(4, np.float32)}, tiny)
    baseline = _peak_mib("convert", str(tiny), str(tmp_path / "tiny.out.safetensors"), "-q")
    budget = ("--budget-mib", "8", "-q")
    peaks = {
        "tf": _peak_mib("convert", src, str(tmp_path / "a.safetensors"), *budget),
        "safetensors": _peak_mib(
            "convert", str(tmp_path / "src.safetensors"), str(tmp_path / "hf") + "/", *budget
        ),
    }
    extra = {kind: peak - baseline for kind, peak in peaks.items()}
    print(f"peak RSS above a tiny convert ({baseline:.0f} MiB):", extra)
    assert all(mib < 48 for mib in extra.values()), (baseline, extra)
    out = safetensors.numpy.load_file(tmp_path / "a.safetensors")
    assert all(_same(out[k], v) for k, v in values.items())
    hf_files = sorted((tmp_path / "hf").glob("model-*.safetensors"))
    merged: dict[str, np.ndarray] = {}
    for file in hf_files:
        merged.update(safetensors.numpy.load_file(file))
    assert all(_same(merged[k], v) for k, v in values.items())


@pytest.mark.parametrize("kind", ["tf", "safetensors"])
def test_rows_are_read_exactly(tmp_path: Path, kind: str) -> None:
    """``read_rows`` of each source gives the rows ``fetch`` would, for every block size."""
    value = np.arange(7 * 3 * 2, dtype=np.float32).reshape(7, 3, 2)
    if kind == "tf":
        streamckpt.sync.save(str(tmp_path / "c"), {"v": value})

        async def rows() -> list[np.ndarray]:
            async with streamckpt.open(str(tmp_path / "c")) as reader:
                source = formats.CheckpointSource(reader)
                return [await source.read_rows("v", a, min(7, a + 3)) for a in range(0, 7, 3)]

    else:
        safetensors.numpy.save_file({"v": value}, tmp_path / "c.safetensors")
        source = formats.SafetensorsSource(
            fsspec.filesystem("file"), [str(tmp_path / "c.safetensors")]
        )

        async def rows() -> list[np.ndarray]:
            return [await source.read_rows("v", a, min(7, a + 3)) for a in range(0, 7, 3)]

    blocks = anyio.run(rows)
    assert _same(np.concatenate(blocks), value)
