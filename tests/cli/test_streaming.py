"""``cp``, ``verify`` and ``diff`` hold about ``--budget-mib``, whatever the checkpoint's size.

The memory tests run the real command in a child process and read its peak RSS: a command
that held the whole checkpoint (or its largest tensor) would exceed the bound they check.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from support.peak import peak_mib

import streamckpt
import streamckpt.sync
from streamckpt.cli.checking import blocks
from streamckpt.pipeline.bytewise import plan_ranges

MiB = 1 << 20
CLI = [sys.executable, "-m", "streamckpt.cli"]


def _files(prefix: str) -> dict[str, bytes]:
    folder, name = Path(prefix).parent, Path(prefix).name
    return {p.name[len(name) :]: p.read_bytes() for p in folder.glob(f"{name}.*")}


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *argv], capture_output=True, text=True, timeout=120, check=False)


def test_cp_keeps_every_file_byte_for_byte(small_checkpoint: str, tmp_path: Path) -> None:
    dst = str(tmp_path / "copy")
    result = _cli("cp", small_checkpoint, dst, "--budget-mib", "1", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["shards"] == 2
    assert _files(dst) == _files(small_checkpoint)


def test_cp_reshards_partitioned_tensors_and_strings(tmp_path: Path) -> None:
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    full = np.arange(600, dtype=np.float64).reshape(20, 30)
    pieces = [
        streamckpt.Slice(full[:7], full_shape=(20, 30), offset=(0, 0)),
        streamckpt.Slice(full[7:], full_shape=(20, 30), offset=(7, 0)),
    ]
    strings = np.array([b"a", b"", b"x" * 1000], dtype=object)
    streamckpt.sync.save(src, {"p": pieces, "s": strings, "w": np.ones(5000, np.float32)})
    result = _cli("cp", src, dst, "--shards", "3", "--budget-mib", "1")
    assert result.returncode == 0, result.stderr
    loaded = streamckpt.sync.load(dst)
    np.testing.assert_array_equal(loaded["p"], full)
    assert list(loaded["s"]) == list(strings)
    with streamckpt.sync.open(dst) as reader:
        assert reader.header.num_shards == 3 and reader.entries["p"].is_partitioned


def _damage(prefix: str, tmp_path: Path, name: str, at: int) -> str:
    """A copy of ``prefix`` with one byte of tensor ``name`` flipped, ``at`` bytes in."""
    copy = tmp_path / "damaged" / "ckpt"
    copy.parent.mkdir()
    for suffix, data in _files(prefix).items():
        (copy.parent / f"ckpt{suffix}").write_bytes(data)
    with streamckpt.sync.open(prefix) as reader:
        info, shards = reader.entries[name], reader.header.num_shards
    shard = copy.parent / f"ckpt.data-{info.shard:05d}-of-{shards:05d}"
    data = bytearray(shard.read_bytes())
    data[info.offset + at] ^= 0xFF
    shard.write_bytes(bytes(data))
    return str(copy)


def test_cp_of_a_damaged_source_leaves_nothing_behind(tmp_path: Path) -> None:
    src = str(tmp_path / "src")
    streamckpt.sync.save(src, {"big": np.ones((1024, 1024), np.float32), "b": np.zeros(3)})
    damaged = _damage(src, tmp_path, "big", 3 * MiB)  # in the last of eight 512 KiB reads
    out = tmp_path / "out"
    result = _cli("cp", damaged, str(out / "ckpt"), "--budget-mib", "1")
    assert result.returncode == 3 and "ChecksumError" in result.stderr
    assert "big" in result.stderr
    assert not list(out.glob("ckpt*"))  # no index, no data file
    assert _cli("cp", src, str(out / "ckpt")).returncode == 0
    again = _cli("cp", src, str(out / "ckpt"))
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert _cli("cp", src, str(out / "ckpt"), "--overwrite").returncode == 0


def test_verify_checks_a_tensor_larger_than_the_budget_chunk_by_chunk(tmp_path: Path) -> None:
    src = str(tmp_path / "src")
    big = np.random.default_rng(0).standard_normal((1024, 1024), dtype=np.float32)  # 4 MiB
    streamckpt.sync.save(src, {"big": big, "small": np.arange(10)})
    assert _cli("verify", src, "--budget-mib", "1").returncode == 0
    damaged = _damage(src, tmp_path, "big", 3 * MiB + 5)  # in its last chunk
    result = _cli("verify", damaged, "--budget-mib", "1", "--json")
    assert result.returncode == 1
    (failure,) = json.loads(result.stdout)["failures"]
    assert failure["name"] == "big" and failure["error"] == "ChecksumError"


def test_diff_compares_a_tensor_larger_than_the_budget_block_by_block(tmp_path: Path) -> None:
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    values = np.zeros((2, 1024, 1024), np.float32)  # 8 MiB, blocks of rows of 512 KiB
    streamckpt.sync.save(a, {"x": values})
    values[1, 1023, 1023] = 2.0
    values[0, 0, 0] = -1.0
    streamckpt.sync.save(b, {"x": values})
    result = _cli("diff", a, b, "--budget-mib", "1", "--json")
    assert result.returncode == 1
    (row,) = json.loads(result.stdout)["tensors"]
    assert (row["differing"], row["elements"], row["max_abs"]) == (2, 2 * 1024 * 1024, 2.0)


def test_blocks_tile_a_shape_in_order() -> None:
    def covered(shape: tuple[int, ...], limit: int) -> np.ndarray:
        seen = np.zeros(shape, np.int64)
        for number, index in enumerate(blocks(shape, 4, limit), start=1):
            assert seen[index].size * 4 <= max(limit, 4)
            assert not seen[index].any()
            seen[index] = number
        return seen

    order = covered((5, 3, 7), 4 * 7 * 2)  # rows of 28 bytes: a run of 2 of the 3 rows
    assert order.min() == 1 and np.all(np.diff(order.reshape(-1)) >= 0)
    assert covered((3, 100), 40).max() == 30  # a row does not fit: runs of 10 elements
    assert covered((4, 4), 1).max() == 16  # single elements
    assert list(blocks((4, 4), 4, 1000)) == [()]  # whole


def test_plan_ranges_share_reads_and_cut_large_entries() -> None:
    from streamckpt.format.bundle import BundleEntry
    from streamckpt.format.dtypes import DataType

    def entry(offset: int, size: int, dtype: DataType = DataType.DT_UINT8) -> BundleEntry:
        return BundleEntry(dtype=dtype, shape=(size,), offset=offset, size=size)

    entries = [(b"a", entry(0, 3)), (b"b", entry(3, 10)), (b"c", entry(13, 2))]
    ranges = plan_ranges(entries, chunk=4)
    assert [(r.start, r.end) for r in ranges] == [(0, 3), (3, 7), (7, 11), (11, 15)]
    assert [(p.key, p.start, p.end, p.last) for p in ranges[-1].parts] == [
        (b"b", 11, 13, True),
        (b"c", 13, 15, True),
    ]
    strings = [(b"s", entry(0, 10, DataType.DT_STRING))]
    assert [(r.start, r.end) for r in plan_ranges(strings, chunk=4)] == [(0, 10)]


def _peak_mib(*argv: str) -> float:
    return peak_mib(*CLI, *argv)


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss in KiB is Linux's")
def test_peak_memory_stays_near_the_budget_not_the_checkpoint(tmp_path: Path) -> None:
    """192 MiB, two thirds of it one tensor, through a 32 MiB budget.

    Holding the checkpoint would add 192 MiB to the interpreter's own peak (``ls``, which
    imports as much and reads no tensor data); holding the largest tensor, 128 MiB.
    """
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    rng = np.random.default_rng(0)
    values = {"big": rng.standard_normal((128, 256 * 1024), dtype=np.float32)}
    values.update({f"w/{i:02d}": np.full(MiB // 4, i, np.float32) for i in range(64)})
    streamckpt.sync.save(src, values, num_shards=2)
    del values
    baseline = _peak_mib("ls", src)
    budget = ("--budget-mib", "32")
    peaks = {
        "cp": _peak_mib("cp", src, dst, *budget) - baseline,
        "verify": _peak_mib("verify", src, *budget) - baseline,
        "diff": _peak_mib("diff", src, dst, *budget) - baseline,
    }
    print(f"peak RSS above ls ({baseline:.0f} MiB):", peaks)
    assert all(extra < 80 for extra in peaks.values()), (baseline, peaks)
