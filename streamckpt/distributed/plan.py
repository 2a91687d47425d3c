"""The global planner of a multi-process save: pure functions of what each process holds.

Every process sends a compact :class:`LocalItem` list (names, dtypes, shapes, boxes, byte
sizes; never data). Every process then runs :func:`plan_global` on the same gathered lists
and gets the same :class:`GlobalPlan`, so no plan needs to be sent back:

* a piece held by one process is written by it; a piece (or a whole tensor) held by several
  is a replica, written once, by the holder with the fewest bytes so far (largest replicas
  first, ties to the lower rank: deterministic; when every replica is held by every
  process, the classic greedy within 4/3 of the best balance);
* each process gets its own range of data-shard ids, so that all write side by side and the
  ``-of-N`` count is known before the first byte;
* every tensor is checked before anything is written: one dtype and one full shape on every
  process, pieces that tile the full shape (no gap, no overlap), replicas of one size.

:func:`merge_entries` turns the processes' results into the index entries: a plain entry per
whole tensor; for a tensor stored in pieces TensorFlow's layout, a full entry listing the
slices plus one entry per piece under its slice key.

Costs are linear in the items gathered (the tiling check is linear in the pieces, see
:func:`streamckpt.format.partitioned.check_tiling`).
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from streamckpt.errors import CoordinationError, StreamCkptError
from streamckpt.format.bundle import BundleEntry, key_to_name
from streamckpt.format.dtypes import DataType
from streamckpt.format.partitioned import check_tiling
from streamckpt.format.slices import (
    Extent,
    TensorSlice,
    decode_slice_key,
    encode_slice_key,
    encode_slice_key_tail,
    slice_key_head,
)
from streamckpt.pipeline.plan import SavePlan, auto_num_shards, plan_save
from streamckpt.sharding import Box, box_shape

__all__ = [
    "GlobalPlan",
    "LocalItem",
    "StoredAt",
    "fingerprint",
    "index_key",
    "merge_entries",
    "plan_global",
    "to_tensor_slice",
]


@dataclass(frozen=True, slots=True)
class LocalItem:
    """One value a process holds: a whole tensor (``box`` None) or one piece of it."""

    name: bytes
    dtype: int
    full_shape: tuple[int, ...]
    box: Box | None
    nbytes: int

    @property
    def key(self) -> bytes:
        """The index key its bytes are stored under."""
        return index_key(self.name, self.full_shape, self.box)


@dataclass(frozen=True, slots=True)
class StoredAt:
    """Where a process put one value: ``[offset, offset + size)`` of data shard ``shard_id``."""

    shard_id: int
    offset: int
    size: int
    crc32c: int


@dataclass(frozen=True, slots=True)
class Layout:
    """One tensor of the checkpoint: plain (``pieces`` empty) or stored in pieces."""

    dtype: int
    shape: tuple[int, ...]
    pieces: tuple[Box, ...]


@dataclass(frozen=True, slots=True)
class GlobalPlan:
    """What every process writes, and where: the same on every process."""

    num_shards: int
    #: per rank: the index keys it writes, sorted
    writes: tuple[tuple[bytes, ...], ...]
    #: per rank: (first shard id, number of shards)
    shard_ranges: tuple[tuple[int, int], ...]
    tensors: Mapping[bytes, Layout]
    sizes: Mapping[bytes, int]

    def local_plan(self, rank: int) -> SavePlan:
        """The shards of ``rank`` (global ids), its values balanced over them by bytes."""
        first, count = self.shard_ranges[rank]
        if not count:
            return SavePlan(num_shards=0, shards=())
        local = plan_save(sizes={k: self.sizes[k] for k in self.writes[rank]}, num_shards=count)
        shards = tuple(
            tuple(
                type(p)(p.key, p.shard_id + first, p.offset, p.size)  # global shard ids
                for p in shard
            )
            for shard in local.shards
        )
        return SavePlan(num_shards=count, shards=shards)

    def bytes_by_rank(self) -> list[int]:
        return [sum(self.sizes[k] for k in keys) for keys in self.writes]


def index_key(name: bytes, full_shape: Sequence[int], box: Box | None) -> bytes:
    """The key a value is stored under: its name when whole, else its slice key."""
    if box is None:
        return name
    return encode_slice_key(name, to_tensor_slice(full_shape, box))


def to_tensor_slice(full_shape: Sequence[int], box: Box) -> TensorSlice:
    """TensorFlow's form of a box: an axis taken whole is written as "full" (length -1)."""
    return TensorSlice(
        tuple(
            Extent(0, None) if (start, stop) == (0, size) else Extent(start, stop - start)
            for (start, stop), size in zip(box, full_shape, strict=True)
        )
    )


_Slice = tuple[TensorSlice, bytes, tuple[int, ...]]


