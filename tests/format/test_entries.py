"""The hand-spelled BundleEntryProto bytes (``streamckpt.format.entries``) against protobuf's.

Every field at its edges: zeros (left out by proto3), one-byte and nine-byte varints, whole
axes (no length), empty shapes and zero-sized dimensions.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from streamckpt.format.bundle import BundleEntry, decode_entry
from streamckpt.format.dtypes import DataType
from streamckpt.format.entries import entry_tail, entry_tails, spell_entries
from streamckpt.format.slices import Extent, TensorSlice

INT63 = (1 << 63) - 1
edges = st.one_of(
    st.sampled_from([0, 1, 127, 128, 16383, 16384, (1 << 32) - 1, 1 << 35, INT63]),
    st.integers(0, INT63),
)
extents = st.one_of(
    st.just(Extent(0, None)), st.builds(Extent, st.integers(0, 1 << 40), st.integers(1, 1 << 40))
)


@st.composite
def entries(draw: st.DrawFn) -> BundleEntry:
    shape = tuple(draw(st.lists(st.one_of(st.integers(0, 3), edges), max_size=5)))
    slices = tuple(
        TensorSlice(tuple(draw(st.lists(extents, min_size=len(shape), max_size=len(shape)))))
        for _ in range(draw(st.integers(0, 3)))
    )
    return BundleEntry(
        dtype=draw(st.sampled_from(list(DataType)[1:])),
        shape=shape,
        shard_id=draw(st.one_of(st.integers(0, 3), st.integers(0, (1 << 31) - 1))),
        offset=draw(edges),
        size=draw(edges),
        crc32c=draw(st.one_of(st.just(0), st.integers(0, (1 << 32) - 1))),
        slices=slices,
    )


@settings(max_examples=500, deadline=None)
@given(entry=entries())
def test_hand_spelled_entry_is_protobufs(entry: BundleEntry) -> None:
    assert entry.encode() == entry.encode_proto()


def test_a_saved_tensors_entry_decodes_back() -> None:
    entry = BundleEntry(DataType.DT_FLOAT, (4, 0, 3), shard_id=2, offset=300, size=0, crc32c=7)
    assert decode_entry(entry.encode(), num_shards=3) == entry


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(
        st.tuples(st.integers(0, (1 << 31) - 1), edges, edges, st.integers(0, (1 << 32) - 1)),
        max_size=40,
    )
)
def test_many_tails_at_once_are_each_ones_tail(rows: list[tuple[int, int, int, int]]) -> None:
    columns = [np.array([r[i] for r in rows], dtype=np.int64) for i in range(3)]
    crcs = np.array([r[3] for r in rows], dtype=np.uint32)
    assert entry_tails(*columns, crcs) == [entry_tail(*r) for r in rows]


@settings(max_examples=100, deadline=None)
@given(data=st.data(), heads=st.lists(st.binary(max_size=40), min_size=1, max_size=5))
def test_many_entries_at_once_are_each_ones_head_and_tail(
    data: st.DataObject, heads: list[bytes]
) -> None:
    rows = data.draw(
        st.lists(
            st.tuples(
                st.integers(0, len(heads) - 1),
                st.integers(0, (1 << 31) - 1),
                edges,
                edges,
                st.integers(0, (1 << 32) - 1),
            ),
            max_size=30,
        )
    )
    columns = [np.array([r[i] for r in rows], dtype=np.int64) for i in range(4)]
    crcs = np.array([r[4] for r in rows], dtype=np.uint32)
    assert spell_entries(heads, *columns, crcs) == [heads[r[0]] + entry_tail(*r[1:]) for r in rows]
