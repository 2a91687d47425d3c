"""The three coordinators, each in real processes: values in rank order, the same sequence
of collectives on every rank, and an absent rank named by every other within its timeout."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from support import BUCKET, Servers
from support.processes import WorkerResult, run_workers, values

WORLD = 4
TIMEOUT = 3.0  # the coordinators' timeout where a rank is absent
MARGIN = 20.0  # what "within the timeout" allows on a loaded two-core machine


def expected_exercise(rank: int) -> dict[str, Any]:
    return {
        "rank": rank,
        "world_size": WORLD,
        "gather": [{"rank": r, "sq": r * r} for r in range(WORLD)],
        "bcast0": "from 0",
        "bcast2": ("root", 2),
        "row": [[(step, r) for r in range(WORLD)] for step in range(4)],
        "bcast_none": None,
    }


def check_exercise(results: list[WorkerResult]) -> None:
    got = values(results)
    assert got == [expected_exercise(rank) for rank in range(WORLD)]


def check_absent(
    results: list[WorkerResult], *, missing: int, mode: str, killed_after_report: bool = False
) -> None:
    """``killed_after_report``: a survivor may be ended by its engine once it has reported."""
    for result in results:
        if result.rank == missing:
            if mode == "exit":
                assert result.returncode == 3, result.output[-3000:]
            else:
                assert result.ok and result.value == {"rank": missing, "slept": True}
            continue
        reported = result.error is None and result.value is not None
        ok = reported if killed_after_report else result.ok
        assert ok, f"rank {result.rank}: {result.error!r}\n{result.output[-3000:]}"
        report = result.value
        assert "ranks" in report, f"rank {result.rank} did not fail: {report}"
        assert report["ranks"] == (missing,), report
        assert report["elapsed"] < TIMEOUT + MARGIN, report


# -- torch -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_torch_collectives() -> None:
    pytest.importorskip("torch.distributed")
    results = run_workers(
        "workers_coordinators:torch_job",
        WORLD,
        kwargs={"script": "exercise", "timeout": 60.0},
        timeout=90,
    )
    check_exercise(results)


@pytest.mark.slow
@pytest.mark.parametrize(("missing", "mode"), [(2, "sleep"), (3, "exit"), (0, "sleep")])
def test_torch_absent_rank_is_named(missing: int, mode: str) -> None:
    pytest.importorskip("torch.distributed")
    results = run_workers(
        "workers_coordinators:torch_job",
        WORLD,
        kwargs={"script": "absent", "timeout": TIMEOUT, "missing": missing, "mode": mode},
        timeout=90,
    )
    check_absent(results, missing=missing, mode=mode)


# -- jax -------------------------------------------------------------------------------------

JAX_ENV = {"JAX_PLATFORMS": "cpu"}


@pytest.mark.slow
def test_jax_collectives() -> None:
    pytest.importorskip("jax")
    results = run_workers(
        "workers_coordinators:jax_job",
        WORLD,
        kwargs={"script": "exercise", "timeout": 60.0},
        env=JAX_ENV,
        timeout=90,
    )
    check_exercise(results)


@pytest.mark.slow
@pytest.mark.parametrize(("missing", "mode"), [(2, "sleep"), (3, "exit")])
def test_jax_absent_rank_is_named(missing: int, mode: str) -> None:
    pytest.importorskip("jax")
    results = run_workers(
        "workers_coordinators:jax_job",
        WORLD,
        kwargs={"script": "absent", "timeout": TIMEOUT, "missing": missing, "mode": mode},
        env=JAX_ENV,
        timeout=90,
    )
    # With a peer dead, the others cannot shut down together: JAX may end them (rank 0's exit
    # takes its coordination service down) once they have reported.
    check_absent(results, missing=missing, mode=mode, killed_after_report=mode == "exit")


# -- storage ---------------------------------------------------------------------------------


def coordination_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_storage_collectives_local(tmp_path: Path) -> None:
    root = tmp_path / "coord"
    results = run_workers(
        "workers_coordinators:storage_job",
        WORLD,
        kwargs={"script": "exercise", "timeout": 60.0, "root": str(root)},
        timeout=90,
    )
    check_exercise(results)
    # What stays: the run file and one file per rank of the last collective.
    left = coordination_files(root)
    assert left[-1] == "run" and len(left) == WORLD + 1, left
    assert sorted(name.split(".")[2] for name in left[:-1]) == [str(r) for r in range(WORLD)]
    assert all(name.split(".")[1] == "8" for name in left[:-1]), left


def test_storage_bound_to_a_checkpoint_directory(tmp_path: Path) -> None:
    checkpoint = tmp_path / "ckpt"
    results = run_workers(
        "workers_coordinators:storage_job",
        WORLD,
        kwargs={
            "script": "exercise",
            "timeout": 60.0,
            "root": str(tmp_path / "unused"),
            "bind": str(checkpoint),
        },
        timeout=90,
    )
    check_exercise(results)
    assert not (tmp_path / "unused").exists()
    assert coordination_files(checkpoint) == [".streamckpt-coordination"]
    assert len(coordination_files(checkpoint / ".streamckpt-coordination")) == WORLD + 1


@pytest.mark.slow
@pytest.mark.parametrize(("missing", "mode"), [(2, "sleep"), (3, "exit"), (0, "exit")])
def test_storage_absent_rank_is_named(tmp_path: Path, missing: int, mode: str) -> None:
    results = run_workers(
        "workers_coordinators:storage_job",
        WORLD,
        kwargs={
            "script": "absent",
            "timeout": TIMEOUT,
            "root": str(tmp_path),
            "missing": missing,
            "mode": mode,
        },
        timeout=90,
    )
    check_absent(results, missing=missing, mode=mode)


@pytest.mark.slow
def test_storage_rank_that_never_starts_is_named(tmp_path: Path) -> None:
    """Absent from the very first collective, while the run is being set up."""
    for missing in (0, 2):
        got = run_workers(
            "workers_coordinators:storage_never",
            WORLD,
            kwargs={"timeout": TIMEOUT, "root": str(tmp_path / str(missing)), "missing": missing},
            timeout=90,
        )
        reports = values(got)
        for rank, report in enumerate(reports):
            if rank == missing:
                assert report == "skipped"
            else:
                assert report["ranks"] == (missing,), (rank, report)
                assert report["elapsed"] < TIMEOUT + MARGIN


@pytest.mark.slow
def test_storage_ignores_a_crashed_jobs_leftovers(tmp_path: Path) -> None:
    root = tmp_path / "coord"
    stale = values(
        run_workers(
            "workers_coordinators:storage_stale",
            WORLD,
            kwargs={"root": str(root), "tag": "old"},
            timeout=90,
        )
    )
    assert stale[0] == [("old", r) for r in range(WORLD)]
    assert stale[1:] == ["gave up"] * (WORLD - 1)
    left = coordination_files(root)
    assert "run" in left and len(left) > WORLD + 1, left  # the old job's messages are there
    # The new job's rank 0 comes late: the others see the old run file first.
    results = run_workers(
        "workers_coordinators:storage_job",
        WORLD,
        kwargs={"script": "exercise", "timeout": 60.0, "root": str(root), "delay": {0: 1.5}},
        timeout=90,
    )
    check_exercise(results)
    assert len(coordination_files(root)) == WORLD + 1


def fresh_moto(servers: Servers) -> Any:
    server = servers.get("moto")
    server.reset()
    server.create_bucket(BUCKET)
    return server


@pytest.mark.cloud
@pytest.mark.slow
def test_storage_collectives_s3(servers: Servers) -> None:
    server = fresh_moto(servers)
    base = f"{server.scheme}://{BUCKET}/{uuid.uuid4().hex}"
    results = run_workers(
        "workers_coordinators:storage_job",
        WORLD,
        kwargs={
            "script": "exercise",
            "timeout": 60.0,
            "root": f"{base}/unused",
            "bind": f"{base}/ckpt",
            "storage_options": server.storage_options(),
        },
        timeout=90,
    )
    check_exercise(results)
    fs = server.filesystem()
    left = fs.ls(f"{base.split('://', 1)[1]}/ckpt/.streamckpt-coordination")
    assert len(left) == WORLD + 1, left
    assert not fs.exists(f"{base.split('://', 1)[1]}/unused")


@pytest.mark.cloud
@pytest.mark.slow
def test_storage_ignores_a_crashed_jobs_leftovers_s3(servers: Servers) -> None:
    server = fresh_moto(servers)
    options = server.storage_options()
    root = f"{server.scheme}://{BUCKET}/{uuid.uuid4().hex}/coord"
    stale = values(
        run_workers(
            "workers_coordinators:storage_stale",
            WORLD,
            kwargs={"root": root, "storage_options": options, "tag": "old"},
            timeout=90,
        )
    )
    assert stale == [[("old", r) for r in range(WORLD)]] + ["gave up"] * (WORLD - 1)
    assert len(server.filesystem().ls(root.split("://", 1)[1])) > WORLD + 1
    # the same place again, over the old job's leftovers, rank 0 late
    results = run_workers(
        "workers_coordinators:storage_job",
        WORLD,
        kwargs={
            "script": "exercise",
            "timeout": 60.0,
            "root": root,
            "storage_options": options,
            "delay": {0: 1.5},
        },
        timeout=90,
    )
    check_exercise(results)
    assert len(server.filesystem().ls(root.split("://", 1)[1])) == WORLD + 1


@pytest.mark.cloud
@pytest.mark.slow
def test_storage_absent_rank_s3(servers: Servers) -> None:
    server = fresh_moto(servers)
    results = run_workers(
        "workers_coordinators:storage_job",
        WORLD,
        kwargs={
            "script": "absent",
            "timeout": TIMEOUT,
            "root": f"s3://{BUCKET}/{uuid.uuid4().hex}/coord",
            "storage_options": server.storage_options(),
            "missing": 1,
            "mode": "exit",
        },
        timeout=90,
    )
    check_absent(results, missing=1, mode="exit")
