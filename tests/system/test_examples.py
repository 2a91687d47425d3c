"""The README's recipes, run as the scripts a user would run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

import streamckpt.sync

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def final_weights(output: str) -> str:
    return next(line for line in output.splitlines() if line.startswith("final weights"))


def test_training_loop_resumes_after_preemption(tmp_path: Path) -> None:
    straight = run("train_loop.py", "--dir", str(tmp_path / "a"), "--steps", "150")
    assert straight.returncode == 0, straight.stderr

    directory = str(tmp_path / "b")
    killed = run("train_loop.py", "--dir", directory, "--steps", "150", "--preempt-at", "90")
    assert killed.returncode == 137 and "preempted at step 90" in killed.stdout
    # Saves run in the background: the one of step 75 may still have been in flight when the
    # process died, and then it was never published; either way nothing half-written counts.
    latest = streamckpt.sync.latest_checkpoint(directory)
    assert latest in (f"{directory}/ckpt-50", f"{directory}/ckpt-75")
    resumed = run("train_loop.py", "--dir", directory, "--steps", "150")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {latest} at step {latest.rsplit('-', 1)[1]}" in resumed.stdout
    # bit-for-bit the same model as the run that was never interrupted
    assert final_weights(resumed.stdout) == final_weights(straight.stdout)

    kept = sorted(p.name for p in Path(directory).glob("*.index"))
    assert kept == ["ckpt-100.index", "ckpt-125.index", "ckpt-150.index"]
    restored = streamckpt.sync.load_nested(f"{directory}/ckpt-150")
    assert restored["step"].item() == 150
    assert restored["model"]["weights"].shape == (16, 1)


def test_training_loop_keeps_the_best_checkpoint(tmp_path: Path) -> None:
    """With a metric that is best early, the best one survives max_to_keep."""
    directory = str(tmp_path / "c")
    model = {"w": np.zeros(3)}
    ckpt = streamckpt.sync.Checkpoint(model=model)
    manager = streamckpt.sync.CheckpointManager(
        ckpt, directory, max_to_keep=3, best_metric="loss", keep_best=1
    )
    for step, loss in enumerate([5.0, 0.5, 3.0, 4.0, 2.0, 6.0], start=1):
        model["w"][:] = step
        manager.save(step=step, metrics={"loss": loss})
    ckpt.close()
    kept = sorted(int(Path(p).name.split("-")[1]) for p in manager.checkpoints)
    assert kept == [2, 4, 5, 6]  # the 3 newest + the best (step 2, loss 0.5)


def test_service_reads_rows(tmp_path: Path) -> None:
    result = run("serve_tensor.py", "--demo", str(tmp_path / "ckpt-1"), "emb/table", "3", "42")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "first lookup: 2 request(s)"  # index tail (whole index) + the row
    assert lines[1] == "3 " + str([float(x) for x in range(24, 32)])
    assert lines[2] == "42 " + str([float(x) for x in range(336, 344)])
