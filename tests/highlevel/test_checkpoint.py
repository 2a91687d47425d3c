"""Checkpoint: TensorFlow's object-based save/restore for Python trees, and background saves.

The golden fixtures pin what TensorFlow 2.21 wrote; the tests marked ``tf`` check against a live
TensorFlow that it restores what we save (``assert_consumed`` passing) and that we restore what
it saves. Background saves are held at a gate (a filesystem whose writes wait on an event), so
"still running" is a fact in these tests, not a race.
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from support import TF_FIXTURES, load_manifest

import streamckpt
import streamckpt.sync
from streamckpt.bridge import shared_bridge
from streamckpt.checkpoint import (
    Checkpoint,
    SaveHandle,
    SyncCheckpoint,
    load_nested,
)
from streamckpt.errors import (
    CheckpointExistsError,
    NamingError,
    ObjectMatchError,
    SaveInProgressError,
    StreamCkptError,
    UnsupportedError,
    ValueMismatchError,
)
from streamckpt.objectgraph import OBJECT_GRAPH_KEY

pytestmark = pytest.mark.anyio

Pair = collections.namedtuple("Pair", "x y")
VV = "/.ATTRIBUTES/VARIABLE_VALUE"


@dataclasses.dataclass
class Head:
    kernel: np.ndarray
    scale: float


class Layer:
    def __init__(self, w: np.ndarray, step: int) -> None:
        self.w = w
        self.step = step
        self._private = np.ones(3)  # skipped, like naming.flatten does


def make_tree(seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)

    def arr(*shape: int, dtype: Any = np.float32) -> np.ndarray:
        return (rng.standard_normal(shape) * 10).astype(dtype)

    return {
        "model": {
            "dense": {"kernel": arr(3, 4), "bias": arr(4)},
            "blocks": [Layer(arr(2, 2), int(rng.integers(100))), Layer(arr(2), 5)],
            "head": Head(arr(4, 1, dtype=np.float64), float(rng.random())),
            "pair": Pair(arr(1), arr(2)),
            "tup": (arr(3, dtype=np.int32),),
            "empty": [],
            "none": None,
        },
        "step": np.int64(rng.integers(1000)),
        "lr": np.float32(rng.random()),
        "name": f"run-{seed}",
        "raw": bytes([seed, 0, 255]),
    }


def assert_trees_equal(a: Any, b: Any, path: str = "") -> None:
    if isinstance(b, dict):
        assert isinstance(a, dict) and a.keys() == b.keys(), path
        for key in b:
            assert_trees_equal(a[key], b[key], f"{path}/{key}")
    elif isinstance(b, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_trees_equal(x, y, f"{path}/{i}")
    elif dataclasses.is_dataclass(b) or hasattr(b, "__dict__"):
        assert_trees_equal(vars(a), vars(b), path)
    elif isinstance(b, (str, bytes, int, float)):
        assert type(a) is type(b) and a == b, path
    else:
        np.testing.assert_array_equal(a, b, err_msg=path)
        assert np.asarray(a).dtype == np.asarray(b).dtype, path


# ---------------------------------------------------------------------------------------------
# A filesystem whose writes wait at a gate, so a background save stays in flight on purpose.


class GatedMemoryFS(MemoryFileSystem):  # type: ignore[misc]
    cachable = False

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        if "w" in mode:
            assert self.gate.wait(10), "the test never opened the gate"
        return super()._open(path, mode, **kwargs)


@pytest.fixture
def gated() -> Any:
    fs = GatedMemoryFS()
    yield fs, f"/gated-{uuid.uuid4().hex}"
    fs.gate.set()


# ---------------------------------------------------------------------------------------------
# Saving and restoring Python trees.


async def test_save_and_write_names_and_counter(tmp_path: Path) -> None:
    ckpt = Checkpoint(model={"w": np.arange(3.0)}, step=7)
    assert ckpt.save_counter == 0
    first = await ckpt.save(tmp_path / "ckpt")
    assert first == f"{tmp_path / 'ckpt'}-1" and ckpt.save_counter == 1
    assert await ckpt.save(str(tmp_path / "ckpt"), num_shards=2) == f"{tmp_path / 'ckpt'}-2"
    written = await ckpt.write(tmp_path / "w")
    assert written == str(tmp_path / "w") and ckpt.save_counter == 2

    saved = await streamckpt.load(first)
    assert set(saved) == {OBJECT_GRAPH_KEY, f"model/w{VV}", f"step{VV}", f"save_counter{VV}"}
    assert saved[f"save_counter{VV}"].dtype == np.int64 and saved[f"save_counter{VV}"] == 1
    assert saved[OBJECT_GRAPH_KEY].shape == () and isinstance(saved[OBJECT_GRAPH_KEY][()], bytes)
    assert set(await streamckpt.load(written)) == {OBJECT_GRAPH_KEY, f"model/w{VV}", f"step{VV}"}
    with pytest.raises(CheckpointExistsError):
        await ckpt.write(tmp_path / "w")
    await ckpt.write(tmp_path / "w", overwrite=True)


async def test_round_trip_fills_the_tree_in_place(tmp_path: Path) -> None:
    original = make_tree(1)
    path = await Checkpoint(**original).save(tmp_path / "c")
    target = make_tree(2)
    kernel = target["model"]["dense"]["kernel"]
    layer = target["model"]["blocks"][0]
    ckpt = Checkpoint(**target)
    status = await ckpt.restore(path)
    status.assert_consumed().assert_existing_objects_matched().assert_nontrivial_match()
    assert status.missing == () and status.unexpected == ()
    assert ckpt.save_counter == 1
    # numpy arrays are filled in place; Python leaves are replaced where they sit.
    assert target["model"]["dense"]["kernel"] is kernel
    assert (
        target["model"]["blocks"][0] is layer and layer.step == original["model"]["blocks"][0].step
    )
    restored = {name: getattr(ckpt, name) for name in original}
    assert_trees_equal(restored, original)
    assert ckpt.step == original["step"] and type(ckpt.step) is np.int64
    assert ckpt.name == "run-1"


async def test_attributes_are_children() -> None:
    ckpt = Checkpoint(a=np.zeros(1))
    ckpt.b = {"x": np.ones(2)}
    assert ckpt.b["x"].tolist() == [1.0, 1.0]
    del ckpt.b
    with pytest.raises(AttributeError):
        _ = ckpt.b
    for reserved in ("save_counter", "save", "restore", "on_busy"):
        with pytest.raises(ValueError, match=r"reserved|on_busy"):
            Checkpoint(**{reserved: np.zeros(1)})
    with pytest.raises(AttributeError):
        ckpt.save_counter = 3  # type: ignore[misc]
    with pytest.raises(NamingError):
        Checkpoint(close=np.zeros(1))


async def test_load_nested_of_our_checkpoint(tmp_path: Path) -> None:
    tree = {"m": {"a/b.c": np.arange(2), "layers": [np.ones(1), {"k": np.zeros(2)}]}, "s": 3}
    nested = await load_nested(await Checkpoint(**tree).save(tmp_path / "c"))
    assert list(nested) == ["m", "s", "save_counter"]
    assert nested["m"]["a/b.c"].tolist() == [0, 1]
    assert nested["m"]["layers"]["1"]["k"].tolist() == [0.0, 0.0]
    assert nested["s"] == 3 and nested["save_counter"] == 1


async def test_restore_matches_objects_through_any_recorded_path(tmp_path: Path) -> None:
    shared = np.arange(3.0)
    path = await Checkpoint(a={"x": shared}, b=[shared]).write(tmp_path / "c")
    assert set(await streamckpt.load(path)) == {OBJECT_GRAPH_KEY, f"a/x{VV}"}  # one node
    target = np.zeros(3)
    status = await Checkpoint(b=[target]).read(path)  # b/0 is the node keyed a/x
    status.assert_consumed()
    assert target.tolist() == [0.0, 1.0, 2.0] and status.restored == (f"a/x{VV}",)


# ---------------------------------------------------------------------------------------------
# Status semantics, as TensorFlow's (checked against tf 2.21: see the tf tests below).


async def test_status_semantics(tmp_path: Path) -> None:
    saved = await Checkpoint(v=np.ones(2), x=np.ones(1)).save(tmp_path / "s")
    written = await Checkpoint(v=np.ones(2)).write(tmp_path / "w")

    # Values without objects: existing objects matched, not consumed.
    status = (await Checkpoint(v=np.zeros(2)).restore(saved)).expect_partial()
    status.assert_existing_objects_matched()
    assert status.unexpected == (f"x{VV}",) and status.missing == ()
    with pytest.raises(ObjectMatchError, match=f"x{VV}"):
        status.assert_consumed()

    # Objects without values: both assertions fail.
    status = await Checkpoint(v=np.zeros(2), x=np.zeros(1), y=np.zeros(1)).restore(saved)
    assert status.missing == (f"y{VV}",)
    for check in (status.assert_existing_objects_matched, status.assert_consumed):
        with pytest.raises(ObjectMatchError, match=f"y{VV}"):
            check()

    # restore() expects save_counter, read() does not (TF: "With restore() assert_consumed()
    # would have failed").
    status = await Checkpoint(v=np.zeros(2)).restore(written)
    assert status.missing == (f"save_counter{VV}",)
    with pytest.raises(ObjectMatchError):
        status.assert_existing_objects_matched()
    (await Checkpoint(v=np.zeros(2)).read(written)).assert_consumed()
    reader = Checkpoint(v=np.zeros(2), x=np.zeros(1))
    (await reader.read(saved)).assert_consumed()
    assert reader.save_counter == 1

    # Nothing matched at all.
    status = (await Checkpoint(q=np.zeros(1)).read(written)).expect_partial()
    with pytest.raises(ObjectMatchError):
        status.assert_nontrivial_match()


async def test_errors_name_every_missing_and_unexpected_key(tmp_path: Path) -> None:
    saved = await Checkpoint(a=np.ones(1), b=np.ones(1), c={"d": np.ones(1)}).save(tmp_path / "s")
    status = await Checkpoint(a=np.zeros(1), x=np.zeros(1), y={"z": np.zeros(1)}).restore(saved)
    status.expect_partial()
    with pytest.raises(ObjectMatchError) as caught:
        status.assert_consumed()
    error = caught.value
    assert isinstance(error, AssertionError) and isinstance(error, StreamCkptError)
    assert error.missing == (f"x{VV}", f"y/z{VV}")
    assert set(error.unexpected) == {f"b{VV}", f"c/d{VV}"}
    for key in (*error.missing, *error.unexpected):
        assert repr(key) in str(error)
    assert str(tmp_path) in str(error)


async def test_unused_values_are_logged_unless_partial_is_expected(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    saved = await Checkpoint(v=np.ones(1), extra=np.ones(1)).save(tmp_path / "s")
    with caplog.at_level(logging.WARNING, logger="streamckpt.checkpoint"):
        await Checkpoint(v=np.zeros(1)).restore(saved)
        gc.collect()
        assert f"extra{VV}" in caplog.text and "expect_partial" in caplog.text
        caplog.clear()
        (await Checkpoint(v=np.zeros(1)).restore(saved)).expect_partial()
        gc.collect()
        assert caplog.text == ""


async def test_mismatches_are_all_reported_and_nothing_is_written(tmp_path: Path) -> None:
    saved = await Checkpoint(
        a=np.ones((2, 3), np.float32),
        b=np.ones(4, np.float64),
        c=np.ones(2, np.int64),
        d=(7,),
        e=1.5,
        ok=np.ones(2),
    ).save(tmp_path / "s")
    target: dict[str, Any] = {
        "a": np.zeros((3, 2), np.float32),  # shape
        "b": np.zeros(4, np.float32),  # float64 does not fit float32 safely
        "c": np.zeros(2, np.float64),  # int64 -> float64 is safe: fine
        "d": (0,),  # an int inside a tuple can be neither filled nor replaced
        "e": "text",  # a number cannot become a string
        "ok": np.zeros(2),
    }
    ckpt = Checkpoint(**target)
    with pytest.raises(ValueMismatchError) as caught:
        await ckpt.restore(saved)
    assert caught.value.mismatched == (f"a{VV}", f"b{VV}", f"d/0{VV}", f"e{VV}")
    message = str(caught.value)
    assert "[2, 3]" in message and "float64" in message and "tuple" in message
    assert isinstance(caught.value, ValueError)
    assert not target["ok"].any() and not target["c"].any() and ckpt.save_counter == 0
    # float32 into float64 widens safely; a Python float takes any float.
    widened = await Checkpoint(a=np.ones((2, 3), np.float32)).write(tmp_path / "f32")
    into = Checkpoint(a=np.zeros((2, 3), np.float64))
    (await into.read(widened)).assert_consumed()
    assert into.a.dtype == np.float64 and into.a.sum() == 6


async def test_name_based_checkpoints_are_refused() -> None:
    with pytest.raises(UnsupportedError, match="name-based"):
        await Checkpoint(x=np.zeros(1)).restore(TF_FIXTURES / "partitioned_v1" / "model-7")
    with pytest.raises(UnsupportedError):
        await load_nested(TF_FIXTURES / "partitioned_v1" / "model-7")


# ---------------------------------------------------------------------------------------------
# Golden TensorFlow checkpoints.

_FIXTURES = {f["name"]: f for f in load_manifest()["fixtures"]}


def _manifest_values(prefix: str) -> dict[str, Any]:
    bundle = next(b for f in _FIXTURES.values() for b in f["bundles"] if b["prefix"] == prefix)
    values: dict[str, Any] = {}
    for entry in bundle["entries"]:
        if "value" in entry:
            values[entry["key"]] = np.asarray(entry["value"]).reshape(entry["shape"])
        elif "value_utf8" in entry and entry["key"] != OBJECT_GRAPH_KEY:
            values[entry["key"]] = entry["value_utf8"].encode()
    return values


def _nested_location(key: str) -> tuple[str, ...]:
    """Where keys_to_nested puts a key (slot keys are handled by the slots test)."""
    path, attribute = key.split("/.ATTRIBUTES/")
    assert attribute == "VARIABLE_VALUE" and ".OPTIMIZER_SLOT" not in path
    return tuple(part.replace(".S", "/").replace("..", ".") for part in path.split("/"))


def _at(nested: dict[str, Any], location: tuple[str, ...]) -> Any:
    for name in location:
        nested = nested[name]
    return nested


@pytest.mark.parametrize(
    "prefix",
    [
        "object_basic/ckpt-1",
        "object_basic/written",
        "keras_adam/ckpt-1",
        "manager/ckpt-2",
        "manager/ckpt-3",
    ],
)
async def test_load_nested_golden(prefix: str) -> None:
    nested = await load_nested(TF_FIXTURES / prefix)
    expected = _manifest_values(prefix)
    leaves = 0

    def count(node: Any) -> None:
        nonlocal leaves
        if isinstance(node, dict):
            for child in node.values():
                count(child)
        else:
            leaves += 1

    count(nested)
    assert leaves == len(expected)
    for key, value in expected.items():
        got = _at(nested, _nested_location(key))
        if isinstance(value, bytes):
            assert got[()] == value
        else:
            np.testing.assert_allclose(got, value, rtol=1e-7, err_msg=key)
    assert await load_nested(TF_FIXTURES / "object_basic" / "minimal") == {}


async def test_load_nested_golden_slots() -> None:
    nested = await load_nested(TF_FIXTURES / "slots_v1opt" / "ckpt-1")
    expected = _manifest_values("slots_v1opt/ckpt-1")
    optimizer = nested["optimizer"]
    assert set(optimizer) == {"beta1_power", "beta2_power", ".OPTIMIZER_SLOT"}
    for slot in ("m", "v"):
        key = f"w/.OPTIMIZER_SLOT/optimizer/{slot}{VV}"
        np.testing.assert_allclose(optimizer[".OPTIMIZER_SLOT"]["w"][slot], expected[key])
    np.testing.assert_allclose(nested["w"], expected[f"w{VV}"])
    np.testing.assert_allclose(optimizer["beta2_power"], expected[f"optimizer/beta2_power{VV}"])
    assert nested["save_counter"] == 1


async def test_restore_golden_object_basic() -> None:
    ckpt = Checkpoint(
        inner={
            "w": np.zeros((2, 2), np.float32),
            "table": {"a/b.c": 0, "plain": np.zeros(2, bool)},
            "items": [0.0, np.zeros(3, np.int32)],
        },
        step=0,
        text="",
    )
    (await ckpt.restore(TF_FIXTURES / "object_basic" / "ckpt-1")).assert_consumed()
    assert ckpt.inner["w"].tolist() == [[1.0, 2.0], [3.0, 4.0]]
    assert ckpt.inner["table"] == {"a/b.c": 7, "plain": ckpt.inner["table"]["plain"]}
    assert ckpt.inner["table"]["plain"].tolist() == [True, False]
    assert ckpt.inner["items"][0] == 0.5 and ckpt.inner["items"][1].tolist() == [1, 2, 3]
    assert ckpt.step == 42 and ckpt.text == "object-based" and ckpt.save_counter == 1


async def test_restore_golden_keras_weights_through_the_model_path() -> None:
    # Keras keys the weights through the optimizer; the model's own edges still reach them.
    ops = [{}] + [
        {"_kernel": np.zeros(shape, np.float32), "bias": np.zeros(shape[1], np.float32)}
        for shape in ((3, 4), (4, 2))
    ]
    ckpt = Checkpoint(model={"_functional": {"_operations": ops}})
    status = (await ckpt.restore(TF_FIXTURES / "keras_adam" / "ckpt-1")).expect_partial()
    status.assert_existing_objects_matched()
    expected = _manifest_values("keras_adam/ckpt-1")
    for i, op in enumerate(ops[1:]):
        key = f"optimizer/_trainable_variables/{2 * i}{VV}"
        np.testing.assert_allclose(op["_kernel"], expected[key])
    with pytest.raises(ObjectMatchError, match="_iterations"):
        status.assert_consumed()


async def test_restore_golden_slots_are_unexpected_for_plain_trees() -> None:
    ckpt = Checkpoint(w=np.zeros((1, 3), np.float32), optimizer={"beta1_power": np.float32(0)})
    status = (await ckpt.restore(TF_FIXTURES / "slots_v1opt" / "ckpt-1")).expect_partial()
    status.assert_existing_objects_matched()
    assert set(status.unexpected) == {
        f"optimizer/beta2_power{VV}",
        f"w/.OPTIMIZER_SLOT/optimizer/m{VV}",
        f"w/.OPTIMIZER_SLOT/optimizer/v{VV}",
    }
    expected = _manifest_values("slots_v1opt/ckpt-1")[f"optimizer/beta1_power{VV}"]
    assert ckpt.optimizer["beta1_power"] == expected and ckpt.save_counter == 1
    assert type(ckpt.optimizer["beta1_power"]) is np.float32


# ---------------------------------------------------------------------------------------------
# Background saves.


def test_save_async_snapshot_is_immune_to_mutation(gated: Any) -> None:
    fs, root = gated
    weights = np.arange(1 << 16, dtype=np.float32).reshape(256, 256)
    expected = weights.copy()
    tree = {"w": weights, "layers": [np.ones(5)], "step": 1}
    with Checkpoint(**tree) as ckpt:
        fs.gate.clear()
        handle = ckpt.save_async(f"{root}/ckpt", filesystem=fs)
        assert not handle.done() and handle.path == f"{root}/ckpt-1"
        weights[:] = -1  # the caller changes its arrays at once
        tree["layers"][0][:] = 0
        ckpt.step = 99
        fs.gate.set()
        assert handle.result(timeout=10) == f"{root}/ckpt-1"
        assert handle.done() and handle.info().num_tensors == 5
    loaded = streamckpt.sync.load(f"{root}/ckpt-1", filesystem=fs)
    np.testing.assert_array_equal(loaded[f"w{VV}"], expected)
    assert loaded[f"layers/0{VV}"].tolist() == [1.0] * 5 and loaded[f"step{VV}"] == 1


def test_snapshot_converts_layouts_and_reuses_its_buffer(tmp_path: Path) -> None:
    big_endian = np.arange(6, dtype=">i4").reshape(2, 3)
    fortran = np.asfortranarray(np.arange(12.0).reshape(3, 4))
    strided = np.arange(20.0)[::3]
    with Checkpoint(a=big_endian, f=fortran, s=strided, t=np.array([b"x", b"yz"], object)) as c:
        c.save_async(tmp_path / "c").result()
        buffer = c._snapshots._buffer
        assert buffer is not None
        c.save_async(tmp_path / "c").result()
        assert c._snapshots._buffer is buffer
    loaded = streamckpt.sync.load(f"{tmp_path / 'c'}-2")
    assert loaded[f"a{VV}"].dtype == np.dtype("<i4")
    np.testing.assert_array_equal(loaded[f"a{VV}"], big_endian)
    np.testing.assert_array_equal(loaded[f"f{VV}"], fortran)
    np.testing.assert_array_equal(loaded[f"s{VV}"], strided)
    assert loaded[f"t{VV}"].tolist() == [b"x", b"yz"]


async def test_background_errors_reraise(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with Checkpoint(x=np.ones(2)) as ckpt:
        await ckpt.write(tmp_path / "taken")
        handle = ckpt.write_async(tmp_path / "taken")
        with pytest.raises(CheckpointExistsError):
            await handle
        with pytest.raises(CheckpointExistsError):
            handle.result()
        assert handle.done()
        # Unsupported leaves fail in the caller, before anything starts or is counted.
        ckpt.bad = np.array([{"a": 1}], dtype=object)
        with pytest.raises(StreamCkptError):
            ckpt.save_async(tmp_path / "bad")
        assert ckpt.save_counter == 0
    assert "background checkpoint save" in caplog.text and "taken" in caplog.text


def test_second_save_waits_or_is_refused(gated: Any) -> None:
    fs, root = gated
    with Checkpoint(on_busy="raise", w=np.ones(3)) as ckpt:
        fs.gate.clear()
        first = ckpt.save_async(f"{root}/c", filesystem=fs)
        with pytest.raises(SaveInProgressError):
            ckpt.save_async(f"{root}/c", filesystem=fs)
        assert ckpt.save_counter == 1
        second: list[SaveHandle] = []
        waiter = threading.Thread(
            target=lambda: second.append(
                ckpt.save_async(f"{root}/c", filesystem=fs, on_busy="wait")
            )
        )
        waiter.start()
        time.sleep(0.2)
        assert waiter.is_alive() and not first.done()  # waiting for the first save
        fs.gate.set()
        waiter.join(10)
        assert first.result() == f"{root}/c-1" and second[0].result() == f"{root}/c-2"


def test_close_waits_for_the_save_in_flight(gated: Any) -> None:
    fs, root = gated
    ckpt = Checkpoint(w=np.ones(3))
    fs.gate.clear()
    handle = ckpt.save_async(f"{root}/c", filesystem=fs)
    closer = threading.Thread(target=ckpt.close)
    closer.start()
    time.sleep(0.2)
    assert closer.is_alive() and not handle.done()
    fs.gate.set()
    closer.join(10)
    assert not closer.is_alive() and handle.done() and handle.result()


async def test_cancelling_a_waiter_does_not_cancel_the_save(gated: Any) -> None:
    fs, root = gated
    async with Checkpoint(w=np.ones(3)) as ckpt:
        fs.gate.clear()
        handle = ckpt.save_async(f"{root}/c", filesystem=fs)
        with anyio.move_on_after(0.1) as scope:
            await handle
        assert scope.cancelled_caught and not handle.done()
        threading.Timer(0.1, fs.gate.set).start()
    assert handle.done() and await handle == f"{root}/c-1"  # async with waited for it


def _new_threads(before: set[threading.Thread]) -> set[threading.Thread]:
    """Threads started since ``before`` that are still alive, after a short grace period.

    Compared by identity rather than by count: threads of earlier tests may end meanwhile.
    """
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        extra = set(threading.enumerate()) - before
        if not extra:
            return extra
        time.sleep(0.01)
    return set(threading.enumerate()) - before


def test_no_thread_outlives_its_checkpoint(tmp_path: Path) -> None:
    before = set(threading.enumerate())
    with Checkpoint(w=np.ones(3)) as ckpt:
        for _ in range(3):
            ckpt.save_async(tmp_path / "c", num_shards=2)
        assert set(threading.enumerate()) - before
    assert _new_threads(before) == set()
    # Reusable after close; garbage collection stops an unclosed loop too.
    ckpt.save_async(tmp_path / "c").result()
    del ckpt
    gc.collect()
    assert _new_threads(before) == set()


def test_exit_waits_for_a_save_in_flight(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import sys, time
        import numpy as np
        from fsspec.implementations.local import LocalFileSystem
        from streamckpt.checkpoint import Checkpoint

        class SlowFS(LocalFileSystem):
            cachable = False
            def _open(self, path, mode="rb", **kwargs):
                if "w" in mode:
                    time.sleep(0.3)
                return super()._open(path, mode, **kwargs)

        ckpt = Checkpoint(w=np.arange(4.0))
        handle = ckpt.save_async(sys.argv[1], filesystem=SlowFS())
        print("returned", handle.done())
        """
    )
    prefix = tmp_path / "c"
    done = subprocess.run(
        [sys.executable, "-c", script, str(prefix)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "returned False"
    assert "waiting at exit for 1 background save(s) in flight" in done.stderr
    assert (tmp_path / "c-1.index").exists()


async def test_save_async_from_async_code_and_sync_face(tmp_path: Path) -> None:
    tree = make_tree(3)
    ckpt = Checkpoint(**tree)
    path = await ckpt.save_async(tmp_path / "a")
    ckpt.close()
    with SyncCheckpoint(**make_tree(4)) as sync:
        assert sync.restore(path).assert_consumed().restored
        assert sync.save_counter == 1 and sync.name == "run-3"
        sync.model["dense"]["bias"][:] = 5
        assert sync.save(tmp_path / "a") == f"{tmp_path / 'a'}-2"
        handle = sync.save(tmp_path / "a", blocking=False)
        assert isinstance(handle, SaveHandle) and handle.result() == f"{tmp_path / 'a'}-3"
        assert sync.write(tmp_path / "w") == str(tmp_path / "w")
        sync.extra = np.ones(1)
        assert sync.checkpoint.extra.tolist() == [1.0]
        back = SyncCheckpoint(**make_tree(5))
        back.read(tmp_path / "w").expect_partial().assert_existing_objects_matched()
        assert back.model["dense"]["bias"].tolist() == [5.0] * 4
        back.close()


def test_blocking_sync_save_streams_in_the_caller_after_the_save_in_flight(
    tmp_path: Path,
) -> None:
    """No snapshot and no background thread for a blocking save; it queues behind async ones."""
    # A niceness no other test uses: its bridge is this checkpoint's alone.
    bridge = shared_bridge(7)
    with SyncCheckpoint(background_nice=7, **make_tree(6)) as sync:
        assert sync.save(tmp_path / "a") == f"{tmp_path / 'a'}-1"
        assert sync.checkpoint._snapshots.nbytes == 0  # streamed from the leaves, not copied
        assert not bridge.running  # and in this thread
        status = sync.restore(f"{tmp_path / 'a'}-1")
        status.assert_consumed()
        assert not bridge.running
        release = threading.Event()
        order: list[str] = []

        def hold_first_write(*args: Any, **kwargs: Any) -> Any:
            release.wait(30)
            order.append("background")
            return real_save(*args, **kwargs)

        real_save = streamckpt.api.save
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(streamckpt.api, "save", hold_first_write)
            handle = sync.save(tmp_path / "a", blocking=False)
            with pytest.raises(SaveInProgressError):
                sync.save(tmp_path / "a", on_busy="raise")
            threading.Timer(0.2, release.set).start()
            mp.setattr(streamckpt.api, "save", real_save)
            assert sync.save(tmp_path / "a") == f"{tmp_path / 'a'}-3"
            order.append("blocking")
        assert handle.done() and handle.result() == f"{tmp_path / 'a'}-2"
        assert order == ["background", "blocking"]


async def test_torch_leaves(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    weights = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    ckpt = Checkpoint(t=weights)
    handle = ckpt.save_async(tmp_path / "c")
    weights.mul_(0)  # a DLPack view was snapshotted, not kept
    path = handle.result()
    ckpt.close()
    loaded = await streamckpt.load(path)
    assert loaded[f"t{VV}"].tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    target = Checkpoint(t=torch.zeros(2, 3))
    (await target.restore(path)).assert_consumed()
    assert np.asarray(target.t).tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]


async def test_jax_leaves(tmp_path: Path) -> None:
    jnp = pytest.importorskip("jax.numpy")
    ckpt = Checkpoint(j=jnp.arange(4, dtype=jnp.int32))
    path = ckpt.save_async(tmp_path / "c").result()
    ckpt.close()
    loaded = await streamckpt.load(path)
    assert loaded[f"j{VV}"].dtype == np.int32 and loaded[f"j{VV}"].tolist() == [0, 1, 2, 3]
    target = Checkpoint(j=jnp.zeros(4, dtype=jnp.int32))
    (await target.restore(path)).assert_consumed()
    assert np.asarray(target.j).tolist() == [0, 1, 2, 3]


# ---------------------------------------------------------------------------------------------
# Real TensorFlow.


@pytest.fixture(scope="module")
def tf() -> Any:
    return pytest.importorskip("tensorflow")


def _python_model(seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)

    def arr(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    return {
        "net": {
            "dense": {"kernel": arr(3, 4), "bias": arr(4)},
            "blocks": [{"w": arr(2, 2)}, {"w": arr(2, 1)}],
            "scale": np.float32(rng.random()),
        },
        "step": np.int64(rng.integers(100)),
    }


def _tf_model(tf: Any, tree: dict[str, Any]) -> dict[str, Any]:
    class Dense(tf.Module):  # type: ignore[misc]
        def __init__(self, spec: dict[str, np.ndarray]) -> None:
            super().__init__()
            self.kernel = tf.Variable(spec["kernel"])
            self.bias = tf.Variable(spec["bias"])

    class Block(tf.Module):  # type: ignore[misc]
        def __init__(self, w: np.ndarray) -> None:
            super().__init__()
            self.w = tf.Variable(w)

    class Net(tf.Module):  # type: ignore[misc]
        def __init__(self, spec: dict[str, Any]) -> None:
            super().__init__()
            self.dense = Dense(spec["dense"])
            self.blocks = [Block(b["w"]) for b in spec["blocks"]]
            self.scale = tf.Variable(spec["scale"])

    return {"net": Net(tree["net"]), "step": tf.Variable(tree["step"])}


def _assert_tf_holds(tf_tree: dict[str, Any], tree: dict[str, Any]) -> None:
    net, spec = tf_tree["net"], tree["net"]
    np.testing.assert_array_equal(net.dense.kernel.numpy(), spec["dense"]["kernel"])
    np.testing.assert_array_equal(net.dense.bias.numpy(), spec["dense"]["bias"])
    for block, block_spec in zip(net.blocks, spec["blocks"], strict=True):
        np.testing.assert_array_equal(block.w.numpy(), block_spec["w"])
    assert net.scale.numpy() == spec["scale"] and tf_tree["step"].numpy() == tree["step"]


@pytest.mark.tf
async def test_tf_restores_what_we_save(tf: Any, tmp_path: Path) -> None:
    tree = _python_model(1)
    async with Checkpoint(**tree) as ckpt:
        await ckpt.save(tmp_path / "s")
        saved = await ckpt.save(tmp_path / "s", num_shards=2)
        written = await ckpt.write(tmp_path / "w")
        in_background = ckpt.save_async(tmp_path / "bg").result()
    for path, counter in ((saved, 2), (written, None), (in_background, 3)):
        tf_tree = _tf_model(tf, _python_model(99))
        tf_ckpt = tf.train.Checkpoint(**tf_tree)
        if counter is None:
            tf_ckpt.read(path).assert_consumed()
        else:
            tf_ckpt.restore(path).assert_consumed()
            assert int(tf_ckpt.save_counter.numpy()) == counter
        _assert_tf_holds(tf_tree, tree)


@pytest.mark.tf
async def test_we_restore_what_tf_saves(tf: Any, tmp_path: Path) -> None:
    tree = _python_model(2)
    tf_ckpt = tf.train.Checkpoint(**_tf_model(tf, tree))
    tf_ckpt.save(str(tmp_path / "tf"))
    path = tf_ckpt.save(str(tmp_path / "tf"))
    ckpt = Checkpoint(**_python_model(98))
    (await ckpt.restore(path)).assert_consumed()
    assert_trees_equal({"net": ckpt.net, "step": ckpt.step}, tree)
    assert ckpt.save_counter == 2
    nested = await load_nested(path)
    assert_trees_equal(
        nested["net"]["blocks"], {"0": tree["net"]["blocks"][0], "1": tree["net"]["blocks"][1]}
    )
    # TF's restore-time checks, which ours mirror (and extend to all values at once).
    bad = tf.train.Checkpoint(**_tf_model(tf, _python_model(3)))
    bad.net.dense.bias = tf.Variable(np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="incompatible tensor with shape"):
        bad.restore(path)
    with pytest.raises(ValueMismatchError, match="net/dense/bias"):
        await Checkpoint(**{**_python_model(3), "net": {"dense": {"bias": np.zeros(5)}}}).restore(
            path
        )


def _to_tf(tf: Any, value: Any) -> Any:
    """A tf.Module tree with the same local names as a tree of dicts, lists and arrays."""
    if isinstance(value, dict):
        module = tf.Module()
        for name, child in value.items():
            setattr(module, name, _to_tf(tf, child))
        return module
    if isinstance(value, list):
        return [_to_tf(tf, child) for child in value]
    return tf.Variable(np.asarray(value))


def _outcome(status: Any) -> tuple[bool, bool]:
    results = []
    for check in (status.assert_existing_objects_matched, status.assert_consumed):
        try:
            check()
            results.append(True)
        except AssertionError:
            results.append(False)
    return results[0], results[1]


_SHARED = np.arange(2.0)
STATUS_SCENARIOS = {  # saved tree, restored tree
    "same": ({"a": {"v": np.ones(2)}}, {"a": {"v": np.zeros(2)}}),
    "extra object": ({"a": np.ones(1)}, {"a": np.ones(1), "b": np.ones(1)}),
    "extra value": ({"a": np.ones(1), "b": np.ones(1)}, {"a": np.ones(1)}),
    "extra subtree": ({"a": np.ones(1)}, {"a": np.ones(1), "m": {"v": [np.ones(1)]}}),
    "object where a value was": ({"m": np.ones(1)}, {"m": {"v": np.ones(1)}}),
    "value where an object was": ({"m": {"v": np.ones(1)}}, {"m": np.ones(1)}),
    "empty containers": ({"a": np.ones(1), "l": {}}, {"a": np.ones(1), "e": []}),
    "shared value, other path": ({"a": {"x": _SHARED}, "b": [_SHARED]}, {"b": [np.zeros(2)]}),
}


@pytest.mark.tf
@pytest.mark.parametrize("scenario", list(STATUS_SCENARIOS))
async def test_status_outcomes_match_tf(tf: Any, tmp_path: Path, scenario: str) -> None:
    saved, target = STATUS_SCENARIOS[scenario]
    for method in ("save", "write"):
        ckpt = Checkpoint(**saved)
        path = await (ckpt.save(tmp_path / "s") if method == "save" else ckpt.write(tmp_path / "w"))
        for how in ("restore", "read"):
            ours = _outcome((await getattr(Checkpoint(**target), how)(path)).expect_partial())
            tf_ckpt = tf.train.Checkpoint(**{k: _to_tf(tf, v) for k, v in target.items()})
            if method == "save" and how == "read":
                # Our save_counter always exists; TF's read restores it once it does.
                tf_ckpt.save_counter  # noqa: B018 - creates the variable
            theirs = _outcome(getattr(tf_ckpt, how)(path).expect_partial())
            if scenario == "value where an object was" and theirs[0]:
                # Deliberate difference: TF counts a variable as matched when the checkpoint has
                # an object at its path, even one without a value; the leaf got nothing, so we
                # call it missing. assert_consumed fails in both.
                assert ours == (False, False) and theirs == (True, False)
            else:
                assert ours == theirs, (method, how)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux's")
def test_background_nice_lowers_only_the_background_threads(tmp_path: Path) -> None:
    own = os.getpriority(os.PRIO_PROCESS, 0)
    with Checkpoint(background_nice=19, w=np.ones(3)) as ckpt:
        ckpt.save_async(tmp_path / "c", num_shards=2).result()
        loop_thread = shared_bridge(19).native_thread_id
        assert loop_thread is not None
        assert os.getpriority(os.PRIO_PROCESS, loop_thread) == 19
        workers = [t for t in threading.enumerate() if t.name == "AnyIO worker thread"]
        # the workers the save's loop started inherited its niceness
        assert any(os.getpriority(os.PRIO_PROCESS, t.native_id or 0) == 19 for t in workers)
    assert os.getpriority(os.PRIO_PROCESS, 0) == own
    with pytest.raises(ValueError, match="background_nice"):
        Checkpoint(background_nice=-1)
