"""The pure planners of ``streamckpt.pipeline.plan``, without storage: which shard and offset
each tensor of a save gets (``plan_save``), how many shards a save picks
(``auto_num_shards``), and how wanted byte ranges merge into reads (``plan_reads``).
"""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamckpt.pipeline.plan import (
    MAX_AUTO_SHARDS,
    Placement,
    auto_num_shards,
    plan_reads,
    plan_save,
)

PROPERTIES = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# --- plan_save ----------------------------------------------------------------------------------

names = st.binary(min_size=1, max_size=6)


@PROPERTIES
@given(
    sizes=st.dictionaries(names, st.integers(0, 10_000), max_size=40),
    num_shards=st.integers(1, 8),
)
def test_plan_save_places_every_tensor_once_in_name_order(
    sizes: dict[bytes, int], num_shards: int
) -> None:
    plan = plan_save(sizes=sizes, num_shards=num_shards)
    assert plan.num_shards == num_shards == len(plan.shards)
    placed = [p.key for shard in plan.shards for p in shard]
    assert sorted(placed) == sorted(sizes)
    assert len(placed) == len(set(placed))
    for shard_id, shard in enumerate(plan.shards):
        keys = [p.key for p in shard]
        assert keys == sorted(keys)
        offset = 0
        for p in shard:
            assert p.shard_id == shard_id
            assert p.offset == offset
            assert p.size == sizes[p.key]
            offset += p.size
        assert plan.shard_bytes(shard_id) == offset
    loads = [plan.shard_bytes(i) for i in range(num_shards)]
    if sizes:
        average = sum(sizes.values()) / num_shards
        assert max(loads) <= average + max(sizes.values())
    # deterministic, whatever order the mapping lists its tensors in
    reordered = dict(reversed(list(sizes.items())))
    assert plan_save(sizes=reordered, num_shards=num_shards) == plan


def _optimal_makespan(sizes: list[int], num_shards: int) -> int:
    best = math.inf
    for assignment in itertools.product(range(num_shards), repeat=len(sizes)):
        loads = [0] * num_shards
        for size, shard in zip(sizes, assignment, strict=True):
            loads[shard] += size
        best = min(best, max(loads))
    return int(best)


@PROPERTIES
@given(
    sizes=st.dictionaries(names, st.integers(1, 1000), min_size=1, max_size=7),
    num_shards=st.integers(2, 3),
)
def test_plan_save_balance_within_4_3_of_optimal(sizes: dict[bytes, int], num_shards: int) -> None:
    plan = plan_save(sizes=sizes, num_shards=num_shards)
    largest = max(plan.shard_bytes(i) for i in range(num_shards))
    optimal = _optimal_makespan(list(sizes.values()), num_shards)
    assert 3 * largest <= 4 * optimal


def test_plan_save_spreads_equal_tensors_evenly() -> None:
    plan = plan_save(sizes={f"t{i:02d}".encode(): 100 for i in range(16)}, num_shards=4)
    assert [plan.shard_bytes(i) for i in range(4)] == [400] * 4
    with pytest.raises(ValueError):
        plan_save(sizes={b"a": 1}, num_shards=0)


@PROPERTIES
@given(
    sizes=st.lists(st.integers(0, 1 << 40), max_size=40),
    shard_bytes=st.one_of(st.none(), st.integers(1, 1 << 36)),
)
def test_auto_num_shards_aims_at_the_store_shard_size(
    sizes: list[int], shard_bytes: int | None
) -> None:
    n = auto_num_shards(sizes, shard_bytes=shard_bytes)
    total, largest = sum(sizes), max(sizes, default=0)
    assert 1 <= n <= MAX_AUTO_SHARDS
    if shard_bytes is None or total == 0:
        assert n == 1
        return
    # about shard_bytes each: the nearest count, unless capped by the limit or the largest
    capped = n == MAX_AUTO_SHARDS or (n + 1) * largest > total
    assert 2 * total < (2 * n + 1) * shard_bytes or capped
    assert n == 1 or 2 * total >= (2 * n - 1) * shard_bytes
    # ... and none that the largest tensor alone would leave short of filling
    assert n == 1 or n * largest <= total
    # the greedy plan then keeps every shard within one tensor of the average
    plan = plan_save(sizes={i.to_bytes(2, "big"): s for i, s in enumerate(sizes)}, num_shards=n)
    assert max(plan.shard_bytes(i) for i in range(n)) <= total / n + largest


