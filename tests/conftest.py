"""Shared fixtures: the anyio backend, the golden TensorFlow fixtures, and the stores.

``store`` runs a test against every backend streamckpt supports: local disk, ``memory://``,
fake-gcs-server (GCS), moto_server (S3) and SeaweedFS (S3). The servers are real processes on
127.0.0.1, started once per session on first use and stopped at the end, also on failure.
"""

from __future__ import annotations

import contextlib
import gc
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import objectstores  # noqa: F401 - sets the gcsfs environment before anything imports gcsfs
import pytest
from objectstores import ObjectStoreServer, run_fake_gcs, run_moto, run_seaweedfs

DATA = Path(__file__).parent / "data"
TF_FIXTURES = DATA / "tf"
STORE_KINDS = ("local", "memory", "gcs", "moto", "seaweedfs")
BUCKET = "streamckpt-tests"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def load_manifest() -> dict[str, Any]:
    with open(TF_FIXTURES / "manifest.json") as f:
        manifest: dict[str, Any] = json.load(f)
    return manifest


class _Servers:
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
        gc.collect()  # collect s3fs clients while no test loop runs (see objectstores)
        self._stack.close()


@pytest.fixture(scope="session")
def servers() -> Iterator[_Servers]:
    registry = _Servers()
    try:
        yield registry
    finally:
        registry.close()


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


@pytest.fixture(params=STORE_KINDS)
def store(
    request: pytest.FixtureRequest, tmp_path: Path, servers: _Servers
) -> Iterator[StoreUnderTest]:
    kind: str = request.param
    if kind == "local":
        yield StoreUnderTest(kind, str(tmp_path))
        return
    if kind == "memory":
        base = f"memory://streamckpt-{uuid.uuid4().hex}"
        yield StoreUnderTest(kind, base)
        import fsspec

        with contextlib.suppress(FileNotFoundError):
            fsspec.filesystem("memory").rm(base.split("://", 1)[1], recursive=True)
        return
    server = servers.get(kind)
    if kind == "moto":
        server.reset()  # moto's own reset endpoint between tests
        server.create_bucket(BUCKET)
    base = f"{server.scheme}://{BUCKET}/{uuid.uuid4().hex}"
    yield StoreUnderTest(kind, base, server.storage_options(), server)
    gc.collect()
