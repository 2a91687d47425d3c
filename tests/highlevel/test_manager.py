"""CheckpointManager: the state-file codec, retention, resume, and TensorFlow reading our files.

The checkpoint object is the real ``streamckpt.Checkpoint``; faults are injected by a thin
wrapper (``Faulty``) or by a proxy in front of a real fsspec filesystem (``CountingFS``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import fsspec
import numpy as np
import pytest
from google.protobuf import text_format
from hypothesis import given
from hypothesis import strategies as st
from support import TF_FIXTURES

import streamckpt
import streamckpt.sync
from streamckpt.checkpoint import Checkpoint
from streamckpt.errors import (
    CheckpointExistsError,
    CorruptCheckpointError,
    SaveInProgressError,
    StorageError,
)
from streamckpt.format.state import (
    CheckpointState,
    decode_metrics,
    decode_state,
    encode_metrics,
    encode_state,
)
from streamckpt.manager import (
    CheckpointManager,
    SkippedCheckpoint,
    SyncCheckpointManager,
    latest_checkpoint,
)
from streamckpt.proto import checkpoint_state_pb2
from streamckpt.retention import ManagedEntry, best_paths, plan_retention

pytestmark = pytest.mark.anyio

KEY = "{}/.ATTRIBUTES/VARIABLE_VALUE"


class Faulty:
    """A real Checkpoint behind the manager's protocol, with faults injected on request."""

    def __init__(self, inner: Checkpoint, *, num_shards: int = 1) -> None:
        self.inner = inner
        self.num_shards = num_shards
        self.gate: anyio.Event | None = None
        self.restore_error: BaseException | None = None
        self.restored: list[str] = []

    @property
    def save_counter(self) -> int:
        return self.inner.save_counter

    async def save(self, file_prefix: str, /, **kwargs: Any) -> str:
        if self.gate is not None:
            await self.gate.wait()
        return await self.inner.save(file_prefix, num_shards=self.num_shards, **kwargs)

    async def write(self, file_prefix: str, /, **kwargs: Any) -> str:
        return await self.inner.write(file_prefix, num_shards=self.num_shards, **kwargs)

    async def restore(self, save_path: str, /, **kwargs: Any) -> object:
        self.restored.append(save_path)
        if self.restore_error is not None:
            raise self.restore_error
        return await self.inner.restore(save_path, **kwargs)