def test_auto_num_shards_examples() -> None:
    MiB = 1 << 20
    workload_a = [32 * MiB] * 4 + [16 * MiB] * 8  # 256 MiB, largest 32 MiB
    assert auto_num_shards(workload_a, shard_bytes=64 * MiB) == 4
    assert auto_num_shards([*workload_a, 1024], shard_bytes=64 * MiB) == 4  # not 5 for 1 KiB
    assert auto_num_shards([33 * MiB] * 3, shard_bytes=64 * MiB) == 2  # 99 MiB: 2 x 49.5
    assert auto_num_shards(workload_a, shard_bytes=None) == 1
    assert auto_num_shards([2048 * MiB] + [MiB] * 100, shard_bytes=64 * MiB) == 1  # one giant
    assert auto_num_shards([MiB] * 4096, shard_bytes=64 * MiB) == MAX_AUTO_SHARDS
    assert auto_num_shards([10 * MiB], shard_bytes=64 * MiB) == 1


# --- plan_reads ---------------------------------------------------------------------------------


@st.composite
def shard_layouts(draw: st.DrawFn) -> list[Placement]:
    """Wanted ranges as a real index gives them: disjoint per shard, some skipped, any order."""
    wanted = []
    number = 0
    for shard_id in range(draw(st.integers(1, 3))):
        offset = 0
        for gap, size, keep in draw(
            st.lists(
                st.tuples(st.integers(0, 300), st.integers(0, 200), st.booleans()), max_size=25
            )
        ):
            offset += gap
            if keep:
                wanted.append(Placement(f"t{number}".encode(), shard_id, offset, size))
            number += 1
            offset += size
    return draw(st.permutations(wanted))


def _check_groups(
    wanted: list[Placement], max_gap: int, max_group_bytes: int, *, disjoint_input: bool
) -> None:
    groups = plan_reads(wanted, max_gap=max_gap, max_group_bytes=max_group_bytes)
    members = [p for g in groups for p in g.members]
    assert Counter(members) == Counter(wanted)  # each wanted range in exactly one group
    assert [(g.shard_id, g.start) for g in groups] == sorted((g.shard_id, g.start) for g in groups)
    for g in groups:
        assert all(p.shard_id == g.shard_id for p in g.members)
        assert g.start == min(p.offset for p in g.members)
        assert g.end == max(p.offset + p.size for p in g.members)
        assert g.length == g.end - g.start
        assert g.length <= max_group_bytes or len(g.members) == 1
        end = g.members[0].offset + g.members[0].size
        for p in g.members[1:]:
            assert p.offset - end <= max_gap  # merged only across small gaps
            end = max(end, p.offset + p.size)
    for prev, nxt in itertools.pairwise(groups):
        if prev.shard_id != nxt.shard_id:
            continue
        if disjoint_input:
            assert prev.end <= nxt.start
        # a new group starts only when the gap is too wide or the merged group too big
        first = nxt.members[0]
        assert (
            first.offset - prev.end > max_gap
            or max(prev.end, first.offset + first.size) - prev.start > max_group_bytes
        )


@PROPERTIES
@given(
    wanted=shard_layouts(),
    max_gap=st.integers(0, 400),
    max_group_bytes=st.integers(1, 2000),
)
def test_plan_reads_covers_each_range_once(
    wanted: list[Placement], max_gap: int, max_group_bytes: int
) -> None:
    _check_groups(wanted, max_gap, max_group_bytes, disjoint_input=True)


@PROPERTIES
@given(
    wanted=st.lists(
        st.builds(
            Placement,
            key=st.binary(max_size=3),
            shard_id=st.integers(0, 2),
            offset=st.integers(0, 1000),
            size=st.integers(0, 300),
        ),
        max_size=30,
    ),
    max_gap=st.integers(0, 400),
    max_group_bytes=st.integers(1, 2000),
)
def test_plan_reads_tolerates_overlapping_ranges(
    wanted: list[Placement], max_gap: int, max_group_bytes: int
) -> None:
    _check_groups(wanted, max_gap, max_group_bytes, disjoint_input=False)


def test_plan_reads_merges_adjacent_and_splits_far() -> None:
    near = [Placement(f"n{i}".encode(), 0, 100 * i, 100) for i in range(50)]
    far = Placement(b"far", 0, 10**9, 10)
    other = Placement(b"other", 1, 0, 10)
    groups = plan_reads([*near, far, other], max_gap=0, max_group_bytes=10**6)
    assert [(g.shard_id, g.start, g.end, len(g.members)) for g in groups] == [
        (0, 0, 5000, 50),
        (0, 10**9, 10**9 + 10, 1),
        (1, 0, 10, 1),
    ]
    capped = plan_reads(near, max_gap=0, max_group_bytes=1000)
    assert [g.length for g in capped] == [1000] * 5
