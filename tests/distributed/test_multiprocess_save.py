"""The multi-process save in real processes: the acceptance tests of ``save(coordinator=)``.

Four processes each give their own values (Slices of torch tensors or numpy arrays, DTensors,
multi-controller jax.Arrays, replicas, per-rank names) and one TensorFlow checkpoint must
come out: ``-of-4`` data files and one index, every tensor assembled bit-exact by streamckpt
and by TensorFlow itself, replicas stored once, the same SaveInfo on every rank. Then what
goes wrong: a process SIGKILLed in the middle of its write, a process whose values cannot
be prepared, processes that disagree about a shape; none may leave an index or a shard.

Starting torch or jax dominates the time, so each job runs several saves in one launch (a
module fixture for the torch job on local disk) and the tests check their parts.
"""

from __future__ import annotations

import hashlib
import importlib.util
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from support import BUCKET, Servers
from support.processes import collect, kill, run_workers, start_workers, values

import streamckpt.sync

pytestmark = pytest.mark.slow

WORLD = 4
TIMEOUT = 10.0  # the coordinators' timeout where a rank is absent
MARGIN = 30.0  # what "within the timeout" allows on a loaded two-core machine
JOB_TIMEOUT = 150.0  # one launch, every worker


def _workers() -> ModuleType:
    """The workers' own module (they import it from this directory), for its values."""
    path = Path(__file__).with_name("workers_save.py")
    spec = importlib.util.spec_from_file_location("workers_save", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ws = _workers()
FULL: dict[str, np.ndarray[Any, Any]] = ws.full_tensors()
# how many pieces each partitioned tensor of FULL is stored in (empty pieces are not stored)
FULL_PIECES = {"emb": 4, "grid": 4, "half": 3, "pairs": 8}


def bits(array: Any) -> np.ndarray[Any, Any]:
    """The raw bytes of an array, to compare bit for bit (NaN payloads, -0.0, bfloat16)."""
    flat: np.ndarray[Any, Any] = np.ascontiguousarray(array).reshape(-1)
    return flat.view(np.uint8)


def assert_bit_exact(got: Any, want: np.ndarray[Any, Any], name: str) -> None:
    got = np.asarray(got)
    assert got.dtype == want.dtype, (name, got.dtype, want.dtype)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    assert np.array_equal(bits(got), bits(want)), name


def infos(reports: list[dict[str, Any]], key: str) -> Any:
    """The SaveInfo every rank got for save ``key``: one and the same on every rank."""
    got = [report[key] for report in reports]
    assert all("info" in r for r in got), got
    first = got[0]["info"]
    for rank, report in enumerate(got):
        assert report["info"] == first, (rank, report["info"], first)
    return first


def files_of(listing: Mapping[str, bytes], name: str) -> dict[str, bytes]:
    return {k: v for k, v in listing.items() if k.startswith(f"{name}.")}


def local_listing(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


def check_checkpoint(
    name: str,
    info: Any,
    listing: Mapping[str, bytes],
    prefix: str,
    want: Mapping[str, np.ndarray[Any, Any]],
    *,
    storage_options: dict[str, Any] | None = None,
    pieces: Mapping[str, int] | None = None,
    writers: int = WORLD,
) -> dict[str, bytes]:
    """One checkpoint ``name`` (its files in ``listing``): a data file per rank that wrote
    and an index, no claim or temp file; ``want`` loads back bit-exact; every value is
    stored exactly once; ``pieces``: the tensors stored in pieces, and how many."""
    own = files_of(listing, name)
    data = sorted(k for k in own if ".data-" in k)
    assert sorted(own) == sorted([f"{name}.index", *data]), sorted(own)  # no claim, no temp
    assert data == [f"{name}.data-{i:05d}-of-{writers:05d}" for i in range(writers)], data
    assert info.num_shards == writers and info.num_tensors == len(want)
    assert [f.rsplit("/", 1)[-1] for f in info.files] == [*data, f"{name}.index"]
    # replicas once, pieces once: the data files hold exactly the distinct bytes
    distinct = sum(v.nbytes for v in want.values())
    assert info.bytes_written == distinct
    assert sum(len(own[k]) for k in data) == distinct
    assert all(own[k] for k in data), "a rank wrote an empty shard"

    loaded = streamckpt.sync.load(prefix, storage_options=storage_options)
    assert sorted(loaded) == sorted(want)
    for key, value in want.items():
        assert_bit_exact(loaded[key], value, key)
    with streamckpt.sync.open(prefix, storage_options=storage_options) as reader:
        stored_in = {k: len(e.slices) for k, e in reader.entries.items() if e.slices}
    assert stored_in == dict(pieces or {}), stored_in
    return {k: own[k] for k in data}


def check_standard(
    reports: list[dict[str, Any]],
    key: str,
    name: str,
    listing: Mapping[str, bytes],
    prefix: str,
    storage_options: dict[str, Any] | None = None,
) -> None:
    """The checkpoint of ``workers_save.pieces``: assembled, replicas stored once."""
    info = infos(reports, key)
    shards = check_checkpoint(
        name, info, listing, prefix, FULL, storage_options=storage_options, pieces=FULL_PIECES
    )
    joined = b"".join(shards.values())
    # the replicated bias (given by all four) is in one shard, once
    assert joined.count(FULL["bias"].tobytes()) == 1
    for rank in range(WORLD):
        assert joined.count(FULL[f"rank{rank}/rng"].tobytes()) == 1


# -- torch.distributed on local disk: one launch, four saves -------------------------------


@pytest.fixture(scope="module")
def torch_local(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    pytest.importorskip("torch.distributed")
    base = tmp_path_factory.mktemp("torch-local")
    results = run_workers(
        "workers_save:torch_job",
        WORLD,
        kwargs={
            "base": str(base),
            "scenarios": ["slices", "dtensor", "reuse", "idle", "bad_dtype", "bad_shape"],
            "timeout": 60.0,
        },
        timeout=JOB_TIMEOUT,
    )
    return base, values(results)


def test_torch_slices_make_one_checkpoint(torch_local: tuple[Path, list[dict[str, Any]]]) -> None:
    base, reports = torch_local
    check_standard(reports, "slices", "slices", local_listing(base), str(base / "slices"))


def test_a_repeated_structure_reuses_the_plan(
    torch_local: tuple[Path, list[dict[str, Any]]],
) -> None:
    """``reuse`` has the structure of ``slices``, but the ``dtensor`` save came between: its
    first save plans afresh, the overwrite with other values skips the plan exchange, and
    the overwrite's values are what is stored."""
    base, reports = torch_local
    first = [r["reuse"][0] for r in reports]
    second = [r["reuse"][1] for r in reports]
    assert [r["reused"] for r in first + second] == [0.0] * WORLD + [1.0] * WORLD
    assert infos([{"x": r} for r in first], "x").bytes_written == sum(
        v.nbytes for v in FULL.values()
    )
    info = infos([{"x": r} for r in second], "x")
    want = ws.full_tensors(variant=1)
    assert not np.array_equal(bits(want["emb"]), bits(FULL["emb"]))
    check_checkpoint(
        "reuse", info, local_listing(base), str(base / "reuse"), want, pieces=FULL_PIECES
    )


def test_a_rank_with_nothing_to_write(torch_local: tuple[Path, list[dict[str, Any]]]) -> None:
    """Rank 3 gives only an empty piece: three data files, ``-of-3``."""
    base, reports = torch_local
    info = infos(reports, "idle")
    check_checkpoint(
        "idle",
        info,
        local_listing(base),
        str(base / "idle"),
        ws.idle_full(),
        pieces={"w": 3},
        writers=3,
    )


def dtensor_expected() -> dict[str, np.ndarray[Any, Any]]:
    return {f"dt/{name}": ws.dtensor_full(case[1]) for name, case in ws.DTENSOR_CASES.items()}


# (Shard(0), Shard(1)) on 2 x 2: 4 cells; (Replicate(), Shard(0)): 2 distinct row blocks;
# Shard(0) of 3 rows over 4: 3 non-empty; Replicate() everywhere: stored whole
DTENSOR_PIECES = {"dt/grid": 4, "dt/rep_shard": 2, "dt/rows_empty": 3}


def test_dtensors_saved_as_they_are(torch_local: tuple[Path, list[dict[str, Any]]]) -> None:
    base, reports = torch_local
    check_checkpoint(
        "dtensor",
        infos(reports, "dtensor"),
        local_listing(base),
        str(base / "dtensor"),
        dtensor_expected(),
        pieces=DTENSOR_PIECES,
    )


@pytest.mark.tf
def test_tensorflow_reads_what_four_processes_wrote(
    torch_local: tuple[Path, list[dict[str, Any]]],
) -> None:
    tf = pytest.importorskip("tensorflow")
    base, reports = torch_local
    infos(reports, "slices")
    infos(reports, "dtensor")
    for name, want in [("slices", FULL), ("dtensor", dtensor_expected())]:
        reader = tf.train.load_checkpoint(str(base / name))
        shapes = reader.get_variable_to_shape_map()
        assert shapes == {k: list(v.shape) for k, v in want.items()}, shapes
        for key, value in want.items():
            got = reader.get_tensor(key)
            if value.dtype == ml_dtypes.bfloat16:
                got = np.asarray(got).astype(ml_dtypes.bfloat16)  # TF gives bfloat16 as is
            assert_bit_exact(np.asarray(got, dtype=value.dtype), value, key)


def test_a_rank_that_cannot_prepare_fails_every_rank(
    torch_local: tuple[Path, list[dict[str, Any]]],
) -> None:
    base, reports = torch_local
    for rank, report in enumerate(reports):
        got = report["bad_dtype"]
        if rank == 1:  # its own error, as a single-process save would raise it
            assert got["error"] == "UnsupportedError", got
            assert "datetime64" in got["message"], got
        else:  # the others are told who failed and why
            assert got["error"] == "CoordinationError", got
            assert got["ranks"] == (1,), got
            assert "datetime64" in got["message"], got
    for rank, report in enumerate(reports):
        got = report["bad_shape"]
        assert got["error"] == "CoordinationError", (rank, got)
        assert 3 in got["ranks"] and "1001" in got["message"], (rank, got)
    listing = local_listing(base)
    assert not files_of(listing, "bad_dtype") and not files_of(listing, "bad_shape"), sorted(
        listing
    )


# -- torch.distributed on S3 ---------------------------------------------------------------


def fresh_moto(servers: Servers) -> Any:
    server = servers.get("moto")
    server.reset()
    server.create_bucket(BUCKET)
    return server


def s3_listing(server: Any, key: str) -> dict[str, bytes]:
    fs = server.filesystem()
    return {
        path.rsplit("/", 1)[-1]: fs.cat_file(path)
        for path in fs.find(f"{BUCKET}/{key}", maxdepth=1)
    }


@pytest.mark.cloud
def test_torch_slices_on_s3(servers: Servers) -> None:
    pytest.importorskip("torch.distributed")
    server = fresh_moto(servers)
    options = server.storage_options()
    key = uuid.uuid4().hex
    base = f"s3://{BUCKET}/{key}"
    results = run_workers(
        "workers_save:torch_job",
        WORLD,
        kwargs={"base": base, "scenarios": ["slices"], "storage_options": options},
        timeout=JOB_TIMEOUT,
    )
    reports = values(results)
    check_standard(reports, "slices", "slices", s3_listing(server, key), f"{base}/slices", options)


# -- the storage coordinator: plain processes, no engine -----------------------------------


def coordination_left(listing: list[str], seq_names: str) -> None:
    """What the docstring allows after a run: ``run`` and one file per rank of its last
    collective (the save's ``outcome``)."""
    assert "run" in listing, listing
    rest = sorted(name for name in listing if name != "run")
    assert len(rest) == WORLD, listing
    parts = [name.split(".") for name in rest]
    assert len({p[0] for p in parts}) == 1, listing  # one run
    assert sorted(p[2] for p in parts) == [str(r) for r in range(WORLD)], listing
    assert {p[3] for p in parts} == {seq_names}, listing


def test_storage_coordinator_on_local_disk(tmp_path: Path) -> None:
    prefixes = [str(tmp_path / "first"), str(tmp_path / "second")]
    results = run_workers(
        "workers_save:storage_job",
        WORLD,
        kwargs={"prefixes": prefixes, "timeout": 60.0},
        timeout=JOB_TIMEOUT,
    )
    reports = values(results)
    assert all(r["engines"] == [] for r in reports), [r["engines"] for r in reports]
    listing = local_listing(tmp_path)
    for prefix in prefixes:
        name = Path(prefix).name
        check_standard(reports, prefix, name, listing, prefix)
    # two saves in one directory: the second run removed the first's files
    assert sorted(p.name for p in tmp_path.iterdir() if not p.is_file()) == [
        ".streamckpt-coordination"
    ]
    coordination_left(
        [p.name for p in (tmp_path / ".streamckpt-coordination").iterdir()], "outcome"
    )


def test_ranks_that_disagree_about_num_shards(tmp_path: Path) -> None:
    """Rank 1 passes ``num_shards=2``, the others None: the save must be refused (no index)
    or agree on one plan; never commit a checkpoint that does not load."""
    prefix = str(tmp_path / "ckpt")
    results = run_workers(
        "workers_save:storage_job",
        WORLD,
        kwargs={"prefixes": [prefix], "timeout": 60.0, "num_shards": {1: 2}},
        timeout=JOB_TIMEOUT,
    )
    outcomes = [report[prefix] for report in values(results)]
    if any("error" in o for o in outcomes):
        for o in outcomes:
            assert o.get("error") == "CoordinationError" and 1 in o["ranks"], outcomes
        assert not files_of(local_listing(tmp_path), "ckpt"), sorted(local_listing(tmp_path))
        return
    info = infos([{"x": o} for o in outcomes], "x")
    listing = files_of(local_listing(tmp_path), "ckpt")
    assert sorted(listing) == sorted(f.rsplit("/", 1)[-1] for f in info.files), sorted(listing)
    loaded = streamckpt.sync.load(prefix)
    for key, value in FULL.items():
        assert_bit_exact(loaded[key], value, key)


@pytest.mark.cloud
def test_storage_coordinator_on_s3(servers: Servers) -> None:
    server = fresh_moto(servers)
    options = server.storage_options()
    key = uuid.uuid4().hex
    prefix = f"s3://{BUCKET}/{key}/ckpt"
    results = run_workers(
        "workers_save:storage_job",
        WORLD,
        kwargs={"prefixes": [prefix], "storage_options": options, "timeout": 60.0},
        timeout=JOB_TIMEOUT,
    )
    reports = values(results)
    check_standard(reports, prefix, "ckpt", s3_listing(server, key), prefix, options)
    coordination_left(list(s3_listing(server, f"{key}/.streamckpt-coordination")), "outcome")


# -- a process SIGKILLed in the middle of its write ----------------------------------------


def digest(listing: Mapping[str, bytes]) -> dict[str, str]:
    return {k: hashlib.sha256(v).hexdigest() for k, v in listing.items()}


@pytest.mark.parametrize("victim", [2, 0])
def test_a_rank_killed_while_writing(tmp_path: Path, victim: int) -> None:
    """The victim stops at the first byte of its shard of ``failed`` (its progress callback
    sleeps there, after writing a marker) and is SIGKILLed; the survivors fail with a
    CoordinationError within the timeout, no index appears, and the checkpoint saved just
    before in the same directory is untouched.

    Rank 2: the survivors name it, and every shard of ``failed`` goes (the dead rank's
    partial one removed by the primary). Rank 0, the primary and the c10d store's host: the
    survivors cannot tell who for sure (no rank named, or every rank whose arrival they had
    not seen, rank 0 among them) and remove their own shards; the primary's
    partial shard and its claim stay, and the next save of the prefix is not blocked by them
    and reclaims them.
    """
    pytest.importorskip("torch.distributed")
    marker = tmp_path / "victim-is-writing"
    base = tmp_path / "ckpt"
    base.mkdir()
    procs = start_workers(
        "workers_save:torch_killed",
        WORLD,
        kwargs={"base": str(base), "marker": str(marker), "victim": victim, "timeout": TIMEOUT},
    )
    try:
        deadline = time.monotonic() + JOB_TIMEOUT
        while not marker.exists():
            exited = [p.poll() for p in procs]
            assert time.monotonic() < deadline and None in exited, "no rank reached the marker"
            assert procs[victim].poll() is None, "the victim exited before its write"
            time.sleep(0.05)
        before = digest(files_of(local_listing(base), "before"))
        partial = sorted(files_of(local_listing(base), "failed"))
        kill(procs[victim])
        killed_at = time.monotonic()
    finally:
        results = collect(procs, timeout=JOB_TIMEOUT)
    ended = time.monotonic() - killed_at

    victim_shard = f"failed.data-{victim:05d}-of-{WORLD:05d}"
    assert victim_shard in partial, partial  # it existed when its writer died
    assert results[victim].returncode == -9
    for result in results:
        if result.rank == victim:
            continue
        assert result.ok, (result.rank, result.error, result.output[-3000:])
        assert "info" in result.value["before"], result.value
        failed = result.value["failed"]
        assert failed.get("error") == "CoordinationError", (result.rank, failed)
        if victim:
            assert failed["ranks"] == (victim,), (result.rank, failed)
        else:  # the store's host died: no rank named, or the ranks not seen, the primary among them
            assert not failed["ranks"] or victim in failed["ranks"], (result.rank, failed)
    assert ended < TIMEOUT + MARGIN, ended

    listing = local_listing(base)
    assert digest(files_of(listing, "before")) == before
    survivors = [r.value for r in results if r.rank != victim]
    check_standard(survivors, "before", "before", listing, str(base / "before"))
    left = sorted(files_of(listing, "failed"))
    if victim:
        assert left == [], left  # no index, no shard, no claim
        return
    assert left == sorted(["failed.claim", victim_shard]), left  # nobody left to remove them
    # the dead primary's claim is no lock any more: a new save takes the prefix and its
    # leftovers go (a single process, one shard: every -of-4 name would be garbage)
    streamckpt.sync.save(str(base / "failed"), {"x": FULL["bias"]})
    assert sorted(files_of(local_listing(base), "failed")) == [
        "failed.data-00000-of-00001",
        "failed.index",
    ]


# -- jax.distributed: multi-controller arrays ----------------------------------------------


def test_jax_processes_save_global_arrays(tmp_path: Path) -> None:
    pytest.importorskip("jax")
    results = run_workers(
        "workers_save:jax_job",
        WORLD,
        kwargs={"base": str(tmp_path), "timeout": 60.0},
        env={"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
        timeout=JOB_TIMEOUT,
    )
    reports = values(results)
    for report in reports:
        assert report["devices"] == (8, 2), report["devices"]
        # no process holds any of them whole: the save must gather pieces from all
        assert not any(report["fully_addressable"].values()), report["fully_addressable"]
    want = dict(FULL)
    for name, (shape, _) in ws.JAX_CASES.items():
        want[name] = ws.jax_full(shape)
    pieces = dict(FULL_PIECES, j_grid=8, j_rows=4, j_cols=2)
    check_checkpoint(
        "jax",
        infos(reports, "save"),
        local_listing(tmp_path),
        str(tmp_path / "jax"),
        want,
        pieces=pieces,
    )
