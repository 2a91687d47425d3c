"""The Store contract (``streamckpt.testing.store.StoreTests``) on every store streamckpt has:
local disk, memory://, GCS (fake-gcs-server), S3 (moto and SeaweedFS). Real servers on
127.0.0.1, no mocks.

Each class names one kind of store and gets a fresh base for each test, on the session's
``servers``. The stores come from ``resolve`` with a 4 MiB budget, so that reads and uploads
run in parts (1 MiB reads; uploads of 1 MiB on GCS, 5 MiB on S3) on objects of a few MiB.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import ClassVar

import pytest

# The suite's asserts live in the package: rewritten, they say what differed.
pytest.register_assert_rewrite("streamckpt.testing.store")

from support import BUCKET, Servers, StoreUnderTest  # noqa: E402

from streamckpt.storage import Store, resolve  # noqa: E402
from streamckpt.testing.store import StoreFactory, StoreTests  # noqa: E402

BUDGET = 4 << 20


class _OnServers(StoreTests):
    """A fresh base per test on the session's servers (as conftest's ``store`` makes one).

    Without the ``store`` fixture's per-test moto reset and ``gc.collect()``: the bases are
    unique and ``resolve`` reuses one cached client per server, so neither is needed here,
    and together they cost most of the suite's time.
    """

    kind: ClassVar[str]

    @pytest.fixture
    def store_factory(self, servers: Servers, tmp_path: Path) -> Iterator[StoreFactory]:
        under_test = self.under_test(servers, tmp_path)

        def fresh() -> tuple[Store, str]:
            return resolve(
                under_test.base,
                storage_options=under_test.storage_options,
                max_inflight_bytes=BUDGET,
            )

        yield fresh
        if self.kind == "memory":
            with contextlib.suppress(FileNotFoundError):
                under_test.filesystem().rm(under_test.strip(under_test.base), recursive=True)

    def under_test(self, servers: Servers, tmp_path: Path) -> StoreUnderTest:
        if self.kind == "local":
            return StoreUnderTest(self.kind, str(tmp_path))
        if self.kind == "memory":
            return StoreUnderTest(self.kind, f"memory://streamckpt-{uuid.uuid4().hex}")
        server = servers.get(self.kind)
        base = f"{server.scheme}://{BUCKET}/{uuid.uuid4().hex}"
        return StoreUnderTest(self.kind, base, server.storage_options(), server)


class TestLocalStore(_OnServers):
    kind = "local"
    known_failures: ClassVar[Mapping[str, str]] = {}


class TestMemoryStore(_OnServers):
    kind = "memory"
    known_failures: ClassVar[Mapping[str, str]] = {}


class TestGcsStore(_OnServers):
    kind = "gcs"
    known_failures: ClassVar[Mapping[str, str]] = {}


class TestMotoStore(_OnServers):
    kind = "moto"
    known_failures: ClassVar[Mapping[str, str]] = {}


class TestSeaweedfsStore(_OnServers):
    kind = "seaweedfs"
    known_failures: ClassVar[Mapping[str, str]] = {}