class _Slices:
    """Index keys and TensorFlow slices of many boxes, each distinct one built once.

    A job of many processes gives many pieces but few distinct ones per shape: a tensor cut
    row-wise over 1,024 processes has 1,024 boxes, and every tensor of its shape cut that way
    has the same ones. Building a slice checks each extent and encoding a key escapes the name,
    which cost ~20 µs a piece, so 1,024 processes x 500 pieces took seconds; here a piece
    costs dict lookups, and what is built is exactly what :func:`index_key` and
    :func:`to_tensor_slice` build.
    """

    __slots__ = ("_heads", "_slices")

    def __init__(self) -> None:
        self._heads: dict[bytes, bytes] = {}
        self._slices: dict[tuple[Box, tuple[int, ...]], _Slice] = {}

    def slice(self, shape: tuple[int, ...], box: Box) -> _Slice:
        """The slice of ``box``, the part of its key after the name, and its own shape."""
        known = self._slices.get((box, shape))
        if known is None:
            piece = to_tensor_slice(shape, box)
            known = (piece, encode_slice_key_tail(piece), box_shape(box))
            self._slices[(box, shape)] = known
        return known

    def head(self, name: bytes) -> bytes:
        """What the keys of the pieces of ``name`` begin with."""
        head = self._heads.get(name)
        if head is None:
            head = self._heads[name] = slice_key_head(name)
        return head

    def key(self, name: bytes, shape: tuple[int, ...], box: Box | None) -> bytes:
        """``index_key(name, shape, box)``."""
        if box is None:
            return name
        return self.head(name) + self.slice(shape, box)[1]


def fingerprint(items: Sequence[object]) -> bytes:
    """A digest of picklable values (a process's items): equal digests, the same plan."""
    return hashlib.blake2b(pickle.dumps(tuple(items), protocol=5), digest_size=16).digest()


def _fail(message: str, ranks: Iterable[int], name: bytes | None = None) -> CoordinationError:
    error = CoordinationError(message, ranks=ranks)
    if name is not None:
        error.with_context(tensor=key_to_name(name))
    return error


def plan_global(
    plans: Sequence[Sequence[LocalItem]],
    *,
    shard_bytes: int | None,
    num_shards: int | None = None,
) -> GlobalPlan:
    """The plan of a save by ``len(plans)`` processes; ``plans[r]`` is what rank r holds.

    ``num_shards`` is the number of data shards *per process* that writes anything (None:
    ``auto_num_shards`` of its own bytes with the store's ``shard_bytes``).
    """
    items: dict[bytes, LocalItem] = {}
    holders: dict[bytes, list[int]] = {}
    tensors: dict[bytes, tuple[int, tuple[int, ...], int]] = {}  # name -> dtype, shape, rank
    pieces: dict[bytes, list[Box]] = {}
    whole: set[bytes] = set()
    slices = _Slices()
    for rank, local in enumerate(plans):
        for item in local:
            key = slices.key(item.name, item.full_shape, item.box)
            seen = items.get(key)
            if seen is None:
                items[key] = item
                holders[key] = [rank]
                known = tensors.get(item.name)
                if known is None:
                    tensors[item.name] = (item.dtype, item.full_shape, rank)
                elif known[:2] != (item.dtype, item.full_shape):
                    raise _fail(
                        f"processes disagree about a tensor: rank {known[2]} has dtype "
                        f"{_dtype_name(known[0])} shape {list(known[1])}, rank {rank} has dtype "
                        f"{_dtype_name(item.dtype)} shape {list(item.full_shape)}",
                        [known[2], rank],
                        item.name,
                    )
                if item.box is None:
                    whole.add(item.name)
                else:
                    pieces.setdefault(item.name, []).append(item.box)
                continue
            if holders[key][-1] == rank:
                raise _fail(f"rank {rank} gives the same value twice", [rank], item.name)
            if (seen.dtype, seen.full_shape) != (item.dtype, item.full_shape):
                first = holders[key][0]
                raise _fail(
                    f"processes disagree about a tensor: rank {first} has dtype "
                    f"{_dtype_name(seen.dtype)} shape {list(seen.full_shape)}, rank {rank} has "
                    f"dtype {_dtype_name(item.dtype)} shape {list(item.full_shape)}",
                    [first, rank],
                    item.name,
                )
            if seen.nbytes != item.nbytes:
                raise _fail(
                    f"replicas of one value differ in size: rank {holders[key][0]} has "
                    f"{seen.nbytes} bytes, rank {rank} has {item.nbytes}",
                    [holders[key][0], rank],
                    item.name,
                )
            holders[key].append(rank)
    layouts: dict[bytes, Layout] = {}
    for name, (dtype, shape, _) in tensors.items():
        boxes = pieces.get(name, [])
        if boxes and name in whole:
            owners = holders[name] + [r for b in boxes for r in holders[index_key(name, shape, b)]]
            raise _fail(
                "a tensor is given whole by some processes and in pieces by others",
                owners,
                name,
            )
        if boxes:
            boxes.sort()
            _check_pieces(name, dtype, shape, boxes, holders, slices)
        layouts[name] = Layout(dtype, shape, tuple(boxes))
    writes = _assign(items, holders, len(plans))
    shard_ranges = []
    first = 0
    for keys in writes:
        if not keys:
            count = 0
        elif num_shards is not None:
            count = max(1, min(num_shards, len(keys)))
        else:
            count = auto_num_shards((items[k].nbytes for k in keys), shard_bytes=shard_bytes)
        shard_ranges.append((first, count))
        first += count
    return GlobalPlan(
        num_shards=first,
        writes=tuple(tuple(sorted(keys)) for keys in writes),
        shard_ranges=tuple(shard_ranges),
        tensors=layouts,
        sizes={key: item.nbytes for key, item in items.items()},
    )


