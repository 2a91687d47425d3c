"""``streamckpt --help`` starts without the heavy parts: argparse, and nothing of the pipeline.

Timing is left to people (see the report in issue 14); what is pinned here is what makes it
fast: the modules a ``--help`` imports.
"""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import contextlib, io, json, sys
from streamckpt.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    try:
        main(sys.argv[1:])
    except SystemExit:
        pass
print(json.dumps(sorted(sys.modules)))
"""

HEAVY = ("numpy", "anyio", "fsspec", "google.protobuf", "crc32c", "ml_dtypes", "rich")


def _imported(*argv: str) -> set[str]:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, check=True
    )
    return set(json.loads(result.stdout.splitlines()[-1]))


def test_help_imports_nothing_heavy() -> None:
    for argv in (["--help"], ["cp", "--help"], ["--version"]):
        modules = _imported(*argv)
        heavy = sorted(m for m in modules if m.split(".")[0] in HEAVY or m in HEAVY)
        ours = sorted(m for m in modules if m.startswith("streamckpt"))
        assert heavy == [], (argv, heavy)
        assert set(ours) <= {
            "streamckpt",
            "streamckpt.errors",
            "streamckpt.cli",
            "streamckpt.cli._args",
            "streamckpt.cli._output",
        }, (argv, ours)


def test_the_probe_sees_heavy_imports() -> None:
    """The check above can fail: a command that runs imports the pipeline, and it is seen."""
    modules = _imported("verify", "/nonexistent/ckpt")
    assert "numpy" in modules and "anyio" in modules
