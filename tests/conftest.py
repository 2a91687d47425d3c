"""Shared fixtures: the anyio backend and the stores.

``store`` runs a test against every backend streamckpt supports: local disk, ``memory://``,
fake-gcs-server (GCS), moto_server (S3) and SeaweedFS (S3). The servers are real processes on
127.0.0.1, started once per session on first use and stopped at the end, also on failure.
"""

from __future__ import annotations

import contextlib
import gc
import uuid
from collections.abc import Iterator
from pathlib import Path

# Imported first: it sets the gcsfs environment before anything imports gcsfs.
import streamckpt.testing.servers  # noqa: F401  # isort: skip
import pytest
from support import BUCKET, STORE_KINDS, Servers, StoreUnderTest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def servers() -> Iterator[Servers]:
    registry = Servers()
    try:
        yield registry
    finally:
        registry.close()


@pytest.fixture(params=STORE_KINDS)
def store(
    request: pytest.FixtureRequest, tmp_path: Path, servers: Servers
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
