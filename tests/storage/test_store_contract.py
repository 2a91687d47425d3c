"""The Store contract (``streamckpt.testing.store.StoreTests``) on every store streamckpt has:
local disk, memory://, GCS (fake-gcs-server), S3 (moto and SeaweedFS). Real servers on
127.0.0.1, no mocks.

Each class picks one kind of the ``store`` fixture (conftest.py), which makes an empty base per
test; the stores come from ``resolve`` with a 4 MiB budget, so that reads and uploads run in
parts (1 MiB reads; uploads of 1 MiB on GCS, 5 MiB on S3) on objects of a few MiB.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import pytest

# The suite's asserts live in the package: rewritten, they say what differed.
pytest.register_assert_rewrite("streamckpt.testing.store")

from support import StoreUnderTest  # noqa: E402

from streamckpt.storage import Store, resolve  # noqa: E402
from streamckpt.testing.store import StoreFactory, StoreTests  # noqa: E402

BUDGET = 4 << 20

RANGE_416 = (
    "a range that starts at or after the object's end: the server answers 416, which "
    "FsspecStore.read_range maps to StorageError; check_length's TruncatedError is never reached"
)


class _ConftestStore(StoreTests):
    @pytest.fixture
    def store_factory(self, store: StoreUnderTest) -> StoreFactory:
        def fresh() -> tuple[Store, str]:
            return resolve(
                store.base, storage_options=store.storage_options, max_inflight_bytes=BUDGET
            )

        return fresh


@pytest.mark.parametrize("store", ["local"], indirect=True)
class TestLocalStore(_ConftestStore):
    known_failures: ClassVar[Mapping[str, str]] = {
        "test_writer_counts_bytes_written": (
            "LocalShardWriter.write never updates bytes_written (it stays 0): it counts into "
            "the store's stats only"
        ),
    }


@pytest.mark.parametrize("store", ["memory"], indirect=True)
class TestMemoryStore(_ConftestStore):
    pass


@pytest.mark.parametrize("store", ["gcs"], indirect=True)
class TestGcsStore(_ConftestStore):
    known_failures: ClassVar[Mapping[str, str]] = {
        "test_range_from_the_end": RANGE_416,
        "test_range_beyond_the_end": RANGE_416,
    }


@pytest.mark.parametrize("store", ["moto"], indirect=True)
class TestMotoStore(_ConftestStore):
    known_failures: ClassVar[Mapping[str, str]] = {
        "test_range_from_the_end": RANGE_416,
        "test_range_beyond_the_end": RANGE_416,
    }


@pytest.mark.parametrize("store", ["seaweedfs"], indirect=True)
class TestSeaweedfsStore(_ConftestStore):
    known_failures: ClassVar[Mapping[str, str]] = {
        "test_range_from_the_end": RANGE_416,
        "test_range_beyond_the_end": RANGE_416,
        "test_read_suffix_of_empty_object": (
            "SeaweedFS answers the suffix range 'bytes=-16' of an empty object with 416; "
            "FsspecStore.read_suffix maps it to StorageError instead of returning (b'', 0)"
        ),
        "test_list_dir_after_everything_deleted": (
            "SeaweedFS keeps a directory after its last object is deleted; s3fs then lists "
            "it as its own entry 'DIR/', which FsspecStore.list_dir returns as an object"
        ),
    }
