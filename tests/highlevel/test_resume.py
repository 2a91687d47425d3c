"""The resume rule alone (``manager._resume.restore_newest``), without a directory.

What a broken rule would get wrong: an older checkpoint restored while a newer one is whole,
a restore tried on a checkpoint that failed verification, a storage error or a tree that
does not fit taken as a broken checkpoint (training silently rolled back), or the reasons of
the skipped ones lost.
"""

from __future__ import annotations

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamckpt.errors import (
    CheckpointNotFoundError,
    ChecksumError,
    StorageError,
    ValueMismatchError,
)
from streamckpt.manager._files import SkippedCheckpoint
from streamckpt.manager._resume import restore_newest

pytestmark = pytest.mark.anyio


class Site:
    """Candidates with a verification verdict and a restore outcome each; records calls."""

    def __init__(
        self,
        verdicts: dict[str, str | Exception | None],
        restores: dict[str, Exception | None] | None = None,
    ) -> None:
        self.verdicts = verdicts
        self.restores = restores or {}
        self.calls: list[tuple[str, str]] = []

    async def verify(self, path: str) -> str | None:
        self.calls.append(("verify", path))
        verdict = self.verdicts[path]
        if isinstance(verdict, Exception):
            raise verdict
        return verdict

    async def restore(self, path: str) -> None:
        self.calls.append(("restore", path))
        failure = self.restores.get(path)
        if failure is not None:
            raise failure


async def test_the_newest_whole_checkpoint_is_restored_and_nothing_older_is_touched() -> None:
    site = Site({"c-3": None, "c-2": None, "c-1": None})
    got = await restore_newest(["c-3", "c-2", "c-1"], verify=site.verify, restore=site.restore)
    assert got == ("c-3", [])
    assert site.calls == [("verify", "c-3"), ("restore", "c-3")]


async def test_unverified_and_broken_restores_are_skipped_with_their_reasons() -> None:
    site = Site(
        {"c-3": "missing shard 1", "c-2": None, "c-1": None},
        {"c-2": ChecksumError("block crc mismatch", uri="c-2.data")},
    )
    restored, skipped = await restore_newest(
        ["c-3", "c-2", "c-1"], verify=site.verify, restore=site.restore
    )
    assert restored == "c-1"
    assert [s.path for s in skipped] == ["c-3", "c-2"]
    assert skipped[0] == SkippedCheckpoint("c-3", "missing shard 1")
    assert skipped[1].reason.startswith("restore failed: corrupt: block crc mismatch")
    # a checkpoint that failed verification is never restored
    assert ("restore", "c-3") not in site.calls


async def test_a_missing_file_found_by_the_restore_is_a_skip_too() -> None:
    site = Site({"c-2": None, "c-1": None}, {"c-2": CheckpointNotFoundError("no shard 0")})
    restored, skipped = await restore_newest(
        ["c-2", "c-1"], verify=site.verify, restore=site.restore
    )
    assert restored == "c-1" and skipped[0].reason.startswith("restore failed: missing:")


async def test_nothing_restorable_is_none_with_every_reason() -> None:
    site = Site({"c-2": "corrupt index", "c-1": "missing index"})
    got = await restore_newest(["c-2", "c-1"], verify=site.verify, restore=site.restore)
    assert got == (
        None,
        [SkippedCheckpoint("c-2", "corrupt index"), SkippedCheckpoint("c-1", "missing index")],
    )
    assert await restore_newest([], verify=site.verify, restore=site.restore) == (None, [])


@pytest.mark.parametrize(
    "failure",
    [
        StorageError("503 from the bucket"),
        ValueMismatchError("the tree does not fit", mismatched=["w"]),
    ],
)
async def test_an_error_that_is_not_a_broken_checkpoint_is_raised_not_skipped(
    failure: Exception,
) -> None:
    site = Site({"c-2": None, "c-1": None}, {"c-2": failure})
    with pytest.raises(type(failure)):
        await restore_newest(["c-2", "c-1"], verify=site.verify, restore=site.restore)
    assert ("verify", "c-1") not in site.calls  # never rolled back to the older one


async def test_a_verification_that_cannot_reach_the_store_is_raised() -> None:
    site = Site({"c-2": StorageError("connection reset"), "c-1": None})
    with pytest.raises(StorageError):
        await restore_newest(["c-2", "c-1"], verify=site.verify, restore=site.restore)
    assert site.calls == [("verify", "c-2")]


# Each candidate: verifies or not, and (if it verifies) restores, or is broken on restore.
outcomes = st.sampled_from(["whole", "unverified", "corrupt", "missing"])


@settings(max_examples=200, deadline=None)
@given(st.lists(outcomes, max_size=8))
def test_the_first_whole_candidate_wins_and_only_those_before_it_are_touched(
    kinds: list[str],
) -> None:
    paths = [f"c-{len(kinds) - i}" for i in range(len(kinds))]  # newest first
    failures = {
        "corrupt": lambda p: ChecksumError("bad crc", uri=p),
        "missing": lambda p: CheckpointNotFoundError("no shard", uri=p),
    }
    site = Site(
        {
            p: "unreadable index" if k == "unverified" else None
            for p, k in zip(paths, kinds, strict=True)
        },
        {p: failures[k](p) for p, k in zip(paths, kinds, strict=True) if k in failures},
    )
    restored, skipped = anyio.run(
        lambda: restore_newest(paths, verify=site.verify, restore=site.restore)
    )
    first = next((i for i, k in enumerate(kinds) if k == "whole"), None)
    assert restored == (None if first is None else paths[first])
    tried = paths if first is None else paths[: first + 1]
    assert [s.path for s in skipped] == tried[: len(tried) - (first is not None)]
    assert {p for _, p in site.calls} == set(tried)  # nothing older than the winner
    restores = [p for call, p in site.calls if call == "restore"]
    assert restores == [
        p for p, k in zip(tried, kinds[: len(tried)], strict=True) if k != "unverified"
    ]
