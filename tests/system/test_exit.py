"""Background saves are never lost at exit.

A training script that ends right after its last background save must still get that
checkpoint: the interpreter waits for it (end of script, ``sys.exit()``), exits non-zero with
the error on stderr if it failed, and a SIGTERM still ends the process at once, leaving a whole
checkpoint or none. Each case runs a real script in a subprocess.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import streamckpt.sync

SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import streamckpt.sync as sc

    kind, mib, use_with, ending, prefix = sys.argv[1:6]
    w = np.arange((int(mib) << 20) // 4, dtype=np.float32)
    ckpt = sc.Checkpoint(model={"w": w})

    def start():
        if kind == "checkpoint":
            return ckpt.save(prefix, blocking=False)
        manager = sc.CheckpointManager(ckpt, prefix, max_to_keep=2)
        return manager.save(step=7, blocking=False)

    if use_with == "with":
        with ckpt:
            handle = start()
    else:
        handle = start()
    w[:] = -1  # the snapshot was taken: later changes must not reach the checkpoint
    print("started", flush=True)
    if ending == "sys.exit":
        sys.exit(0)
    if ending == "after":  # the save is over before the script ends; nobody looks at it
        import time
        while not handle.done():
            time.sleep(0.01)
    """
)


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, timeout=timeout
    )


def _expected(mib: int) -> np.ndarray:
    return np.arange((mib << 20) // 4, dtype=np.float32)


def _saved_path(kind: str, prefix: Path) -> Path:
    return Path(f"{prefix}-1") if kind == "checkpoint" else prefix / "ckpt-7"


@pytest.mark.parametrize("kind", ["checkpoint", "manager"])
@pytest.mark.parametrize(
    ("mib", "use_with", "ending"),
    [
        (4, "with", "end"),
        (4, "plain", "end"),
        (64, "plain", "sys.exit"),
        (64, "with", "sys.exit"),
        (256, "plain", "end"),
        (256, "with", "sys.exit"),
    ],
)
def test_a_background_save_in_flight_at_exit_is_completed(
    tmp_path: Path, kind: str, mib: int, use_with: str, ending: str
) -> None:
    prefix = tmp_path / "run" if kind == "manager" else tmp_path / "ckpt"
    done = _run(kind, str(mib), use_with, ending, str(prefix))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "started"
    path = _saved_path(kind, prefix)
    loaded = streamckpt.sync.load(path)  # every crc32c checked
    np.testing.assert_array_equal(loaded["model/w/.ATTRIBUTES/VARIABLE_VALUE"], _expected(mib))
    if kind == "manager":
        assert streamckpt.sync.latest_checkpoint(prefix) == str(path)  # published too


@pytest.mark.parametrize("ending", ["end", "after"])
@pytest.mark.parametrize("kind", ["checkpoint", "manager"])
def test_a_background_save_that_fails_at_exit_makes_the_exit_status_1(
    tmp_path: Path, kind: str, ending: str
) -> None:
    """Also when it failed long before the end ("after"): a failure nobody saw is not lost."""
    prefix = tmp_path / "run" if kind == "manager" else tmp_path / "ckpt"
    # Something already committed under the name the save takes: it fails in the background.
    streamckpt.sync.save(_saved_path(kind, prefix), {"other": np.zeros(1)})
    done = _run(kind, "4", "plain", ending, str(prefix))
    assert done.returncode == 1, done.stderr
    assert done.stdout.strip() == "started"
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("streamckpt: background save") and "CheckpointExistsError" in last
    loaded = streamckpt.sync.load(_saved_path(kind, prefix))
    assert list(loaded) == ["other"]  # what was there is untouched


def test_a_failure_someone_looked_at_does_not_change_the_exit_status(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"x")
    script = textwrap.dedent(
        f"""
        import numpy as np
        import streamckpt.sync as sc
        ckpt = sc.Checkpoint(w=np.ones(4))
        handle = ckpt.save({str(blocker / "ckpt")!r}, blocking=False)
        try:
            handle.result()
        except OSError as exc:
            print("handled", type(exc).__name__)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("handled")


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.3])
def test_sigterm_during_a_background_save_ends_the_process_and_leaves_all_or_nothing(
    tmp_path: Path, delay: float
) -> None:
    prefix = tmp_path / "ckpt"
    child = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, "checkpoint", "256", "plain", "end", str(prefix)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    with child:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "started"
        time.sleep(delay)
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(timeout=60)
        finally:
            if child.poll() is None:
                child.kill()
    # The default action of SIGTERM ended it (unless the save had finished and it exited).
    assert child.returncode in (-signal.SIGTERM, 0)
    index = Path(f"{prefix}-1.index")
    if index.exists():
        loaded = streamckpt.sync.load(f"{prefix}-1")
        np.testing.assert_array_equal(loaded["model/w/.ATTRIBUTES/VARIABLE_VALUE"], _expected(256))
    else:
        assert not any(name.endswith(".index") for name in os.listdir(tmp_path))
