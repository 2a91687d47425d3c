"""The primary's merge: where every process put its values, made into the index's records.

A plain entry per whole tensor; for a tensor stored in pieces TensorFlow's layout, a full
entry listing the slices plus one entry per piece under its slice key. Records come out
sorted by key with their values already spelled (:mod:`streamckpt.format.entries`), ready
for :func:`streamckpt.format.index_file.encode_index_records`.

Like the planner, the merge works in columns: a million values cost a few numpy passes and
one short Python step each (their key and value bytes). Entries of one dtype and shape share
the bytes of their head; pieces of one box share their key's tail and their slice; pieces
are put in key order by sorting two small tables (names and boxes) and then integers, as a
slice key is the name's escaped head then the box's tail, both prefix-free.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from streamckpt.distributed.columns import Ints, group_rows, paused_gc
from streamckpt.distributed.plan import GlobalPlan, to_tensor_slice
from streamckpt.errors import CoordinationError
from streamckpt.format.bundle import BundleEntry, decode_entry, key_to_name
from streamckpt.format.entries import entry_head, slice_field, spell_entries
from streamckpt.format.slices import encode_slice_key_tail, slice_key_head

__all__ = ["Records", "StoredAt", "Written", "merge_entries", "merge_records"]

_SLICE_KEY_START = slice_key_head(b"")[:1]


@dataclass(frozen=True, slots=True)
class StoredAt:
    """Where a process put one value: ``[offset, offset + size)`` of data shard ``shard_id``."""

    shard_id: int
    offset: int
    size: int
    crc32c: int


@dataclass(frozen=True, eq=False)
class Written:
    """What a process reports after writing: where each of its values went.

    Columns in the order of ``plan.writes_of(rank)``: the keys are the plan's, so a report
    of a thousand values is four small arrays.
    """

    shard_id: Ints
    offset: Ints
    size: Ints
    crc32c: Ints

    @classmethod
    def of(cls, keys: Sequence[bytes], stored: Mapping[bytes, StoredAt]) -> Written:
        """The columns of ``stored`` in the order of ``keys`` (each must be there)."""
        rows = [stored[key] for key in keys]
        return cls(
            shard_id=np.fromiter((r.shard_id for r in rows), np.int64, len(rows)),
            offset=np.fromiter((r.offset for r in rows), np.int64, len(rows)),
            size=np.fromiter((r.size for r in rows), np.int64, len(rows)),
            crc32c=np.fromiter((r.crc32c for r in rows), np.int64, len(rows)),
        )

    def __len__(self) -> int:
        return len(self.shard_id)


def _columns(
    plan: GlobalPlan, stored: Sequence[Written | Mapping[bytes, StoredAt]]
) -> list[Written]:
    """Every process's report as columns.

    A report that lacks a value or claims another's is refused, naming the process, rather
    than writing an index that lies.
    """
    owner = {}
    out = []
    for rank, report in enumerate(stored):
        _, keys = plan.writes_of(rank)
        if isinstance(report, Written):
            if len(report) != len(keys):
                raise _fail(
                    "a process reported another number of values than it was to write", rank
                )
            out.append(report)
            continue
        mine = set(keys)
        for key in report:
            if key in owner or key not in mine:
                raise _fail("two processes report the same value", rank, key)
            owner[key] = rank
        missing = [key for key in keys if key not in report]
        if missing:
            raise _fail("a process did not report a value it was to write", rank, missing[0])
        out.append(Written.of(keys, report))
    return out


def _fail(message: str, rank: int, key: bytes | None = None) -> CoordinationError:
    error = CoordinationError(message, ranks=[rank])
    if key is not None:
        error.with_context(tensor=key_to_name(key))
    return error


@dataclass(frozen=True, eq=False)
class Records:
    """Index records sorted by key: keys and entry bytes as two lists.

    Two lists of bytes, not a million (key, value) tuples: bytes are not tracked by the
    cyclic collector, tuples are, and collecting them cost as much as making them.
    """

    keys: list[bytes]
    values: list[bytes]

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        return zip(self.keys, self.values, strict=True)

    def __len__(self) -> int:
        return len(self.keys)


def merge_records(
    plan: GlobalPlan, stored: Sequence[Written | Mapping[bytes, StoredAt]]
) -> Records:
    """The index records (key, entry bytes) of a save, sorted by key."""
    with paused_gc():
        return _records(plan, _columns(plan, stored))


def _records(plan: GlobalPlan, reports: list[Written]) -> Records:
    where = np.zeros((4, len(plan.value_tensor)), dtype=np.int64)
    for rank, report in enumerate(reports):
        ids, _ = plan.writes_of(rank)
        for row, column in enumerate((report.shard_id, report.offset, report.size, report.crc32c)):
            where[row, ids] = column
    tensor = plan.value_tensor
    ndim = plan.tensor_ndims[tensor]
    live = np.arange(plan.value_starts.shape[1])[None, :] < ndim[:, None]
    # each value's dtype and own shape: its head bytes, spelled once per distinct pair
    own_shape = np.where(live, plan.value_stops - plan.value_starts, 0)
    heads = group_rows(plan.tensor_dtypes[tensor], ndim, own_shape)
    head_bytes = [
        entry_head(int(plan.tensor_dtypes[tensor[v]]), own_shape[v, : ndim[v]].tolist())
        for v in heads.first.tolist()
    ]

    def spell(values: Ints) -> list[bytes]:
        """The entries of ``values``, in that order."""
        at = where[:, values]
        return spell_entries(head_bytes, heads.ids[values], at[0], at[1], at[2], at[3])

    # whole tensors and the full entries of tensors in pieces: keyed by name, sorted
    whole = np.flatnonzero(plan.value_whole)
    keys = [plan.names[t] for t in plan.value_tensor[whole].tolist()]
    pieces = _Pieces.of(plan)
    full_keys, full_values = pieces.full_entries(plan)
    keys += full_keys
    order = sorted(range(len(keys)), key=keys.__getitem__)  # runs: each rank's names sorted
    if order != list(range(len(keys))):
        keys = [keys[i] for i in order]
    values = spell(whole) + full_values
    if order != list(range(len(values))):
        values = [values[i] for i in order]
    # the pieces, already in key order: their keys begin with 00, so they come first unless
    # a name does too; then the two sorted runs are merged (in linear time)
    piece_keys = pieces.keys()
    piece_values = spell(pieces.values)
    if not any(map(bytes.startswith, keys, itertools.repeat(_SLICE_KEY_START))):
        return Records(piece_keys + keys, piece_values + values)
    keys = piece_keys + keys
    values = piece_values + values
    order = sorted(range(len(keys)), key=keys.__getitem__)
    return Records([keys[i] for i in order], [values[i] for i in order])


@dataclass(frozen=True, eq=False)
class _Pieces:
    """The pieces of a plan in key order: by their name's head, then by their box's tail.

    A slice key is the escaped name's head followed by the box's tail, and both are
    prefix-free, so sorting the few distinct heads and tails orders all keys.
    """

    values: Ints  # value numbers, in key order
    tensors: Ints  # per piece: its tensor
    boxes: Ints  # per piece: its distinct box
    heads: list[bytes]  # per tensor: the head of its slice keys (b"" if whole)
    tails: list[bytes]  # per distinct box: its key tail
    fields: list[bytes]  # per distinct box: its slice field in the full entry

    @classmethod
    def of(cls, plan: GlobalPlan) -> _Pieces:
        pieces = np.flatnonzero(~plan.value_whole)
        tensor = plan.value_tensor[pieces]
        boxes = group_rows(
            plan.tensor_ndims[tensor],
            plan.tensor_shapes[tensor],
            plan.value_starts[pieces],
            plan.value_stops[pieces],
        )
        tails, fields = [], []
        for i in boxes.first.tolist():
            box = plan.box_of(int(pieces[i]))
            assert box is not None
            piece = to_tensor_slice(plan.shape_of(int(tensor[i])), box)
            tails.append(encode_slice_key_tail(piece))
            fields.append(slice_field([(e.start, e.length) for e in piece.extents]))
        heads = [b""] * plan.num_tensors
        named = np.unique(tensor).tolist()
        for t in named:
            heads[t] = slice_key_head(plan.names[t])
        head_rank = np.zeros(plan.num_tensors, dtype=np.int64)
        head_rank[sorted(named, key=heads.__getitem__)] = np.arange(len(named))
        tail_rank = np.zeros(len(tails), dtype=np.int64)
        tail_rank[sorted(range(len(tails)), key=tails.__getitem__)] = np.arange(len(tails))
        rank = head_rank[tensor] * max(1, len(tails)) + tail_rank[boxes.ids]
        order = np.argsort(rank, kind="stable")
        return cls(pieces[order], tensor[order], boxes.ids[order], heads, tails, fields)

    def keys(self) -> list[bytes]:
        heads, tails = self.heads, self.tails
        return [
            heads[t] + tails[b]
            for t, b in zip(self.tensors.tolist(), self.boxes.tolist(), strict=True)
        ]

    def full_entries(self, plan: GlobalPlan) -> tuple[list[bytes], list[bytes]]:
        """One entry per tensor in pieces: dtype, shape and every slice, in key order."""
        tensor = self.tensors
        if not len(tensor):
            return [], []
        starts = np.flatnonzero(np.concatenate(([True], tensor[1:] != tensor[:-1])))
        stops = np.append(starts[1:], len(tensor)).tolist()
        fields = [self.fields[b] for b in self.boxes.tolist()]
        keys, values = [], []
        for lo, hi in zip(starts.tolist(), stops, strict=True):
            t = int(tensor[lo])
            keys.append(plan.names[t])
            head = entry_head(int(plan.tensor_dtypes[t]), plan.shape_of(t))
            values.append(head + b"".join(fields[lo:hi]))
        return keys, values


def merge_entries(
    plan: GlobalPlan, stored: Sequence[Written | Mapping[bytes, StoredAt]]
) -> list[tuple[bytes, BundleEntry]]:
    """:func:`merge_records`, decoded (for tests and tools: an object per entry)."""
    return [
        (key, decode_entry(value, num_shards=plan.num_shards))
        for key, value in merge_records(plan, stored)
    ]
