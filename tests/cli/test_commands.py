"""The commands in-process: their text, their JSON, their exit codes, and the help text."""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import streamckpt
import streamckpt.sync
from streamckpt.cli import build_parser, main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, object]:
    code, out, _ = run(capsys, *argv, "--json")
    return code, json.loads(out)  # one document, nothing else


def test_version_and_help_have_no_markup(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"streamckpt {streamckpt.__version__}"
    parser = build_parser()
    texts = [parser.format_help()]
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        texts.append(sub.format_help())
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
    assert "exit codes:" in texts[0] and "130" in texts[0]
    for text in texts:
        assert not re.search(r":(func|class|mod|meth):|``", text), text


def test_ls_prefix_filter_and_json(
    small_checkpoint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "ls", small_checkpoint)
    assert code == 0 and out.splitlines()[0].startswith("emb\tDT_FLOAT\t[128, 64]")
    code, out, _ = run(capsys, "ls", small_checkpoint + ".index", "--filter", "s*")
    assert [line.split("\t")[0] for line in out.splitlines()] == ["step"]
    code, document = run_json(capsys, "ls", small_checkpoint)
    assert isinstance(document, dict)
    assert {t["name"]: t["dtype"] for t in document["tensors"]} == {
        "emb": "DT_FLOAT",
        "half": "DT_BFLOAT16",
        "name": "DT_STRING",
        "step": "DT_INT64",
    }


def test_ls_directory_from_state_file_and_by_listing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = np.zeros(4, np.float32)
    ckpt = streamckpt.sync.Checkpoint(weights=weights)
    manager = streamckpt.sync.CheckpointManager(
        ckpt, tmp_path / "run", max_to_keep=2, best_metric="loss", keep_best=1
    )
    for step, loss in ((1, 0.5), (2, 0.1), (3, 0.3), (4, 0.4)):
        manager.save(step=step, metrics={"loss": loss})
    code, document = run_json(capsys, "ls", str(tmp_path / "run"), "--best", "loss")
    assert code == 0 and isinstance(document, dict)
    rows = {row["step"]: row for row in document["checkpoints"]}
    assert sorted(rows) == [2, 3, 4]  # 1 deleted; 2 kept as the best
    assert rows[4]["newest"] and not rows[3]["newest"]
    assert rows[2]["best"] and rows[2]["metrics"] == {"loss": 0.1}
    assert all(row["tensors"] and row["bytes"] > 0 and row["time"] for row in rows.values())
    code, out, _ = run(capsys, "ls", str(tmp_path / "run"))
    assert code == 0 and len(out.splitlines()) == 3 and "newest" in out.splitlines()[-1]
    # without --best: the manager's own rule, from its sidecar
    assert [line for line in out.splitlines() if "best" in line] == [out.splitlines()[0]]
    assert "step=2" in out.splitlines()[0]
    code, document = run_json(capsys, "ls", str(tmp_path / "run"))
    assert [row["step"] for row in document["checkpoints"] if row["best"]] == [2]

    # no state file: newest by listing
    plain = tmp_path / "plain"
    for step in (10, 20):
        streamckpt.sync.save(plain / f"model-{step}", {"x": np.ones(3)})
    code, document = run_json(capsys, "ls", str(plain))
    assert isinstance(document, dict)
    assert [(r["step"], r["newest"]) for r in document["checkpoints"]] == [(10, False), (20, True)]


def test_inspect_and_cat(small_checkpoint: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, document = run_json(capsys, "inspect", small_checkpoint)
    assert code == 0 and isinstance(document, dict) and document["num_tensors"] == 4
    assert run(capsys, "cat", small_checkpoint, "step")[1] == "1000\n"
    assert run(capsys, "cat", small_checkpoint, "name")[1] == "model\n"  # not b'..' or np.bytes_
    _, out, _ = run(capsys, "cat", small_checkpoint, "half")
    assert out == "[[0.         0.33398438 0.66796875]\n [1.         1.3359375  1.6640625 ]]\n"
    _, out, _ = run(capsys, "cat", small_checkpoint, "emb", "--index", "[0, 1:3]")
    expected = streamckpt.sync.read_tensor(small_checkpoint, "emb")[0, 1:3]
    assert out.strip() == str(expected)
    code, document = run_json(capsys, "cat", small_checkpoint, "half", "--index", "1")
    assert document == {
        "name": "half",
        "dtype": "DT_BFLOAT16",
        "shape": [3],
        "values": [1.0, 1.3359375, 1.6640625],
    }


def _damage(prefix: str, where: Path) -> str:
    source = Path(prefix)
    for path in source.parent.glob(source.name + ".*"):
        shutil.copy(path, where / path.name)
    copy = where / source.name
    with streamckpt.sync.open(str(copy)) as reader:
        emb, step = reader.entries["emb"], reader.entries["step"]
    for entry in (emb, step):
        shard = Path(f"{copy}.data-{entry.shard:05d}-of-00002")
        data = bytearray(shard.read_bytes())
        data[entry.offset] ^= 0xFF
        shard.write_bytes(bytes(data))
    return str(copy)


def test_verify_reports_every_failure(
    small_checkpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "verify", small_checkpoint)
    assert code == 0 and out.startswith("OK 4 tensors")
    damaged = _damage(small_checkpoint, tmp_path)
    code, document = run_json(capsys, "verify", damaged, "--budget-mib", "1")
    assert code == 1 and isinstance(document, dict) and not document["ok"]
    failures = {f["name"]: f for f in document["failures"]}
    assert set(failures) == {"emb", "step"}
    assert all(f["error"] == "ChecksumError" and "shard" in f for f in failures.values())


def test_diff_numbers_and_tolerances(
    small_checkpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    values = streamckpt.sync.load(small_checkpoint)
    values["emb"] = values["emb"].copy()
    values["emb"][0, :4] += np.float32(0.5)
    values["emb"][1, 0] = np.nan
    del values["step"]
    values["extra"] = np.zeros(2)
    other = str(tmp_path / "other")
    streamckpt.sync.save(other, values)
    code, out, _ = run(capsys, "diff", small_checkpoint, other)
    assert code == 1
    line = next(x for x in out.splitlines() if x.startswith("~ emb"))
    assert "differing=5/8192" in line and "max_abs=0.5" in line
    assert "- step" in out and "+ extra" in out
    code, document = run_json(capsys, "diff", small_checkpoint, other, "--atol", "1")
    assert isinstance(document, dict)
    emb = next(t for t in document["tensors"] if t["name"] == "emb")
    assert emb["differing"] == 1  # the NaN; the rest within atol
    assert run(capsys, "diff", small_checkpoint, small_checkpoint)[0] == 0


def test_cp_json(small_checkpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, document = run_json(capsys, "cp", small_checkpoint, str(tmp_path / "c"), "--shards", "3")
    assert code == 0 and isinstance(document, dict)
    assert document["tensors"] == 4 and document["shards"] == 3
    assert run(capsys, "diff", small_checkpoint, str(tmp_path / "c"))[0] == 0


def test_demo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "demo", "--size-mib", "4", "--shards", "2", "--dir", str(tmp_path))
    assert code == 0 and "saved" in out and "loaded all" in out and "ranged read" in out


def test_ls_directory_on_an_fsspec_url(capsys: pytest.CaptureFixture[str]) -> None:
    import uuid

    import fsspec

    base = f"memory://cli-{uuid.uuid4().hex}"
    try:
        for step in (5, 6):
            streamckpt.sync.save(f"{base}/ckpt-{step}", {"x": np.ones(3, np.float32)})
        code, document = run_json(capsys, "ls", base)
        assert code == 0 and isinstance(document, dict)
        rows = document["checkpoints"]
        assert [(r["step"], r["tensors"], r["newest"]) for r in rows] == [
            (5, 1, False),
            (6, 1, True),
        ]
        code, out, _ = run(capsys, "ls", f"{base}/ckpt-6")
        assert code == 0 and out.startswith("x\tDT_FLOAT\t[3]")
    finally:
        fsspec.filesystem("memory").rm(base.split("://", 1)[1], recursive=True)