class Clock:
    """An injected clock that tests move by hand."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class CountingFS:
    """A real fsspec filesystem behind a proxy that records each call that reaches storage."""

    _LOCAL = frozenset({"unstrip_protocol", "invalidate_cache"})

    def __init__(self, fs: Any) -> None:
        self._fs = fs
        self.calls: list[str] = []
        self.fail_writes_to: str | None = None
        self.fail_deletes = False

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._fs, name)
        if not callable(attr) or name.startswith("_") or name in self._LOCAL:
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            target = str(args[0]) if args else ""
            if self.fail_writes_to and name == "pipe_file" and target.endswith(self.fail_writes_to):
                raise OSError(5, "injected write failure")
            if self.fail_deletes and name == "rm_file":
                raise PermissionError(13, "injected: may not delete")
            return attr(*args, **kwargs)

        return counted


@pytest.fixture
def memory_root() -> Iterator[str]:
    root = f"memory://mgr-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


@pytest.fixture(params=["local", "memory"])
def directory(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "run")
    return str(request.getfixturevalue("memory_root")) + "/run"


def files_of(directory: str) -> set[str]:
    fs, path = fsspec.core.url_to_fs(directory)
    if not fs.exists(path):
        return set()
    fs.invalidate_cache(path)
    return {os.path.basename(p) for p in fs.ls(path, detail=False)}


def prefixes_on_disk(directory: str) -> set[str]:
    return {f[: -len(".index")] for f in files_of(directory) if f.endswith(".index")}


def read_bytes(path: str) -> bytes:
    with fsspec.open(path, "rb") as f:
        data: bytes = f.read()
    return data


# ---------------------------------------------------------------------------------------------
# The state-file codec.

paths = st.text(st.characters(exclude_categories=["Cs"]), max_size=20)
doubles = st.floats(allow_nan=False)


def to_proto(state: CheckpointState) -> Any:
    return checkpoint_state_pb2.CheckpointState(
        model_checkpoint_path=state.model_checkpoint_path,
        all_model_checkpoint_paths=state.all_model_checkpoint_paths,
        all_model_checkpoint_timestamps=state.all_model_checkpoint_timestamps,
        last_preserved_timestamp=state.last_preserved_timestamp,
    )


@given(
    model=paths.filter(bool),
    listed=st.lists(paths, max_size=4),
    stamps=st.lists(doubles | st.just(math.nan), max_size=4),
    preserved=doubles | st.sampled_from([0.0, -0.0, math.nan]),
)
def test_encode_is_protobufs_text_printer(
    model: str, listed: list[str], stamps: list[float], preserved: float
) -> None:
    state = CheckpointState(model, tuple(listed), tuple(stamps), preserved)
    encoded = encode_state(state)
    assert encoded == text_format.MessageToString(to_proto(state)).encode("utf-8")
    assert encode_state(decode_state(encoded)) == encoded


@given(model=paths.filter(bool), listed=st.lists(paths, max_size=4), stamp=doubles)
def test_decode_round_trips(model: str, listed: list[str], stamp: float) -> None:
    state = CheckpointState(model, tuple(listed), (stamp,) * len(listed), stamp)
    assert decode_state(encode_state(state)) == state


@pytest.mark.parametrize("name", ["manager", "object_basic"])
def test_golden_state_files_reencode_byte_for_byte(name: str) -> None:
    golden = (TF_FIXTURES / name / "checkpoint").read_bytes()
    assert encode_state(decode_state(golden)) == golden


def test_golden_manager_state() -> None:
    state = decode_state((TF_FIXTURES / "manager" / "checkpoint").read_bytes())
    assert state.model_checkpoint_path == "ckpt-3"
    assert state.all_model_checkpoint_paths == ("ckpt-2", "ckpt-3")
    assert len(state.all_model_checkpoint_timestamps) == 2
    assert state.last_preserved_timestamp < state.all_model_checkpoint_timestamps[0]


def test_encoding_details() -> None:
    state = CheckpointState("a\"b\\c'd é\n\x01", ("x",), (1e16, 1700000000.0), 5e-324)
    assert encode_state(state) == (
        b'model_checkpoint_path: "a\\"b\\\\c\\\'d \xc3\xa9\\n\\001"\n'
        b'all_model_checkpoint_paths: "x"\n'
        b"all_model_checkpoint_timestamps: 1e+16\n"
        b"all_model_checkpoint_timestamps: 1700000000.0\n"
        b"last_preserved_timestamp: 5e-324\n"
    )


def test_decode_tolerates_what_tf_accepts_and_unknown_fields() -> None:
    text = (
        b"# comment\nmodel_checkpoint_path: 'a' model_checkpoint_path: \"b\"\n"
        b"all_model_checkpoint_timestamps: [1, 2.5]\nfuture_field { x: 1 }\nother: 3\n"
    )
    assert decode_state(text) == CheckpointState("b", (), (1.0, 2.5), 0.0)


@pytest.mark.parametrize(
    "data", [b"", b"all_model_checkpoint_paths: 'x'\n", b"model_checkpoint_path: 3", b"\xff"]
)
def test_decode_rejects_unusable_state(data: bytes) -> None:
    with pytest.raises(CorruptCheckpointError):
        decode_state(data)


@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_decode_random_bytes_raises_only_our_error(data: bytes) -> None:
    with contextlib.suppress(CorruptCheckpointError):
        decode_state(data)


def test_metrics_sidecar_round_trip() -> None:
    metrics = {"ckpt-1": {"loss": 0.5, "acc": math.inf}, "ckpt-2": {}}
    assert decode_metrics(encode_metrics(metrics)) == metrics


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"[]",
        b'{"format": "other", "checkpoints": {}}',
        b'{"format": "streamckpt.checkpoint_metrics.v1"}',
        b'{"format": "streamckpt.checkpoint_metrics.v1", "checkpoints": {"a": {"m": "x"}}}',
        b'{"format": "streamckpt.checkpoint_metrics.v1", "checkpoints": {"a": {"m": true}}}',
        b'{"format": "streamckpt.checkpoint_metrics.v1", "checkpoints": {"a": {"m": 1'
        + b"0" * 400
        + b"}}}",
    ],
)
def test_metrics_sidecar_rejects_other_shapes(data: bytes) -> None:
    with pytest.raises(CorruptCheckpointError):
        decode_metrics(data)


# ---------------------------------------------------------------------------------------------
# The retention plan, without storage.


def entries(*stamps: float, metrics: list[float | None] | None = None) -> list[ManagedEntry]:
    values = metrics or [None] * len(stamps)
    return [
        ManagedEntry(f"ckpt-{i + 1}", t, None if m is None else {"loss": m})
        for i, (t, m) in enumerate(zip(stamps, values, strict=True))
    ]


def test_plan_keeps_newest_and_deletes_oldest_first() -> None:
    plan = plan_retention(
        entries(1, 2, 3, 4),
        max_to_keep=2,
        keep_checkpoint_every_n_hours=None,
        last_preserved_timestamp=0,
        protected=set(),
    )
    assert [e.path for e in plan.kept] == ["ckpt-3", "ckpt-4"]
    assert plan.deleted == ("ckpt-1", "ckpt-2")
    assert plan.preserved == ()


def test_plan_keep_all_when_max_to_keep_is_none() -> None:
    plan = plan_retention(
        entries(1, 2, 3),
        max_to_keep=None,
        keep_checkpoint_every_n_hours=1,
        last_preserved_timestamp=0,
        protected=set(),
    )
    assert len(plan.kept) == 3 and plan.deleted == () and plan.last_preserved_timestamp == 0


def test_plan_preserves_one_per_period() -> None:
    hour = 3600.0
    plan = plan_retention(
        entries(0.5 * hour, 1.0 * hour, 1.5 * hour, 2.5 * hour, 3.0 * hour),
        max_to_keep=1,
        keep_checkpoint_every_n_hours=1,
        last_preserved_timestamp=0,
        protected=set(),
    )
    assert plan.preserved == ("ckpt-2", "ckpt-4")
    assert plan.deleted == ("ckpt-1", "ckpt-3")
    assert plan.last_preserved_timestamp == 2.5 * hour


def test_best_paths_min_max_ties_and_nan() -> None:
    listed = entries(1, 2, 3, 4, 5, metrics=[0.5, None, 0.2, 0.2, math.nan])
    assert best_paths(listed, best_metric="loss", mode="min", keep_best=1) == {"ckpt-4"}
    assert best_paths(listed, best_metric="loss", mode="min", keep_best=2) == {"ckpt-3", "ckpt-4"}
    assert best_paths(listed, best_metric="loss", mode="max", keep_best=1) == {"ckpt-1"}
    assert best_paths(listed, best_metric=None, mode="min", keep_best=1) == set()


def test_plan_never_deletes_protected() -> None:
    plan = plan_retention(
        entries(1, 2, 3, 4),
        max_to_keep=1,
        keep_checkpoint_every_n_hours=None,
        last_preserved_timestamp=0,
        protected={"ckpt-2"},
    )
    assert [e.path for e in plan.kept] == ["ckpt-2", "ckpt-4"]
    assert plan.deleted == ("ckpt-1", "ckpt-3")


# ---------------------------------------------------------------------------------------------
# The manager on local disk and memory://.


async def test_save_names_publishes_and_keeps_max(directory: str) -> None:
    ckpt = Checkpoint(w=np.arange(3.0))
    manager = CheckpointManager(ckpt, directory, max_to_keep=2)
    with pytest.raises(RuntimeError, match="reload"):
        _ = manager.checkpoints
    saved = [await manager.save() for _ in range(4)]
    join = os.path.join if "://" not in directory else (lambda d, n: f"{d}/{n}")
    assert saved == [join(directory, f"ckpt-{n}") for n in (1, 2, 3, 4)]
    assert ckpt.save_counter == 4
    assert manager.checkpoints == saved[-2:]
    assert manager.latest_checkpoint == saved[-1]
    assert prefixes_on_disk(directory) == {"ckpt-3", "ckpt-4"}
    assert files_of(directory) == {
        "checkpoint",
        "ckpt-3.index",
        "ckpt-3.data-00000-of-00001",
        "ckpt-4.index",
        "ckpt-4.data-00000-of-00001",
    }
    state = decode_state(read_bytes(f"{directory}/checkpoint"))
    assert state.model_checkpoint_path == "ckpt-4"
    assert state.all_model_checkpoint_paths == ("ckpt-3", "ckpt-4")
    assert await latest_checkpoint(directory) == saved[-1]
    assert (await streamckpt.load(str(saved[-1])))[KEY.format("save_counter")] == 4
    assert "checkpoint.metrics.json" not in files_of(directory)  # no metrics, no sidecar


async def test_step_names_the_checkpoint(directory: str) -> None:
    ckpt = Checkpoint(w=np.zeros(2))
    manager = CheckpointManager(ckpt, directory, max_to_keep=None)
    assert (await manager.save() or "").endswith("ckpt-1")
    assert (await manager.save(step=100) or "").endswith("ckpt-100")
    # As TensorFlow's manager: a step names the checkpoint, save_counter still counts it.
    assert (await manager.save() or "").endswith("ckpt-3")
    assert ckpt.save_counter == 3
    assert [os.path.basename(p) for p in manager.checkpoints] == ["ckpt-1", "ckpt-100", "ckpt-3"]
    stepped = await streamckpt.load(f"{directory}/ckpt-100")
    assert int(stepped["save_counter/.ATTRIBUTES/VARIABLE_VALUE"]) == 2
    with pytest.raises(CheckpointExistsError):  # a name is never silently overwritten
        await manager.save(step=100)


async def test_multi_shard_checkpoints_are_deleted_whole(directory: str) -> None:
    sharded = Faulty(Checkpoint(a=np.ones(4), b=np.ones(5), c=np.ones(6)), num_shards=3)
    manager = CheckpointManager(sharded, directory, max_to_keep=1)
    await manager.save()
    await manager.save()
    assert {f for f in files_of(directory) if f.startswith("ckpt-1")} == set()
    assert len([f for f in files_of(directory) if f.startswith("ckpt-2.data")]) == 3


async def test_keep_every_n_hours_with_injected_clock(directory: str) -> None:
    clock = Clock()
    manager = CheckpointManager(
        Checkpoint(w=np.zeros(1)),
        directory,
        max_to_keep=2,
        keep_checkpoint_every_n_hours=1,
        clock=clock,
    )
    for _ in range(8):  # one save every 20 minutes
        await manager.save()
        clock.now += 1200
    # The manager started at T (last_preserved = T - 1); ckpt-k was saved at T + 1200 (k - 1).
    # Falling off the list, ckpt-4 (T + 3600) is the first an hour past T - 1 and is preserved;
    # ckpt-5 and ckpt-6 are within the hour after it and are deleted; 7 and 8 are the newest.
    assert prefixes_on_disk(directory) == {"ckpt-4", "ckpt-7", "ckpt-8"}
    assert [os.path.basename(p) for p in manager.checkpoints] == ["ckpt-7", "ckpt-8"]
    state = decode_state(read_bytes(f"{directory}/checkpoint"))
    assert state.last_preserved_timestamp == 1_700_000_000.0 + 3 * 1200


async def test_best_checkpoints_are_never_deleted(directory: str) -> None:
    losses = [0.9, 0.3, 0.5, 0.1, 0.7, 0.6, 0.8]
    manager = CheckpointManager(
        Checkpoint(w=np.zeros(1)), directory, max_to_keep=2, best_metric="loss", keep_best=2
    )
    for loss in losses:
        await manager.save(metrics={"loss": np.float32(loss)})
    # the two newest (6, 7) and the two best (4: 0.1, 2: 0.3)
    assert prefixes_on_disk(directory) == {"ckpt-2", "ckpt-4", "ckpt-6", "ckpt-7"}
    assert [os.path.basename(p) for p in manager.checkpoints] == [
        "ckpt-2",
        "ckpt-4",
        "ckpt-6",
        "ckpt-7",
    ]
    sidecar = decode_metrics(read_bytes(f"{directory}/checkpoint.metrics.json"))
    assert sidecar["ckpt-4"] == {"loss": pytest.approx(0.1)}

    # A new manager over the same directory keeps protecting them.
    resumed = Checkpoint(w=np.zeros(1))
    again = CheckpointManager(resumed, directory, max_to_keep=2, best_metric="loss", keep_best=2)
    assert (await again.restore_or_initialize() or "").endswith("ckpt-7")
    assert resumed.save_counter == 7
    await again.save(metrics={"loss": 0.2})  # ckpt-8 displaces ckpt-2 from the best two
    assert prefixes_on_disk(directory) == {"ckpt-4", "ckpt-7", "ckpt-8"}
    assert set(decode_metrics(read_bytes(f"{directory}/checkpoint.metrics.json"))) >= {
        "ckpt-4",
        "ckpt-8",
    }


async def test_mode_max(directory: str) -> None:
    manager = CheckpointManager(
        Checkpoint(w=np.zeros(1)), directory, max_to_keep=1, best_metric="acc", mode="max"
    )
    for acc in [0.5, 0.9, 0.7, 0.6]:
        await manager.save(metrics={"acc": acc})
    assert prefixes_on_disk(directory) == {"ckpt-2", "ckpt-4"}


async def test_failed_save_deletes_nothing(memory_root: str) -> None:
    counting = CountingFS(fsspec.filesystem("memory"))
    directory = f"{memory_root}/run"
    manager = CheckpointManager(
        Checkpoint(w=np.zeros(1)), directory, max_to_keep=1, filesystem=counting
    )
    await manager.save()
    before_files = files_of(directory)
    before_state = read_bytes(f"{directory}/checkpoint")
    counting.fail_writes_to = ".index"  # the commit of the new checkpoint fails
    with pytest.raises(StorageError, match="injected"):
        await manager.save()
    assert files_of(directory) == before_files  # ckpt-1 kept; the save cleaned its shards
    assert read_bytes(f"{directory}/checkpoint") == before_state
    assert [os.path.basename(p) for p in manager.checkpoints] == ["ckpt-1"]
    counting.fail_writes_to = None
    assert await manager.save() == f"{directory}/ckpt-3"  # as in TF, the failed one counted
    assert prefixes_on_disk(directory) == {"ckpt-3"}


async def test_failed_state_write_deletes_nothing(memory_root: str) -> None:
    counting = CountingFS(fsspec.filesystem("memory"))
    directory = f"{memory_root}/run"
    manager = CheckpointManager(
        Checkpoint(w=np.zeros(1)), directory, max_to_keep=1, filesystem=counting
    )
    await manager.save()
    counting.fail_writes_to = "/run/checkpoint"
    with pytest.raises(StorageError, match="injected"):
        await manager.save()
    # ckpt-2 is complete but unpublished; ckpt-1 is still the published one and still there
    assert prefixes_on_disk(directory) == {"ckpt-1", "ckpt-2"}
    assert await latest_checkpoint(directory) == f"{directory}/ckpt-1"
    assert [os.path.basename(p) for p in manager.checkpoints] == ["ckpt-1"]


async def test_failed_deletion_is_logged_not_raised(
    memory_root: str, caplog: pytest.LogCaptureFixture
) -> None:
    counting = CountingFS(fsspec.filesystem("memory"))
    directory = f"{memory_root}/run"
    manager = CheckpointManager(
        Checkpoint(w=np.zeros(1)), directory, max_to_keep=1, filesystem=counting
    )
    await manager.save()
    counting.fail_deletes = True
    with caplog.at_level(logging.WARNING, logger="streamckpt.manager"):
        assert await manager.save() == f"{directory}/ckpt-2"
    assert "could not delete" in caplog.text
    assert await latest_checkpoint(directory) == f"{directory}/ckpt-2"
    assert manager.checkpoints == [f"{directory}/ckpt-2"]
    assert "ckpt-1.index" in files_of(directory)
    # A new manager (a restarted job) finishes the deletion at its first sweep.
    counting.fail_deletes = False
    restarted = CheckpointManager(
        Checkpoint(w=np.zeros(1)), directory, max_to_keep=2, filesystem=counting
    )
    await restarted.restore_or_initialize()
    await restarted.save(step=10)
    assert sorted(n for n in files_of(directory) if n.startswith("ckpt-1.")) == []
    assert "checkpoint.deleting.json" not in files_of(directory)
    assert [p.rsplit("/", 1)[-1] for p in restarted.checkpoints] == ["ckpt-2", "ckpt-10"]


async def test_interval_with_step_counter(directory: str) -> None:
    step = [0]
    manager = CheckpointManager(
        Checkpoint(w=np.zeros(1)),
        directory,
        max_to_keep=None,
        checkpoint_interval=10,
        step_counter=lambda: step[0],
    )
    saved = []
    for step[0] in range(0, 35, 5):
        saved.append(await manager.save())
    assert [p is not None for p in saved] == [True, False, True, False, True, False, True]
    step[0] = 33
    assert await manager.save() is None
    assert await manager.save(force=True) is not None  # force overrides the interval
    assert await manager.save(force=True) is None  # but never saves one step twice
    assert len(manager.checkpoints) == 5


async def test_interval_needs_a_step(directory: str) -> None:
    manager = CheckpointManager(Checkpoint(), directory, checkpoint_interval=5)
    with pytest.raises(ValueError, match="step"):
        await manager.save()
    assert (await manager.save(step=5) or "").endswith("ckpt-5")
    assert await manager.save(step=7) is None
    assert (await manager.save(step=10) or "").endswith("ckpt-10")


def test_constructor_validates() -> None:
    for kwargs in (
        {"max_to_keep": 0},
        {"mode": "median"},
        {"keep_best": 0},
        {"checkpoint_interval": 0},
    ):
        with pytest.raises(ValueError):
            CheckpointManager(Checkpoint(), "unused", **kwargs)


async def test_restart_rebuilds_the_view(directory: str) -> None:
    clock = Clock()
    first = CheckpointManager(Checkpoint(w=np.zeros(1)), directory, max_to_keep=3, clock=clock)
    for _ in range(5):
        await first.save()
        clock.now += 10
    second = CheckpointManager(Checkpoint(w=np.zeros(1)), directory, max_to_keep=3, clock=clock)
    await second.reload()
    assert second.checkpoints == first.checkpoints
    assert second.latest_checkpoint == first.latest_checkpoint
    assert second._dir.entries == first._dir.entries  # timestamps included

    # Timestamps from the future are clamped to the clock, as TF does.
    clock.now -= 1000
    third = CheckpointManager(Checkpoint(), directory, max_to_keep=3, clock=clock)
    await third.reload()
    assert third.checkpoints == []  # clamped to now, and now <= last_preserved


async def test_restore_or_initialize_resumes(directory: str) -> None:
    ckpt = Checkpoint(w=np.zeros(2))
    manager = CheckpointManager(ckpt, directory)
    for i in range(3):
        ckpt.w = np.full(2, float(i))
        await manager.save()

    resumed = Checkpoint(w=np.zeros(2))
    again = CheckpointManager(resumed, directory)
    assert await again.restore_or_initialize() == manager.latest_checkpoint
    assert resumed.w.tolist() == [2.0, 2.0]
    assert resumed.save_counter == 3
    assert again.skipped == []
    assert (await again.save() or "").endswith("ckpt-4")


async def test_restore_or_initialize_runs_init_fn_when_empty(directory: str) -> None:
    called: list[str] = []

    async def init() -> None:
        called.append("init")

    manager = CheckpointManager(Checkpoint(), directory, init_fn=init)
    assert await manager.restore_or_initialize() is None
    assert called == ["init"]
    assert manager.latest_checkpoint is None


async def test_restore_skips_half_written_and_corrupt(
    directory: str, caplog: pytest.LogCaptureFixture
) -> None:
    ckpt = Checkpoint(w=np.zeros(3))
    manager = CheckpointManager(ckpt, directory, max_to_keep=None)
    for i in range(4):
        ckpt.w = np.full(3, float(i))
        await manager.save()
    fs, root = fsspec.core.url_to_fs(directory)
    # ckpt-5: an interrupted save, shards but no index.
    fs.pipe_file(f"{root}/ckpt-5.data-00000-of-00002", b"partial")
    # ckpt-4 (published, the latest): its index is corrupt.
    index = bytearray(fs.cat_file(f"{root}/ckpt-4.index"))
    index[10] ^= 0xFF  # inside the first data block: its crc32c no longer holds
    fs.pipe_file(f"{root}/ckpt-4.index", bytes(index))
    # ckpt-3: a data shard cut short; ckpt-2: a data shard gone.
    data = fs.cat_file(f"{root}/ckpt-3.data-00000-of-00001")
    fs.pipe_file(f"{root}/ckpt-3.data-00000-of-00001", data[:-4])
    fs.rm_file(f"{root}/ckpt-2.data-00000-of-00001")

    resumed = Faulty(Checkpoint(w=np.zeros(3)))
    again = CheckpointManager(resumed, directory, max_to_keep=None)
    with caplog.at_level(logging.WARNING, logger="streamckpt.manager"):
        restored = await again.restore_or_initialize()
    assert restored is not None and restored.endswith("ckpt-1")
    assert resumed.inner.w.tolist() == [0.0, 0.0, 0.0]
    assert resumed.restored == [restored]  # nothing broken was handed to restore
    skipped = {os.path.basename(s.path): s.reason for s in again.skipped}
    assert list(skipped) == ["ckpt-5", "ckpt-4", "ckpt-3", "ckpt-2"]
    assert skipped["ckpt-5"].startswith("no index")
    assert skipped["ckpt-4"].startswith("corrupt")
    assert "data shard 0" in skipped["ckpt-3"]
    assert skipped["ckpt-2"].startswith("missing")
    assert all(isinstance(s, SkippedCheckpoint) for s in again.skipped)
    assert all(f"ckpt-{n}:" in caplog.text for n in (2, 3, 4, 5))
    assert again.latest_checkpoint == restored
    assert again.checkpoints == [restored]

    # Training goes on from ckpt-1: the next saves reuse the broken names, cleanly.
    for n in (2, 3, 4, 5):
        assert (await again.save() or "").endswith(f"ckpt-{n}")
        assert await streamckpt.load(f"{directory}/ckpt-{n}")
    assert "ckpt-5.data-00000-of-00002" not in files_of(directory)


async def test_restore_falls_back_when_tensor_checksum_fails(directory: str) -> None:
    ckpt = Checkpoint(w=np.arange(4.0))
    manager = CheckpointManager(ckpt, directory)
    await manager.save()
    await manager.save()
    fs, root = fsspec.core.url_to_fs(directory)
    data = bytearray(fs.cat_file(f"{root}/ckpt-2.data-00000-of-00001"))
    data[0] ^= 1  # same size, so only the restore's crc32c check can tell
    fs.pipe_file(f"{root}/ckpt-2.data-00000-of-00001", bytes(data))
    again = CheckpointManager(Checkpoint(w=np.zeros(4)), directory)
    assert (await again.restore_or_initialize() or "").endswith("ckpt-1")
    assert again.skipped[0].reason.startswith("restore failed: corrupt")


async def test_restore_raises_storage_errors() -> None:
    flaky = Faulty(Checkpoint(w=np.ones(1)))
    flaky.restore_error = StorageError("injected: connection reset")
    root = f"memory://mgr-{uuid.uuid4().hex}/run"
    try:
        await CheckpointManager(Checkpoint(w=np.ones(1)), root).save()
        with pytest.raises(StorageError, match="injected"):
            await CheckpointManager(flaky, root).restore_or_initialize()
    finally:
        fsspec.filesystem("memory").rm(root, recursive=True)


async def test_latest_checkpoint_is_one_read(memory_root: str) -> None:
    directory = f"{memory_root}/run"
    await CheckpointManager(Checkpoint(w=np.ones(1)), directory).save()
    counting = CountingFS(fsspec.filesystem("memory"))
    found = await latest_checkpoint(directory, filesystem=counting)
    assert found == f"{directory}/ckpt-1"
    assert counting.calls == ["cat_file"]
    counting.calls.clear()
    assert await latest_checkpoint(f"{memory_root}/elsewhere", filesystem=counting) is None
    assert counting.calls == ["cat_file"]


async def test_latest_checkpoint_resolves_relative_and_keeps_absolute(tmp_path: Path) -> None:
    (tmp_path / "checkpoint").write_bytes(encode_state(CheckpointState("sub/ckpt-9")))
    assert await latest_checkpoint(tmp_path) == str(tmp_path / "sub" / "ckpt-9")
    elsewhere = str(tmp_path / "other" / "ckpt-1")
    (tmp_path / "checkpoint").write_bytes(encode_state(CheckpointState(elsewhere)))
    assert await latest_checkpoint(str(tmp_path)) == elsewhere
    (tmp_path / "checkpoint").write_bytes(b"garbage {")
    with pytest.raises(CorruptCheckpointError):
        await latest_checkpoint(tmp_path)


async def test_one_save_at_a_time(tmp_path: Path) -> None:
    slow = Faulty(Checkpoint(w=np.ones(1)))
    slow.gate = release = anyio.Event()
    manager = CheckpointManager(slow, tmp_path)
    await manager.reload()
    async with anyio.create_task_group() as tg:
        tg.start_soon(manager.save)
        await anyio.wait_all_tasks_blocked()
        with pytest.raises(SaveInProgressError):
            await manager.save()
        release.set()
    assert len(manager.checkpoints) == 1


def test_sync_manager(tmp_path: Path) -> None:
    ckpt = Checkpoint(w=np.arange(2.0))
    manager = SyncCheckpointManager(ckpt, tmp_path, max_to_keep=1)
    assert manager.checkpoints == [] and manager.latest_checkpoint is None
    manager.save()
    path = manager.save(step=7)
    assert manager.checkpoints == [path] and manager.directory == str(tmp_path)
    resumed = Checkpoint(w=np.zeros(2))
    again = SyncCheckpointManager(resumed, tmp_path)
    assert again.restore_or_initialize() == path
    assert resumed.w.tolist() == [0.0, 1.0] and again.skipped == []


def test_sync_manager_saves_in_the_background(tmp_path: Path) -> None:
    """Snapshot at the call, publish after the commit, retention after the publish."""
    weights = np.zeros(4)
    with Checkpoint(w=weights) as ckpt:
        manager = SyncCheckpointManager(
            ckpt, tmp_path, max_to_keep=2, checkpoint_interval=10, best_metric="loss"
        )
        handles = []
        for step, loss in ((10, 3.0), (15, 9.0), (20, 1.0), (30, 2.0), (40, 5.0)):
            weights[:] = step
            handle = manager.save(step=step, metrics={"loss": loss}, blocking=False)
            weights[:] = -1  # changed at once: the snapshot was taken
            if step == 15:
                assert handle is None  # the interval says not yet
                continue
            assert handle is not None
            handles.append(handle)
        assert [h.result() for h in handles] == [f"{tmp_path}/ckpt-{n}" for n in (10, 20, 30, 40)]
        # max_to_keep 2 plus the best (loss 1.0 at step 20), deleted only once superseded
        assert manager.checkpoints == [f"{tmp_path}/ckpt-{n}" for n in (20, 30, 40)]
        assert streamckpt.sync.latest_checkpoint(tmp_path) == f"{tmp_path}/ckpt-40"
        assert not any(p.name.startswith("ckpt-10.") for p in tmp_path.iterdir())
        for step in (20, 30, 40):
            loaded = streamckpt.sync.load(f"{tmp_path}/ckpt-{step}")
            assert loaded[KEY.format("w")].tolist() == [float(step)] * 4


def test_background_save_is_published_only_after_its_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Checkpoint(w=np.arange(3.0)) as ckpt:
        manager = SyncCheckpointManager(ckpt, tmp_path)
        first = manager.save()
        release = threading.Event()
        real_save = streamckpt.api.save

        async def held_save(*args: Any, **kwargs: Any) -> Any:
            await anyio.to_thread.run_sync(release.wait, 30)
            return await real_save(*args, **kwargs)

        monkeypatch.setattr(streamckpt.api, "save", held_save)
        handle = manager.save(blocking=False)
        assert handle is not None and not handle.done()
        assert (
            streamckpt.sync.latest_checkpoint(tmp_path) == first
        )  # nothing published while it runs
        monkeypatch.setattr(streamckpt.api, "save", real_save)
        release.set()
        assert manager.save() == f"{tmp_path}/ckpt-3"  # waits for the one in flight
        assert handle.result() == f"{tmp_path}/ckpt-2"
        assert manager.checkpoints[-2:] == [f"{tmp_path}/ckpt-2", f"{tmp_path}/ckpt-3"]


def test_failed_background_save_publishes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Checkpoint(w=np.arange(3.0)) as ckpt:
        manager = SyncCheckpointManager(ckpt, tmp_path)
        first = manager.save()

        async def failing_save(*args: Any, **kwargs: Any) -> Any:
            raise StorageError("injected: the disk went away")

        monkeypatch.setattr(streamckpt.api, "save", failing_save)
        handle = manager.save(blocking=False)
        assert handle is not None
        with pytest.raises(StorageError, match="injected"):
            handle.result()
        assert streamckpt.sync.latest_checkpoint(tmp_path) == first and manager.checkpoints == [
            first
        ]
        monkeypatch.undo()
        assert manager.save() == f"{tmp_path}/ckpt-3"


def test_save_async_needs_a_streamckpt_checkpoint(tmp_path: Path) -> None:
    manager = CheckpointManager(Faulty(Checkpoint(w=np.ones(1))), tmp_path)
    with pytest.raises(TypeError, match=r"streamckpt\.Checkpoint"):
        manager.save_async()


# ---------------------------------------------------------------------------------------------
# Real TensorFlow, both ways.


@pytest.fixture(scope="module")
def tf() -> Any:
    return pytest.importorskip("tensorflow")


@pytest.mark.tf
async def test_tf_reads_our_state_file(tf: Any, tmp_path: Path) -> None:
    directory = str(tmp_path / "ours")
    manager = CheckpointManager(
        Checkpoint(w=np.ones(2)), directory, max_to_keep=2, best_metric="loss"
    )
    for loss in [0.1, 0.5, 0.4, 0.3]:
        await manager.save(metrics={"loss": loss})
    assert tf.train.latest_checkpoint(directory) == manager.latest_checkpoint
    state = tf.train.get_checkpoint_state(directory)
    assert list(state.all_model_checkpoint_paths) == manager.checkpoints
    tf_manager = tf.train.CheckpointManager(tf.train.Checkpoint(), directory, max_to_keep=2)
    assert tf_manager.checkpoints == manager.checkpoints
    assert tf_manager.latest_checkpoint == manager.latest_checkpoint
    # TensorFlow's own printer, fed what TensorFlow parsed, gives our bytes back.
    ours = (tmp_path / "ours" / "checkpoint").read_bytes()
    tf_state = type(state)()
    text_format.Merge(ours.decode(), tf_state)
    assert text_format.MessageToString(tf_state).encode() == ours


@pytest.mark.tf
async def test_we_read_and_continue_tfs_directory(tf: Any, tmp_path: Path) -> None:
    directory = str(tmp_path / "theirs")
    w = tf.Variable([1.0, 2.0, 3.0])
    tf_ckpt = tf.train.Checkpoint(w=w)
    tf_manager = tf.train.CheckpointManager(tf_ckpt, directory, max_to_keep=2)
    for i in range(3):
        w.assign([float(i)] * 3)
        tf_manager.save()
    tf_manager.save(checkpoint_number=10)
    written = (tmp_path / "theirs" / "checkpoint").read_bytes()
    assert encode_state(decode_state(written)) == written

    resumed = Checkpoint(w=np.zeros(3, dtype=np.float32))
    manager = CheckpointManager(resumed, directory, max_to_keep=2)
    assert await manager.restore_or_initialize() == tf_manager.latest_checkpoint
    assert manager.checkpoints == tf_manager.checkpoints
    assert await latest_checkpoint(directory) == tf.train.latest_checkpoint(directory)
    assert resumed.w.tolist() == [2.0, 2.0, 2.0]
    assert resumed.save_counter == 4  # TF counts saves, whatever the number in the name

    await manager.save()  # ckpt-5; ckpt-3 falls off the list
    assert prefixes_on_disk(directory) == {"ckpt-10", "ckpt-5"}
    again = tf.train.CheckpointManager(tf.train.Checkpoint(), directory, max_to_keep=2)
    assert again.checkpoints == manager.checkpoints
    assert tf.train.latest_checkpoint(directory) == os.path.join(directory, "ckpt-5")
    # and TensorFlow restores what the manager wrote, counter included
    tf_resumed = tf.train.Checkpoint(w=tf.Variable([0.0, 0.0, 0.0]))
    tf_resumed.restore(tf.train.latest_checkpoint(directory)).assert_consumed()
    assert tf_resumed.w.numpy().tolist() == [2.0, 2.0, 2.0]
    assert int(tf_resumed.save_counter) == 5


@pytest.mark.tf
async def test_tf_plain_save_state_file(tf: Any, tmp_path: Path) -> None:
    tf.train.Checkpoint(v=tf.Variable(1)).save(str(tmp_path / "ckpt"))
    written = (tmp_path / "checkpoint").read_bytes()
    assert encode_state(decode_state(written)) == written
    manager = CheckpointManager(Checkpoint(v=np.int32(0)), tmp_path)
    assert (await manager.restore_or_initialize() or "").endswith("ckpt-1")
    assert (
        manager.checkpoints
        == tf.train.CheckpointManager(
            tf.train.Checkpoint(), str(tmp_path), max_to_keep=5
        ).checkpoints
    )


# -- honesty: metrics follow deletions, the state file cannot reach outside, TF-exact saves ---


async def test_metrics_of_deleted_checkpoints_leave_the_sidecar(directory: str) -> None:
    manager = CheckpointManager(Checkpoint(w=np.zeros(2)), directory, max_to_keep=2)
    for step in range(1, 5):
        await manager.save(step=step, metrics={"loss": float(step)})
    fs, path = fsspec.core.url_to_fs(directory)
    sidecar = decode_metrics(fs.cat_file(f"{path}/checkpoint.metrics.json"))
    assert sorted(sidecar) == ["ckpt-3", "ckpt-4"]
    assert files_of(directory) >= {"ckpt-3.index", "ckpt-4.index"}
    assert "ckpt-1.index" not in files_of(directory)


async def test_a_state_file_cannot_make_the_manager_delete_outside_its_directory(
    tmp_path: Path,
) -> None:
    victim = tmp_path / "victim"
    await streamckpt.save(victim / "x", {"keep": np.ones(3)})
    elsewhere = tmp_path / "elsewhere"
    await streamckpt.save(elsewhere / "y", {"keep": np.ones(3)})
    run = tmp_path / "run"
    run.mkdir()
    state = CheckpointState(
        model_checkpoint_path="../victim/x",
        all_model_checkpoint_paths=("../victim/x", str(elsewhere / "y"), "../victim/x"),
        all_model_checkpoint_timestamps=(1.0, 2.0, 3.0),
        last_preserved_timestamp=0.0,
    )
    (run / "checkpoint").write_bytes(encode_state(state))
    manager = CheckpointManager(Checkpoint(w=np.zeros(2)), run, max_to_keep=1)
    assert await manager.restore_or_initialize() is None  # neither is restored from there
    assert all("outside" in s.reason for s in manager.skipped)
    for step in range(1, 4):
        await manager.save(step=step)
    assert sorted(os.listdir(victim)) == ["x.data-00000-of-00001", "x.index"]
    assert sorted(os.listdir(elsewhere)) == ["y.data-00000-of-00001", "y.index"]
    assert [os.path.basename(p) for p in manager.checkpoints] == ["ckpt-3"]


@pytest.mark.tf
async def test_every_manager_save_carries_save_counter_so_tf_consumes_it(tmp_path: Path) -> None:
    tf = pytest.importorskip("tensorflow")
    manager = CheckpointManager(Checkpoint(w=np.arange(3.0)), tmp_path / "run")
    first = await manager.save(step=100)
    second = await manager.save()
    for path, counter in ((first, 1), (second, 2)):
        restored = tf.train.Checkpoint(w=tf.Variable(np.zeros(3)))
        restored.restore(path).assert_consumed()
        assert int(restored.save_counter.numpy()) == counter
        assert restored.w.numpy().tolist() == [0.0, 1.0, 2.0]
