"""Two and four processes racing saves of one prefix: every acknowledged save loads bit-exact.

Each trial starts its saves at one moment (each a few milliseconds apart at random, so that
the races land in every phase: the claim, the shard writes, the commit). Without
``overwrite`` exactly one save is acknowledged and the others fail fast with
``SaveInProgressError`` or ``CheckpointExistsError``; with ``overwrite=True`` the saves that
are acknowledged run one after another, and the checkpoint left is whole: one save's bytes,
never a mix. Nothing else is left at the prefix (no claim, no staged shard).

Workers (``support/race_child.py``) serve every trial of a test, so a trial costs a save, not
an interpreter start. CI runs ``TRIALS`` trials per store and process count;
``STREAMCKPT_LONG=1`` runs ``LONG_TRIALS``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import StoreUnderTest
from support.race_child import race_tensors

import streamckpt

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

TRIALS = 6
LONG_TRIALS = 100
CHILD = Path(__file__).resolve().parent.parent / "support" / "race_child.py"
EXPECTED_FAILURES = {"SaveInProgressError", "CheckpointExistsError"}


@contextlib.contextmanager
def workers(count: int) -> Iterator[list[subprocess.Popen[str]]]:
    procs = [
        subprocess.Popen(
            [sys.executable, str(CHILD)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(CHILD.parent.parent)},
        )
        for _ in range(count)
    ]
    try:
        yield procs
    finally:
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.close()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            assert proc.stdout is not None
            proc.stdout.close()


def race(
    procs: list[subprocess.Popen[str]],
    store: StoreUnderTest,
    prefix: str,
    seeds: list[int],
    *,
    overwrite: bool,
    spread_s: float,
) -> list[str]:
    """One trial: every worker saves its seed at ``prefix``, about at once; their outcomes."""
    start_at = time.time() + 0.3
    for proc, seed in zip(procs, seeds, strict=True):
        command = {
            "prefix": prefix,
            "seed": seed,
            "overwrite": overwrite,
            "storage_options": store.storage_options,
            "start_at": start_at + random.uniform(0, spread_s),
        }
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(command) + "\n")
        proc.stdin.flush()
    outcomes = []
    for proc in procs:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, "a worker died"
        outcomes.append(json.loads(line))
    for outcome in outcomes:
        assert outcome["outcome"] == "saved" or outcome["outcome"] in EXPECTED_FAILURES, outcome
    return [o["outcome"] for o in outcomes]


def leftovers(store: StoreUnderTest, prefix: str) -> list[str]:
    fs = store.filesystem()
    path = store.strip(prefix)
    directory, name = path.rsplit("/", 1)
    fs.invalidate_cache()
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(directory, detail=False)]
    return [
        n
        for n in names
        if n.startswith(name + ".") and (".tmp-" in n or ".part-" in n or n.endswith(".claim"))
    ]


@pytest.mark.parametrize("count", [2, 4])
async def test_racing_saves_of_one_prefix(store: StoreUnderTest, count: int) -> None:
    if store.kind == "memory":
        pytest.skip("memory:// lives in one process")
    trials = LONG_TRIALS if os.environ.get("STREAMCKPT_LONG") else TRIALS
    rng = random.Random(count)
    tally: dict[str, int] = {}
    with workers(count) as procs:
        for trial in range(trials):
            overwrite = trial % 2 == 1
            prefix = store.prefix(f"race-{count}-{trial}/ckpt")
            seeds = [1000 * trial + i for i in range(count)]
            if overwrite:  # an earlier checkpoint that the racing saves replace
                await streamckpt.save(
                    prefix,
                    race_tensors(7),
                    num_shards=3,
                    storage_options=store.storage_options or None,
                )
            outcomes = race(
                procs,
                store,
                prefix,
                seeds,
                overwrite=overwrite,
                spread_s=rng.choice([0.0, 0.02, 0.1]),
            )
            saved = [
                seed for seed, outcome in zip(seeds, outcomes, strict=True) if outcome == "saved"
            ]
            for outcome in outcomes:
                key = f"{'overwrite' if overwrite else 'new'}: {outcome}"
                tally[key] = tally.get(key, 0) + 1
            if not overwrite:
                assert len(saved) == 1, outcomes
            assert saved, outcomes
            loaded = await streamckpt.load(prefix, storage_options=store.storage_options or None)
            matches = [
                seed
                for seed in saved
                if all(loaded[n].tobytes() == v.tobytes() for n, v in race_tensors(seed).items())
            ]
            assert len(matches) == 1, (trial, outcomes)  # one acknowledged save's bytes, whole
            assert leftovers(store, prefix) == [], trial
    print(f"{store.kind}, {count} processes, {trials} trials: {tally}")
