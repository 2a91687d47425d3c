"""Every public async function and method has a blocking twin with the same parameters.

The twins are made from the async definitions where they add nothing; this test is what keeps
the ones that add ``blocking=`` (and any twin someone writes by hand) from drifting.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest

import streamckpt
import streamckpt.sync
from streamckpt.checkpoint import Checkpoint, SyncCheckpoint
from streamckpt.manager import CheckpointManager, SyncCheckpointManager
from streamckpt.pipeline.read import CheckpointReader

# What a blocking twin may add to its async original's parameters.
ADDED = {"blocking"}

FUNCTIONS = [
    (streamckpt.save, streamckpt.sync.save),
    (streamckpt.load, streamckpt.sync.load),
    (streamckpt.read_tensor, streamckpt.sync.read_tensor),
    (streamckpt.list_tensors, streamckpt.sync.list_tensors),
    (streamckpt.open, streamckpt.sync.open),
    (streamckpt.latest_checkpoint, streamckpt.sync.latest_checkpoint),
    (streamckpt.load_nested, streamckpt.sync.load_nested),
    (streamckpt.copy_checkpoint, streamckpt.sync.copy_checkpoint),
    (streamckpt.verify_checkpoint, streamckpt.sync.verify_checkpoint),
]

CLASSES = [
    (CheckpointReader, streamckpt.sync.SyncCheckpointReader),
    (Checkpoint, SyncCheckpoint),
    (CheckpointManager, SyncCheckpointManager),
]


def _parameters(fn: Callable[..., Any], *, drop_self: bool) -> dict[str, inspect.Parameter]:
    params = dict(inspect.signature(fn).parameters)
    if drop_self:
        params.pop(next(iter(params)))
    return params


def _same_parameters(
    original: Callable[..., Any], twin: Callable[..., Any], *, method: bool
) -> None:
    ours = _parameters(original, drop_self=method)
    theirs = _parameters(twin, drop_self=method)
    extra = set(theirs) - set(ours)
    assert extra <= ADDED, f"{twin.__qualname__} adds {extra}"
    for name in extra:
        assert theirs[name].kind is inspect.Parameter.KEYWORD_ONLY
        assert theirs[name].default is not inspect.Parameter.empty
    for name, parameter in ours.items():
        assert name in theirs, f"{twin.__qualname__} lacks {name!r}"
        other = theirs[name]
        assert (other.kind, other.default) == (parameter.kind, parameter.default), name
    assert [n for n in theirs if n in ours] == list(ours), "parameters in another order"


@pytest.mark.parametrize(("original", "twin"), FUNCTIONS, ids=lambda f: f.__name__)
def test_every_async_function_has_a_blocking_twin(
    original: Callable[..., Any], twin: Callable[..., Any]
) -> None:
    _same_parameters(original, twin, method=False)
    assert not inspect.iscoroutinefunction(twin)


def _public(cls: type) -> dict[str, Any]:
    return {
        name: inspect.getattr_static(cls, name) for name in dir(cls) if not name.startswith("_")
    }


@pytest.mark.parametrize(("original", "twin"), CLASSES, ids=lambda c: c.__name__)
def test_every_async_method_has_a_blocking_twin(original: type, twin: type) -> None:
    ours, theirs = _public(original), _public(twin)
    for name, member in ours.items():
        assert name in theirs, f"{twin.__name__} lacks {name!r}"
        counterpart = theirs[name]
        if isinstance(member, property):
            assert isinstance(counterpart, property), name
        elif inspect.isfunction(member):
            assert inspect.isfunction(counterpart), name
            assert not inspect.iscoroutinefunction(counterpart), name
            _same_parameters(member, counterpart, method=True)


def test_the_twin_test_catches_drift() -> None:
    async def original(prefix: str, *, num_shards: int | None = None) -> None: ...

    def drifted(prefix: str) -> None: ...

    def renamed(prefix: str, *, shards: int | None = None) -> None: ...

    for twin in (drifted, renamed):
        with pytest.raises(AssertionError):
            _same_parameters(original, twin, method=False)
