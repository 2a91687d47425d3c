"""``python scripts/bench.py MODE [options]``: the benchmark package, ``python -m benchmarks``.

The benchmarks live in one package (``benchmarks/``, shared harness, one module per mode);
this script only runs it from anywhere, so ``scripts/bench.py table`` and
``python -m benchmarks table`` are the same run.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    runpy.run_module("benchmarks", run_name="__main__", alter_sys=True)
