"""How uploads share the byte budget: a planner, so a property test over its inputs."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from streamckpt.storage.parts import MAX_PARTS_IN_FLIGHT, plan_uploads

MiB = 1 << 20


@given(
    sizes=st.lists(st.integers(0, 4096 * MiB), min_size=1, max_size=64),
    budget_parts=st.integers(1, 64),
    part_size=st.sampled_from([5 * MiB, 8 * MiB, 16 * MiB]),
    parallel=st.booleans(),
)
def test_uploads_fit_the_budget_and_never_outnumber_their_parts(
    sizes: list[int], budget_parts: int, part_size: int, parallel: bool
) -> None:
    budget = budget_parts * part_size
    writers, parts = plan_uploads(
        sizes, budget=budget, part_size=part_size, parallel_parts=parallel
    )
    held = max(1, min(part_size, max(sizes)))  # what one part of these objects holds
    budget_parts = budget // held
    assert 1 <= writers <= len(sizes)
    assert parts >= 1
    if not parallel:
        assert parts == 1
        assert budget_parts < 2 or writers * 2 <= budget_parts
        return
    most_parts = max(1, -(-max(sizes) // part_size))
    assert parts <= most_parts  # no slots for parts that do not exist
    assert writers * parts <= MAX_PARTS_IN_FLIGHT  # no request flood
    if budget_parts >= 4:  # room for one part in flight (twice), one being filled, its copy
        assert writers * (2 * parts + 2) <= budget_parts


def test_one_large_shard_gets_every_part_and_small_shards_go_up_together() -> None:
    budget, part = 256 * MiB, 16 * MiB

    def plan(sizes: list[int], budget: int = budget) -> tuple[int, int]:
        return plan_uploads(sizes, budget=budget, part_size=part, parallel_parts=True)

    assert plan([1024 * MiB]) == (1, 7)  # (16 parts of budget - 2) / 2
    assert plan([1024 * MiB], budget=1 << 40) == (1, MAX_PARTS_IN_FLIGHT)
    assert plan([32 * MiB] * 8) == (2, 2)  # every part of two shards in flight
    assert plan([80 * MiB] * 4) == (2, 3)  # two shards at once beat one with all five parts
    assert plan([MiB] * 20) == (MAX_PARTS_IN_FLIGHT, 1)  # single PUTs, several at once
    # a tight budget still moves: one part in flight, one being filled, its copy
    assert plan([1024 * MiB], budget=4 * part) == (1, 1)
