"""``Record``: what the format's value types keep of a frozen dataclass (issue 15.1).

They were ``@dataclass(frozen=True, slots=True)``; callers compare them, hash them, pickle them
(the distributed engines send entries between processes) and ``replace`` fields. Each of those
is checked here on every record class, against a field-by-field expectation.
"""

from __future__ import annotations

import copy
import pickle
from typing import Any

import numpy as np
import pytest

from streamckpt.format.bundle import BundleEntry, BundleHeader
from streamckpt.format.dtypes import DataType
from streamckpt.format.entries import EntryColumns
from streamckpt.format.index_file import DecodedIndex
from streamckpt.format.record import Record
from streamckpt.format.slices import Extent, TensorSlice
from streamckpt.format.table import BlockHandle, Footer, IndexBlock
from streamckpt.pipeline.info import TensorInfo
from streamckpt.pipeline.plan import Placement, ReadGroup, SavePlan

_SLICE = TensorSlice((Extent(0, 2), Extent(0, None)))
_HASHABLE: list[Record] = [
    BundleHeader(3, True, 2, 1, (5,)),
    BundleEntry(DataType.DT_FLOAT, (4, 2), 1, 64, 32, 7, (_SLICE,)),
    Extent(3, 4),
    _SLICE,
    BlockHandle(10, 20),
    Footer(BlockHandle(1, 2), BlockHandle(3, 4)),
    IndexBlock((b"a", b"b"), (BlockHandle(0, 5), BlockHandle(9, 5))),
    TensorInfo("w", b"w", DataType.DT_INT32, (2,), 0, 0, 8, 9, (_SLICE,)),
    SavePlan(1, ((Placement(b"w", 0, 0, 8),),)),
    ReadGroup(0, 0, 8, (Placement(b"w", 0, 0, 8),)),
]


def _fields(record: Record) -> dict[str, Any]:
    return {name: getattr(record, name) for name in type(record)._fields}


@pytest.mark.parametrize("record", _HASHABLE, ids=lambda r: type(r).__name__)
def test_a_record_behaves_as_a_frozen_dataclass(record: Record) -> None:
    cls = type(record)
    fields = _fields(record)
    assert list(fields) == list(cls.__init__.__code__.co_varnames[1 : len(fields) + 1])
    twin = cls(*fields.values())
    assert twin == record and hash(twin) == hash(record) and twin is not record
    assert pickle.loads(pickle.dumps(record)) == record
    assert copy.copy(record) == record and copy.deepcopy(record) == record
    shown = repr(record)
    assert shown.startswith(f"{cls.__name__}(") and all(f"{n}=" in shown for n in fields)
    first = next(iter(fields))
    with pytest.raises(AttributeError):
        setattr(record, first, None)
    with pytest.raises(AttributeError):
        delattr(record, first)
    with pytest.raises(AttributeError):
        record.unknown = 1  # type: ignore[attr-defined]
    changed = record.replace(**{first: fields[first]})
    assert changed == record
    with pytest.raises(TypeError, match="no field 'nope'"):
        record.replace(nope=1)


def test_records_differ_by_each_field_and_by_class() -> None:
    entry = BundleEntry(DataType.DT_FLOAT, (4,), 0, 0, 16, 1)
    for name, other in [
        ("dtype", DataType.DT_INT32),
        ("shape", (2, 2)),
        ("shard_id", 1),
        ("offset", 8),
        ("size", 15),
        ("crc32c", 2),
        ("slices", (_SLICE,)),
    ]:
        moved = entry.replace(**{name: other})
        assert moved != entry and getattr(moved, name) == other
        assert _fields(moved) == {**_fields(entry), name: other}
    assert BlockHandle(1, 2) != Extent(1, 2)  # same values, another type
    assert BlockHandle(1, 2) != (1, 2)


def test_unhashable_fields_make_an_unhashable_record_as_a_dataclass_would() -> None:
    index = DecodedIndex(BundleHeader(1), {b"w": BundleEntry(DataType.DT_FLOAT, ())})
    assert pickle.loads(pickle.dumps(index)) == index
    with pytest.raises(TypeError):
        hash(index)
    columns = EntryColumns(*(np.zeros(1, dtype=np.uint64) for _ in range(8)))
    assert type(columns)._fields[0] == "usual"


def test_an_extent_is_still_checked_when_built() -> None:
    with pytest.raises(ValueError, match="negative"):
        Extent(0, -1)


def test_a_record_class_must_annotate_each_slot() -> None:
    with pytest.raises(TypeError, match="annotate each slot"):

        class Missing(Record):
            __slots__ = ("a", "b")
            a: int

    with pytest.raises(TypeError, match="annotate each slot"):

        class Extra(Record):
            __slots__ = ("a",)
            a: int
            b: int
