"""The peak memory of a command run in a child process (for the bounded-memory tests)."""

from __future__ import annotations

import subprocess
import sys

# Run by a middle process: the peak RSS of its children is the command's alone, not the
# test runner's (ru_maxrss of RUSAGE_CHILDREN covers waited-for descendants).
_PEAK = """
import resource, subprocess, sys
done = subprocess.run(sys.argv[1:], capture_output=True)
sys.stderr.buffer.write(done.stderr)
print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def peak_mib(*argv: str, timeout: float = 300) -> float:
    """Peak RSS in MiB of ``argv`` run to completion; it must exit 0 (Linux: KiB units)."""
    result = subprocess.run(
        [sys.executable, "-c", _PEAK, *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    code, kib = result.stdout.split()
    assert code == "0", result.stderr
    return int(kib) / 1024
