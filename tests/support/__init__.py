"""What the tests share: where the golden files live, the object-store servers, and the
``StoreUnderTest`` handle every store-parametrised test receives.

The servers themselves (``streamckpt.testing.servers``) and the fault proxy
(``streamckpt.testing.faultproxy``) live in the package, so the benchmarks use them without
importing from ``tests/``.
"""

from __future__ import annotations

import contextlib
import gc
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamckpt.testing.servers import ObjectStoreServer, run_fake_gcs, run_moto, run_seaweedfs

DATA = Path(__file__).resolve().parent.parent / "data"
TF_FIXTURES = DATA / "tf"
STORE_KINDS = ("local", "memory", "gcs", "moto", "seaweedfs")
BUCKET = "streamckpt-tests"


def load_manifest() -> dict[str, Any]:
    """The exact contents of the TensorFlow-written golden checkpoints."""
    with open(TF_FIXTURES / "manifest.json") as f:
        manifest: dict[str, Any] = json.load(f)
    return manifest


class Servers:
    """Starts each server on first use; the session fixture closes them all."""

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()
        self._running: dict[str, ObjectStoreServer] = {}

    def get(self, kind: str) -> ObjectStoreServer:
        if kind not in self._running:
            runner = {"gcs": run_fake_gcs, "moto": run_moto, "seaweedfs": run_seaweedfs}[kind]
            server = self._stack.enter_context(runner())
            server.create_bucket(BUCKET)
            self._running[kind] = server
        return self._running[kind]

    def close(self) -> None:
        gc.collect()  # collect s3fs clients while no test loop runs (see servers)
        self._stack.close()


@dataclass
class StoreUnderTest:
    """Where a test writes: a prefix base for checkpoints and the options to reach it."""

    kind: str
    base: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    server: ObjectStoreServer | None = None

    def prefix(self, name: str) -> str:
        return f"{self.base}/{name}"

    def filesystem(self) -> Any:
        """A separate client on the same store, to look at what a test left behind."""
        import fsspec

        if self.server is not None:
            return self.server.filesystem()
        return fsspec.filesystem("memory" if self.kind == "memory" else "file")

    def strip(self, path: str) -> str:
        return path.split("://", 1)[1] if "://" in path else path
