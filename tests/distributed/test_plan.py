"""The global planner of a multi-process save (``streamckpt.distributed.plan``), without any
process: generated jobs of 1-8 ranks, each tensor whole on some ranks or cut into a random
tiling whose pieces are dealt to random ranks (some to several), and the plan and the merged
index checked against what the job holds.

Every property is stated from the job, not from the planner's own bookkeeping (the keys come
from :func:`index_key`, the holders from the job's lists), so a planner that drops, doubles or
misplaces a value, or balances badly, is caught.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamckpt.distributed.merge import StoredAt, Written, merge_entries
from streamckpt.distributed.plan import (
    GlobalPlan,
    LocalItem,
    fingerprint,
    index_key,
    plan_global,
    to_tensor_slice,
)
from streamckpt.errors import CoordinationError
from streamckpt.format.bundle import BundleEntry, BundleHeader
from streamckpt.format.dtypes import DataType
from streamckpt.format.index_file import decode_index, encode_index
from streamckpt.format.partitioned import check_piece, check_tiling
from streamckpt.format.slices import decode_slice_key, encode_slice_key
from streamckpt.pipeline.plan import auto_num_shards
from streamckpt.sharding import Box, box_shape

PROPERTIES = settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

ITEMSIZE = {DataType.DT_FLOAT: 4, DataType.DT_INT64: 8, DataType.DT_BFLOAT16: 2}


def nbytes(dtype: int, box_or_shape: Sequence[int]) -> int:
    return math.prod(box_or_shape) * ITEMSIZE[DataType(dtype)]


@dataclass(frozen=True)
class Job:
    """What each rank holds, and the truth the plan is checked against."""

    plans: tuple[tuple[LocalItem, ...], ...]
    shard_bytes: int | None
    num_shards: int | None

    @property
    def world(self) -> int:
        return len(self.plans)

    def holders(self) -> dict[bytes, list[int]]:
        """Index key -> the ranks that hold that value, in rank order."""
        out: dict[bytes, list[int]] = defaultdict(list)
        for rank, local in enumerate(self.plans):
            for item in local:
                out[index_key(item.name, item.full_shape, item.box)].append(rank)
        return dict(out)

    def items(self) -> dict[bytes, LocalItem]:
        return {index_key(i.name, i.full_shape, i.box): i for local in self.plans for i in local}


def intervals(draw: st.DrawFn, size: int) -> list[tuple[int, int]]:
    """``[0, size)`` cut at random points (no empty interval unless ``size`` is 0)."""
    cuts = sorted(draw(st.sets(st.integers(1, size - 1), max_size=2)) if size > 1 else set())
    bounds = [0, *cuts, size]
    return list(itertools.pairwise(bounds))


@st.composite
def jobs(draw: st.DrawFn) -> Job:
    world = draw(st.integers(1, 8))
    ranks = st.integers(0, world - 1)
    plans: list[list[LocalItem]] = [[] for _ in range(world)]
    # "t" first: no name can spell another tensor's slice key (those begin with 00); escaped
    # bytes (00, ff) inside names still take part
    names = draw(st.sets(st.binary(min_size=0, max_size=3), min_size=1, max_size=6))
    for suffix in sorted(names):
        name = b"t" + suffix
        dtype = draw(st.sampled_from(sorted(ITEMSIZE)))
        shape = tuple(draw(st.lists(st.integers(0, 6), max_size=3)))
        if draw(st.booleans()):  # whole, replicated on a random subset
            for rank in sorted(draw(st.sets(ranks, min_size=1))):
                plans[rank].append(LocalItem(name, dtype, shape, None, nbytes(dtype, shape)))
            continue
        for box in itertools.product(*(intervals(draw, size) for size in shape)):
            size = nbytes(dtype, box_shape(box))
            for rank in sorted(draw(st.sets(ranks, min_size=1, max_size=3))):
                plans[rank].append(LocalItem(name, dtype, shape, box, size))
    # each rank's own order, shuffled: the plan must not depend on it
    shuffled = tuple(tuple(draw(st.permutations(local))) for local in plans)
    shard_bytes = draw(st.none() | st.integers(1, 300))
    num_shards = draw(st.none() | st.integers(1, 4))
    return Job(shuffled, shard_bytes, num_shards)


def plan_of(job: Job) -> GlobalPlan:
    return plan_global(job.plans, shard_bytes=job.shard_bytes, num_shards=job.num_shards)


def stored_by_rank(plan: GlobalPlan) -> list[dict[bytes, StoredAt]]:
    """What each rank would report after writing its local plan (a made-up crc per value)."""
    return [
        {
            p.key: StoredAt(p.shard_id, p.offset, p.size, crc32c=hash(p.key) & 0xFFFFFFFF)
            for shard in plan.local_plan(rank).shards
            for p in shard
        }
        for rank in range(len(plan.writes))
    ]


# --- the plan ------------------------------------------------------------------------------


@PROPERTIES
@given(job=jobs(), data=st.data())
def test_plan_is_deterministic_and_independent_of_item_order(job: Job, data: st.DataObject) -> None:
    plan = plan_of(job)
    assert plan_of(job) == plan
    reordered = Job(
        tuple(tuple(data.draw(st.permutations(local))) for local in job.plans),
        job.shard_bytes,
        job.num_shards,
    )
    assert plan_of(reordered) == plan
    assert merge_entries(plan, stored_by_rank(plan)) == merge_entries(
        plan_of(reordered), stored_by_rank(plan_of(reordered))
    )


@PROPERTIES
@given(job=jobs())
def test_every_value_is_written_once_by_a_rank_that_holds_it(job: Job) -> None:
    plan = plan_of(job)
    holders = job.holders()
    items = job.items()
    writers: dict[bytes, list[int]] = defaultdict(list)
    for rank, keys in enumerate(plan.writes):
        assert list(keys) == sorted(keys)
        for key in keys:
            writers[key].append(rank)
    assert set(writers) == set(holders)
    for key, ranks in writers.items():
        assert len(ranks) == 1, f"{key!r} written by {ranks}"
        assert ranks[0] in holders[key]
    assert dict(plan.sizes) == {key: item.nbytes for key, item in items.items()}
    assert plan.bytes_by_rank() == [sum(items[k].nbytes for k in keys) for keys in plan.writes]
    # the layouts: one per name, with the job's dtype, shape and distinct pieces
    expected: dict[bytes, tuple[int, tuple[int, ...], set[Box]]] = {}
    for item in items.values():
        dtype, shape, boxes = expected.setdefault(item.name, (item.dtype, item.full_shape, set()))
        if item.box is not None:
            boxes.add(item.box)
    assert set(plan.tensors) == set(expected)
    for name, layout in plan.tensors.items():
        dtype, shape, boxes = expected[name]
        assert (layout.dtype, layout.shape) == (dtype, shape)
        assert sorted(layout.pieces) == sorted(boxes) and len(layout.pieces) == len(boxes)


@PROPERTIES
@given(job=jobs())
def test_shard_ranges_are_contiguous_in_rank_order(job: Job) -> None:
    plan = plan_of(job)
    assert len(plan.shard_ranges) == len(plan.writes) == job.world
    first = 0
    for (start, count), keys in zip(plan.shard_ranges, plan.writes, strict=True):
        assert start == first
        assert (count > 0) == bool(keys)
        if keys and job.num_shards is not None:
            assert count == min(job.num_shards, len(keys))
        elif keys:
            sizes = [plan.sizes[k] for k in keys]
            assert count == auto_num_shards(sizes, shard_bytes=job.shard_bytes)
        first += count
    assert plan.num_shards == first


@PROPERTIES
@given(job=jobs())
def test_local_plans_tile_each_ranks_own_shards(job: Job) -> None:
    plan = plan_of(job)
    for rank, keys in enumerate(plan.writes):
        start, count = plan.shard_ranges[rank]
        local = plan.local_plan(rank)
        assert local.num_shards == count == len(local.shards)
        placed = [p for shard in local.shards for p in shard]
        assert sorted(p.key for p in placed) == list(keys)
        for shard_id, shard in enumerate(local.shards, start):
            offset = 0
            for p in shard:
                assert p.shard_id == shard_id
                assert p.offset == offset
                assert p.size == plan.sizes[p.key]
                offset += p.size


def balance_bound(job: Job) -> int:
    """The most bytes any rank can end with under the planner's rule, from the job alone.

    Rule: a value one rank holds is its own ("mandatory"); replicas go largest first (ties by
    key) to the holder with the fewest bytes so far. Take the rank w that ends with the most,
    L. If it wrote no replica, L is its mandatory load. Else let x be the last replica it got:
    just before x, w had no more than any holder h of x, so no more than their average, and
    those holders had only their mandatory bytes and replicas taken before x whose holders
    meet x's. So L <= s(x) + (sum of mandatory(h) + those replicas) / |holders(x)|.
    """
    holders = job.holders()
    items = job.items()
    mandatory = [0] * job.world
    replicas = []
    for key, ranks in holders.items():
        if len(ranks) == 1:
            mandatory[ranks[0]] += items[key].nbytes
        else:
            replicas.append(key)
    replicas.sort(key=lambda k: (-items[k].nbytes, k))
    bound = max(mandatory)
    for i, key in enumerate(replicas):
        group = set(holders[key])
        before = sum(items[k].nbytes for k in replicas[:i] if group & set(holders[k]))
        average = (sum(mandatory[r] for r in group) + before) / len(group)
        bound = max(bound, items[key].nbytes + math.floor(average))
    return bound


@PROPERTIES
@given(job=jobs())
def test_balance_is_within_the_greedy_bound(job: Job) -> None:
    loads = plan_of(job).bytes_by_rank()
    assert max(loads) <= balance_bound(job)
    # and never below what is forced: every rank writes at least its own values
    holders, items = job.holders(), job.items()
    for rank, load in enumerate(loads):
        own = sum(items[k].nbytes for k, ranks in holders.items() if ranks == [rank])
        assert load >= own


def test_balance_moves_replicas_to_the_lightly_loaded_rank() -> None:
    """Rank 0 holds 100 bytes of its own; two 10-byte replicas go to rank 1, not one each."""
    f = DataType.DT_FLOAT
    own = LocalItem(b"own", f, (25,), None, 100)
    a, b = (LocalItem(n, f, (10,), None, 40) for n in (b"a", b"b"))
    plan = plan_global([[own, a, b], [a, b]], shard_bytes=None)
    assert plan.writes == ((b"own",), (b"a", b"b"))
    assert plan.bytes_by_rank() == [100, 80]
    # ties go to the lower rank, largest replica first
    plan = plan_global([[a, b], [a, b]], shard_bytes=None)
    assert plan.writes == ((b"a",), (b"b",))


# --- the merged index ----------------------------------------------------------------------


@PROPERTIES
@given(job=jobs())
def test_merged_index_round_trips_with_tensorflows_layout(job: Job) -> None:
    plan = plan_of(job)
    stored = stored_by_rank(plan)
    where = {k: at for results in stored for k, at in results.items()}
    entries = merge_entries(plan, stored)
    keys = [k for k, _ in entries]
    assert keys == sorted(set(keys))
    index = decode_index(encode_index(BundleHeader(num_shards=plan.num_shards), entries))
    assert index.header.num_shards == plan.num_shards
    assert index.entries == dict(entries)

    def located(entry: BundleEntry, key: bytes) -> bool:
        at = where[key]
        return (entry.shard_id, entry.offset, entry.size, entry.crc32c) == (
            at.shard_id,
            at.offset,
            at.size,
            at.crc32c,
        )

    expected_keys = set()
    items = job.items()
    for name, layout in plan.tensors.items():
        entry = index.entries[name]
        assert (entry.dtype, entry.shape) == (layout.dtype, layout.shape)
        expected_keys.add(name)
        boxes = {i.box for i in items.values() if i.name == name and i.box is not None}
        if not boxes:
            assert not entry.slices
            assert located(entry, name) and entry.size == items[name].nbytes
            continue
        check_tiling(layout.shape, entry.slices)
        assert sorted(entry.slices, key=repr) == sorted(
            (to_tensor_slice(layout.shape, b) for b in boxes), key=repr
        )
        for box in boxes:
            piece = to_tensor_slice(layout.shape, box)
            key = encode_slice_key(name, piece)
            expected_keys.add(key)
            assert decode_slice_key(key) == (name, piece)
            piece_entry = check_piece(entry, piece, index.entries.get(key))
            assert piece_entry.shape == box_shape(box) and not piece_entry.slices
            assert located(piece_entry, key) and piece_entry.size == items[key].nbytes
    assert set(index.entries) == expected_keys


# --- refusals ------------------------------------------------------------------------------

F32, I64, I32 = DataType.DT_FLOAT, DataType.DT_INT64, DataType.DT_INT32


def whole(name: bytes, shape: tuple[int, ...], dtype: int = F32) -> LocalItem:
    return LocalItem(name, dtype, shape, None, math.prod(shape) * 4 * (2 if dtype == I64 else 1))


def piece(name: bytes, shape: tuple[int, ...], box: Box, dtype: int = F32) -> LocalItem:
    return LocalItem(name, dtype, shape, box, math.prod(box_shape(box)) * 4)


def refused(plans: Sequence[Sequence[LocalItem]]) -> CoordinationError:
    with pytest.raises(CoordinationError) as caught:
        plan_global(plans, shard_bytes=None)
    return caught.value


ROWS = (((0, 2), (0, 3)), ((2, 4), (0, 3)))  # a (4, 3) tensor in two row blocks


def test_refuses_pieces_of_two_dtypes() -> None:
    error = refused(
        [
            [whole(b"ok", (2,))],
            [piece(b"w", (4, 3), ROWS[0])],
            [],
            [piece(b"w", (4, 3), ROWS[1], dtype=I64)],
        ]
    )
    assert error.ranks == (1, 3) and error.tensor == "w"
    assert "DT_FLOAT" in error.message and "DT_INT64" in error.message


def test_refuses_pieces_of_two_full_shapes() -> None:
    error = refused([[piece(b"w", (4, 3), ROWS[0])], [piece(b"w", (5, 3), ((2, 5), (0, 3)))]])
    assert error.ranks == (0, 1) and error.tensor == "w"


@pytest.mark.parametrize(
    ("other", "why"),
    [
        (whole(b"w", (4, 3), dtype=I32), "dtype"),
        (whole(b"w", (3, 4)), "shape"),
        (piece(b"p", (4, 3), ROWS[0], dtype=I32), "piece dtype"),
    ],
)
def test_refuses_replicas_of_another_dtype_or_shape(other: LocalItem, why: str) -> None:
    mine = whole(b"w", (4, 3)) if other.box is None else piece(b"p", (4, 3), ROWS[0])
    rest = [] if other.box is None else [piece(b"p", (4, 3), ROWS[1])]
    error = refused([[mine, *rest], [], [other]])
    assert error.ranks == (0, 2) and error.tensor == other.name.decode(), why


@pytest.mark.parametrize(
    ("boxes", "problem"),
    [
        ([((0, 3), (0, 3)), ((2, 4), (0, 3))], "overlapping"),
        ([((0, 2), (0, 3)), ((3, 4), (0, 3))], "missing"),
        ([((0, 2), (0, 2)), ((0, 4), (2, 3)), ((2, 4), (0, 2)), ((1, 3), (0, 1))], "overlap"),
        ([((0, 2), (0, 3))], "missing"),
        ([((0, 2), (0, 3)), ((1, 3), (0, 3))], "overlapping"),  # one row twice, one missing
    ],
)
def test_refuses_pieces_that_do_not_tile(boxes: list[Box], problem: str) -> None:
    plans: list[list[LocalItem]] = [[whole(b"bystander", (3,))] for _ in range(5)]
    for i, box in enumerate(boxes):
        plans[i + 1].append(piece(b"w", (4, 3), box))
    error = refused(plans)
    assert error.ranks == tuple(range(1, len(boxes) + 1)) and error.tensor == "w"
    assert problem in error.message


def test_refuses_a_tensor_whole_on_one_rank_and_in_pieces_on_others() -> None:
    error = refused(
        [[], [piece(b"w", (4, 3), ROWS[0])], [whole(b"w", (4, 3))], [piece(b"w", (4, 3), ROWS[1])]]
    )
    assert error.ranks == (1, 2, 3) and error.tensor == "w"


@pytest.mark.parametrize("item", [whole(b"w", (4, 3)), piece(b"w", (4, 3), ROWS[0])])
def test_refuses_a_rank_giving_one_value_twice(item: LocalItem) -> None:
    rest = [piece(b"w", (4, 3), ROWS[1])] if item.box is not None else []
    error = refused([[item, *rest], [whole(b"x", (1,)), item, whole(b"y", (1,)), item]])
    assert error.ranks == (1,) and error.tensor == "w"


def test_refuses_replicas_of_different_sizes() -> None:
    small = LocalItem(b"w", F32, (4, 3), None, 48)
    large = LocalItem(b"w", F32, (4, 3), None, 52)
    error = refused([[small], [small], [], [large]])
    assert error.ranks == (0, 3) and error.tensor == "w"
    assert "48" in error.message and "52" in error.message


def test_refuses_a_string_tensor_in_pieces() -> None:
    s = DataType.DT_STRING
    error = refused(
        [[LocalItem(b"s", s, (4, 3), ROWS[0], 9)], [], [LocalItem(b"s", s, (4, 3), ROWS[1], 7)]]
    )
    assert error.ranks == (0, 2) and error.tensor == "s"
    # whole, replicated, a string tensor is fine
    plan_global([[LocalItem(b"s", s, (2,), None, 9)]] * 2, shard_bytes=None)


def test_merge_refuses_a_value_missing_from_the_reports() -> None:
    plans = [[piece(b"w", (4, 3), ROWS[0]), whole(b"a", (2,))], [piece(b"w", (4, 3), ROWS[1])]]
    plan = plan_global(plans, shard_bytes=None)
    stored = stored_by_rank(plan)
    missing = index_key(b"w", (4, 3), ROWS[1])
    del stored[1][missing]
    with pytest.raises(CoordinationError) as caught:
        merge_entries(plan, stored)
    assert caught.value.ranks == (1,)
    stored = stored_by_rank(plan)
    del stored[0][b"a"]
    with pytest.raises(CoordinationError) as caught:
        merge_entries(plan, stored)
    assert caught.value.ranks == (0,)


def test_merge_refuses_a_value_reported_twice() -> None:
    plans = [[whole(b"a", (2,))], [whole(b"a", (2,))]]
    plan = plan_global(plans, shard_bytes=None)
    stored = stored_by_rank(plan)
    stored[1] = dict(stored[0])
    with pytest.raises(CoordinationError) as caught:
        merge_entries(plan, stored)
    assert caught.value.ranks == (1,)


# --- costs ---------------------------------------------------------------------------------
# Hostile shapes of a job, sized so that anything quadratic in them would run for minutes:
# the timeout, not a timed assertion, catches it.


@pytest.mark.timeout(20)
def test_many_pieces_of_one_tensor_plan_in_linear_time() -> None:
    rows, cols = 200, 100  # 20,000 pieces cut along two axes, dealt over 8 ranks, some twice
    shape = (rows * 2, cols * 3)
    plans: list[list[LocalItem]] = [[] for _ in range(8)]
    for i, j in itertools.product(range(rows), range(cols)):
        box = ((2 * i, 2 * i + 2), (3 * j, 3 * j + 3))
        for rank in {(i + j) % 8, (i * j) % 8}:
            plans[rank].append(piece(b"w", shape, box))
    plan = plan_global(plans, shard_bytes=None)
    assert len(plan.tensors[b"w"].pieces) == rows * cols
    assert sum(len(keys) for keys in plan.writes) == rows * cols
    assert len(merge_entries(plan, stored_by_rank(plan))) == rows * cols + 1


@pytest.mark.timeout(20)
def test_many_ranks_with_many_items_plan_in_linear_time() -> None:
    world = 2000  # each rank: 25 replicated on all, 20 row pieces, 5 of its own
    shape = (world, 4)
    plans = [
        [whole(b"rep%d" % t, (8,)) for t in range(25)]
        + [piece(b"cut%d" % t, shape, ((r, r + 1), (0, 4))) for t in range(20)]
        + [whole(b"own%d.%d" % (r, t), (2,)) for t in range(5)]
        for r in range(world)
    ]
    plan = plan_global(plans, shard_bytes=None)
    assert len(plan.tensors) == 25 + 20 + 5 * world
    assert sum(len(keys) for keys in plan.writes) == 25 + 20 * world + 5 * world
    assert len(merge_entries(plan, stored_by_rank(plan))) == 25 + 20 + 20 * world + 5 * world
    assert len(fingerprint(plans[0])) == 16


# --- the columnar machinery: tilings of every tensor at once, rows grouped by hash ---------


@st.composite
def any_boxes(draw: st.DrawFn) -> tuple[list[list[LocalItem]], dict[bytes, tuple]]:
    """Tensors of ranks 1-3 with random boxes (tilings, gaps, overlaps, boxes reaching out),
    dealt to random ranks; and per tensor its shape and distinct boxes."""
    world = draw(st.integers(1, 4))
    plans: list[list[LocalItem]] = [[] for _ in range(world)]
    truth: dict[bytes, tuple] = {}
    for t in range(draw(st.integers(1, 4))):
        name = b"t%d" % t
        shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
        boxes: set[Box] = set()
        if draw(st.booleans()):  # a true tiling, maybe with one piece moved or dropped
            boxes = set(itertools.product(*(intervals(draw, size) for size in shape)))
            if len(boxes) > 1 and draw(st.booleans()):
                boxes.discard(draw(st.sampled_from(sorted(boxes))))
        for _ in range(draw(st.integers(0 if boxes else 1, 3))):
            box = []
            for size in shape:
                start = draw(st.integers(0, size - 1))
                box.append((start, draw(st.integers(start + 1, size + 1))))
            boxes.add(tuple(box))
        truth[name] = (shape, boxes)
        for box in sorted(boxes):
            for rank in sorted(draw(st.sets(st.integers(0, world - 1), min_size=1, max_size=2))):
                plans[rank].append(piece(name, shape, box))
    return plans, truth


def tiles(shape: tuple[int, ...], boxes: set[Box]) -> bool:
    try:
        check_tiling(shape, [to_tensor_slice(shape, box) for box in boxes])
    except Exception:
        return False
    return True


@PROPERTIES
@given(job=any_boxes())
def test_tilings_are_judged_as_check_tiling_judges_each_tensor(job: tuple) -> None:
    plans, truth = job
    failing = [name for name, (shape, boxes) in truth.items() if not tiles(shape, boxes)]
    if not failing:
        plan = plan_global(plans, shard_bytes=None)
        assert {n: len(layout.pieces) for n, layout in plan.tensors.items()} == {
            n: len(boxes) for n, (_, boxes) in truth.items()
        }
        return
    with pytest.raises(CoordinationError) as caught:
        plan_global(plans, shard_bytes=None)
    assert caught.value.tensor in {name.decode() for name in failing}


@PROPERTIES
@given(rows=st.lists(st.lists(st.integers(-3, 3), min_size=2, max_size=2), max_size=60))
def test_group_rows_groups_exactly_equal_rows_even_when_every_hash_collides(
    rows: list[list[int]],
) -> None:
    from unittest import mock

    import numpy as np

    from streamckpt.distributed import columns

    matrix = np.array(rows, dtype=np.int64).reshape(len(rows), 2)
    for collide in (False, True):
        with mock.patch.object(columns, "_MIX", np.uint64(0) if collide else columns._MIX):
            groups = columns.group_rows(matrix[:, :1], matrix[:, 1])
        runs = np.split(groups.order, groups.starts[1:]) if len(rows) else []
        assert sorted(len(r) for r in runs) == sorted(
            rows.count(list(row)) for row in {tuple(r) for r in rows}
        )
        for run in runs:
            assert list(run) == sorted(run)  # stable: first appearance first
            assert all(rows[i] == rows[run[0]] for i in run)
        assert len(runs) == len({tuple(r) for r in rows})


@PROPERTIES
@given(job=jobs())
def test_column_reports_merge_as_the_dict_reports_do(job: Job) -> None:
    plan = plan_of(job)
    stored = stored_by_rank(plan)
    columns = [Written.of(plan.writes_of(rank)[1], s) for rank, s in enumerate(stored)]
    assert merge_entries(plan, columns) == merge_entries(plan, stored)
    short = Written.of((), {})
    if plan.writes_of(0)[1]:
        with pytest.raises(CoordinationError) as caught:
            merge_entries(plan, [short, *columns[1:]])
        assert caught.value.ranks == (0,)


def test_names_that_sort_among_slice_keys_still_come_out_in_key_order() -> None:
    """Slice keys begin with 00; a name that does too must be merged in among them."""
    plans = [
        [whole(b"\x00a", (2,)), piece(b"w", (4, 3), ROWS[0]), whole(b"\x00\xff", (1,))],
        [piece(b"w", (4, 3), ROWS[1]), whole(b"\xffz", (3,))],
    ]
    plan = plan_global(plans, shard_bytes=None)
    entries = merge_entries(plan, stored_by_rank(plan))
    keys = [key for key, _ in entries]
    assert keys == sorted(keys) and len(set(keys)) == len(keys) == 6
    assert {b"\x00a", b"\x00\xff", b"\xffz", b"w"} <= set(keys)
    index = decode_index(encode_index(BundleHeader(num_shards=plan.num_shards), entries))
    assert index.entries == dict(entries)