def _check_pieces(
    name: bytes,
    dtype: int,
    shape: tuple[int, ...],
    boxes: Sequence[Box],
    holders: Mapping[bytes, list[int]],
    slices: _Slices,
) -> None:
    def owners() -> list[int]:
        return sorted({r for b in boxes for r in holders[slices.key(name, shape, b)]})

    if dtype == DataType.DT_STRING or dtype == DataType.DT_VARIANT:
        raise _fail("a string or variant tensor cannot be saved in pieces", owners(), name)
    try:
        check_tiling(shape, [slices.slice(shape, box)[0] for box in boxes])
    except StreamCkptError as exc:
        raise _fail(
            f"the pieces processes give do not tile the tensor of shape {list(shape)}: "
            f"{exc.message}",
            owners(),
            name,
        ) from None


def _assign(
    items: Mapping[bytes, LocalItem], holders: Mapping[bytes, list[int]], world_size: int
) -> list[list[bytes]]:
    """Who writes each value: its only holder, else the least-loaded of its holders."""
    loads = [0] * world_size
    writes: list[list[bytes]] = [[] for _ in range(world_size)]
    replicated = []
    for key, ranks in holders.items():
        if len(ranks) == 1:
            loads[ranks[0]] += items[key].nbytes
            writes[ranks[0]].append(key)
        else:
            replicated.append(key)
    replicated.sort(key=lambda k: (-items[k].nbytes, k))
    for key in replicated:
        # holders are in rank order and min keeps the first of equals: ties go to the lower
        rank = min(holders[key], key=loads.__getitem__)
        loads[rank] += items[key].nbytes
        writes[rank].append(key)
    return writes


def merge_entries(
    plan: GlobalPlan, stored: Iterable[Mapping[bytes, StoredAt]]
) -> list[tuple[bytes, BundleEntry]]:
    """The index entries of a save, from where every process put what it wrote.

    Raises :class:`CoordinationError` if a value the plan assigned is missing (a process
    that reported success without writing it) rather than writing an index that lies.
    """
    where: dict[bytes, StoredAt] = {}
    for rank, results in enumerate(stored):
        for key, at in results.items():
            if key in where:
                raise _fail("two processes report the same value", [rank], _name_of(key))
            where[key] = at
    entries: list[tuple[bytes, BundleEntry]] = []
    slices = _Slices()

    def stored_entry(
        key: bytes, dtype: DataType, shape: tuple[int, ...], name: bytes
    ) -> BundleEntry:
        at = where.get(key)
        if at is None:
            writers = [r for r, keys in enumerate(plan.writes) if key in keys]
            raise _fail("a process did not report a value it was to write", writers, name)
        return BundleEntry(
            dtype=dtype,
            shape=shape,
            shard_id=at.shard_id,
            offset=at.offset,
            size=at.size,
            crc32c=at.crc32c,
        )

    for name, layout in plan.tensors.items():
        dtype = DataType(layout.dtype)
        if not layout.pieces:
            entries.append((name, stored_entry(name, dtype, layout.shape, name)))
            continue
        head = slices.head(name)
        pieces = []
        for box in layout.pieces:
            piece, tail, piece_shape = slices.slice(layout.shape, box)
            pieces.append(piece)
            key = head + tail
            entries.append((key, stored_entry(key, dtype, piece_shape, name)))
        full = BundleEntry(
            dtype=dtype,
            shape=layout.shape,
            shard_id=0,
            offset=0,
            size=0,
            crc32c=0,
            slices=tuple(pieces),
        )
        entries.append((name, full))
    entries.sort(key=lambda pair: pair[0])
    return entries


def _name_of(key: bytes) -> bytes:
    """The tensor a stored key belongs to: its own name, or the name inside a slice key."""
    if key[:1] == b"\x00":
        try:
            return decode_slice_key(key)[0]
        except StreamCkptError:
            return key
    return key


def _dtype_name(dtype: int) -> str:
    try:
        return DataType(dtype).name
    except ValueError:
        return str(dtype)
