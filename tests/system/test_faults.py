"""Faults between streamckpt and real object stores, injected by a proxy on 127.0.0.1.

Each test talks to fake-gcs-server (GCS) or moto (S3), some also to SeaweedFS, through
`faultproxy`, which answers chosen requests with an error status, resets a connection part-way
through a body, cuts a response short, or slows everything down. Two promises are checked:

- Retries: transient failures (408, 429, 5xx, broken connections, cut bodies) are retried and
  the save or load succeeds, with exactly the retries and throttles the proxy injected in its
  statistics; permanent ones (403, 404, 412) fail at once with the matching StreamCkptError.
- Nothing lost: whatever happens to a save of ckpt-2 (faults, cancellation at any point, a
  SIGKILLed process), either ckpt-2 loads bit-exact, or no ckpt-2.index exists (and, but for
  SIGKILL, no ckpt-2 data either); ckpt-1 in the same directory always loads bit-exact.

Counting requests: aiohttp silently sends an idempotent request (an S3 PUT) once more when a
reused keep-alive connection breaks before the answer, so a connection reset on S3 may be
absorbed below streamckpt; the tests count such resends instead of assuming them away. On GCS
streamckpt sends data shards as media uploads (one POST each, the name in the URL): a shard
smaller than a part as itself, a larger one as temporary parts that a compose POST joins; the
index goes up as gcsfs's simple "multipart" upload (the name inside the body).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import json
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import types
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

import anyio
import anyio.from_thread
import numpy as np
import pytest

import streamckpt
import streamckpt.storage.retry as retry_module
from streamckpt.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    ChecksumError,
    CorruptCheckpointError,
    PermissionDeniedError,
    SaveInProgressError,
    StorageError,
)
from streamckpt.pipeline.read import open_reader
from streamckpt.pipeline.save import SaveInfo, prepare_all, save_tensors
from streamckpt.storage import FsspecStore, RetryPolicy, Store, resolve
from streamckpt.storage.base import ByteBudget
from streamckpt.storage.claim import CLAIM_LEASE_S
from streamckpt.storage.retry import AdaptiveLimiter
from streamckpt.testing.faultproxy import FaultProxy, FaultRule
from streamckpt.testing.servers import ObjectStoreServer

pytestmark = [
    pytest.mark.cloud,
    pytest.mark.filterwarnings("ignore:Sending a large body directly:ResourceWarning:aiohttp"),
]

KiB = 1 << 10
MiB = 1 << 20
BUCKET = "streamckpt-tests"  # made by conftest's `servers`
SHARDS = 4
# Retries as the library does them, with waits short enough for a test.
FAST = RetryPolicy(initial_backoff=0.001, max_backoff=0.01, max_attempts=6)
CHILD = Path(__file__).resolve().parents[1] / "support" / "fault_child.py"
DEADLINE_S = 30.0

Tensors = dict[str, Any]


# -- where the tests write --------------------------------------------------------------------


class _AnswerSink:
    """Stands in for the client's writer: lets "100 Continue" through, swallows the answer."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer

    def write(self, data: bytes) -> None:
        if data.startswith(b"HTTP/1.1 100 "):
            self._writer.write(data)

    async def drain(self) -> None:
        await self._writer.drain()


class AnswerDroppingProxy(FaultProxy):
    """The fault proxy plus one fault: the request reaches the store, its answer never comes.

    The client's connection is reset once the store has answered, as when a load balancer
    drops a connection at the wrong moment; aiohttp then re-sends an S3 PUT by itself. Built
    on faultproxy's relay internals (`_forward`, `_add`, `_start`, `_stop`); the proxy log
    records the store's status for such a request although the client never saw it.
    """

    def drop_answer(self, **where: Any) -> FaultRule:
        return self._add(FaultRule("drop_answer", **where))

    async def _forward(  # type: ignore[override]
        self, conn: Any, rule: FaultRule | None, *args: Any
    ) -> bool:
        if rule is None or rule.kind != "drop_answer":
            return await super()._forward(conn, rule, *args)
        writer = conn.writer
        conn.writer = _AnswerSink(writer)
        try:
            await super()._forward(conn, None, *args)
        finally:
            conn.writer = writer
        sock = writer.get_extra_info("socket")
        if sock is not None:  # RST, not FIN: the connection broke
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
        return False


@contextlib.contextmanager
def run_dropping_proxy(server: ObjectStoreServer) -> Iterator[AnswerDroppingProxy]:
    upstream = urlsplit(server.endpoint)
    assert upstream.hostname is not None and upstream.port is not None
    proxy = AnswerDroppingProxy(upstream.hostname, upstream.port)
    try:
        proxy._start()
        yield proxy
    finally:
        proxy._stop()


@dataclass
class Site:
    """One running server, a fault proxy in front of it, and a client that bypasses the proxy."""

    server: ObjectStoreServer
    proxy: AnswerDroppingProxy
    admin: Any  # a sync fsspec filesystem straight to the server

    @property
    def gcs(self) -> bool:
        return self.server.scheme == "gs"


@contextlib.contextmanager
def open_site(servers: Any, kind: str) -> Iterator[Site]:
    server: ObjectStoreServer = servers.get(kind)
    admin = server.filesystem()
    if not admin.exists(BUCKET):  # another module may have reset the server
        server.create_bucket(BUCKET)
    try:
        with run_dropping_proxy(server) as proxy:
            yield Site(server, proxy, admin)
    finally:
        del admin
        gc.collect()  # collect sync clients while no test loop runs (see testing.servers)


@pytest.fixture(scope="module", params=["gcs", "moto"])
def site(request: pytest.FixtureRequest, servers: Any) -> Iterator[Site]:
    with open_site(servers, request.param) as opened:
        yield opened


#: What a small object write looks like on GCS (the object's name is in the body).
GCS_SMALL_WRITE: dict[str, Any] = {"method": "POST", "path_contains": "uploadType=multipart"}


@dataclass
class Env:
    """One test's directory on a site, and ways to reach it with and without faults."""

    site: Site
    directory: str  # bucket/dir, no scheme

    @property
    def proxy(self) -> AnswerDroppingProxy:
        return self.site.proxy

    @property
    def upload_method(self) -> str:
        return "POST" if self.site.gcs else "PUT"

    def url(self, name: str) -> str:
        return f"{self.site.server.scheme}://{self.directory}/{name}"

    def options(self, *, faulty: bool = True) -> dict[str, Any]:
        return self.site.server.storage_options(self.proxy.endpoint if faulty else None)

    def store(self, name: str, policy: RetryPolicy = FAST) -> tuple[Store, str]:
        """A store through the proxy with quick retries, and the checkpoint's path in it."""
        return resolve(self.url(name), storage_options=self.options(), retry_policy=policy)

    def objects(self) -> set[str]:
        self.site.admin.invalidate_cache()
        return {p.rsplit("/", 1)[-1] for p in self.site.admin.find(self.directory)}

    def shard_upload(self, name: str, shard: int, of: int = SHARDS) -> dict[str, Any]:
        """The requests that carry a data shard's bytes (GCS: and the compose of its parts)."""
        target = f"{name}.data-{shard:05d}-of-{of:05d}"
        return {"method": "POST" if self.site.gcs else "PUT", "path_contains": target}

    def any_shard_upload(self, name: str) -> dict[str, Any]:
        """Every upload request of a checkpoint's data shards (GCS: initiations too)."""
        return {"method": self.upload_method, "path_contains": f"{name}.data-"}

    def index_write(self, name: str) -> dict[str, Any]:
        if self.site.gcs:  # "multipart" uploads: the save's claim, then its index (see env_on)
            return dict(GCS_SMALL_WRITE)
        return {"method": "PUT", "path_contains": f"/{name}.index"}

    def shard_read(self, name: str, shard: int, of: int = SHARDS) -> dict[str, Any]:
        return {"method": "GET", "path_contains": f"{name}.data-{shard:05d}-of-{of:05d}"}

    def index_read(self, name: str) -> dict[str, Any]:
        return {"method": "GET", "path_contains": f"{name}.index"}

    def sent(self, where: dict[str, Any]) -> list[int]:
        """Statuses of the requests the proxy saw that `where` matches (0: no answer).

        On GCS the first small write through the proxy is the save's claim, not its index.
        """
        statuses = [
            status
            for method, target, status in self.proxy.stats().log
            if method == where["method"] and where["path_contains"] in target
        ]
        return statuses[1:] if self.site.gcs and where == GCS_SMALL_WRITE else statuses

    async def save_clean(self, name: str, tensors: Tensors, num_shards: int = SHARDS) -> SaveInfo:
        return await streamckpt.save(
            self.url(name),
            tensors,
            num_shards=num_shards,
            storage_options=self.options(faulty=False),
        )

    async def load_clean(self, name: str) -> dict[str, np.ndarray[Any, Any]]:
        return await streamckpt.load(self.url(name), storage_options=self.options(faulty=False))


@contextlib.contextmanager
def env_on(site: Site) -> Iterator[Env]:
    """A fresh directory and a proxy with no faults and zeroed counters."""
    site.proxy.clear()
    site.proxy.reset_stats()
    if site.gcs:
        # A save's claim and its index are both small "multipart" uploads, told apart only by
        # their bodies: this rule lets the first one (the claim) through, so that a fault
        # aimed at `index_write` reaches the index.
        site.proxy.delay(0.0, times=1, **GCS_SMALL_WRITE)
    directory = f"{BUCKET}/faults-{uuid.uuid4().hex[:12]}"
    try:
        yield Env(site, directory)
    finally:
        site.proxy.clear()
        site.admin.invalidate_cache()
        if leftovers := site.admin.find(directory):
            site.admin.rm(leftovers)


@pytest.fixture
def env(site: Site) -> Iterator[Env]:
    with env_on(site) as opened:
        yield opened


# -- checkpoints and what must hold after a fault ---------------------------------------------


def make_tensors(seed: int, *, count: int = 6, nbytes: int = 24 * KiB) -> Tensors:
    """Random bit patterns (NaNs included) under names shared by every seed."""
    rng = np.random.default_rng(seed)
    raw = [rng.integers(0, 256, size=nbytes, dtype=np.uint8) for _ in range(count)]
    dtypes = [np.float32, np.int64, np.float16, np.uint8, np.int32, np.float64]
    tensors: Tensors = {f"layer{i}/w": raw[i].view(dtypes[i % len(dtypes)]) for i in range(count)}
    tensors["step"] = np.int64(seed)
    tensors["vocab"] = np.array([bytes([seed]) * 3, b"", b"\xff" * 40], dtype=object)
    return tensors


def assert_bit_exact(loaded: dict[str, np.ndarray[Any, Any]], expected: Tensors) -> None:
    assert set(loaded) == set(expected)
    for name, value in expected.items():
        want = np.asarray(value)
        got = loaded[name]
        assert (got.dtype, got.shape) == (want.dtype, want.shape), name
        if want.dtype == object:
            assert list(got.reshape(-1)) == list(want.reshape(-1)), name
        else:
            assert got.tobytes() == want.tobytes(), name


def ckpt_files(objects: set[str], name: str) -> set[str]:
    return {o for o in objects if o.startswith(f"{name}.")}


async def assert_nothing_lost(
    env: Env,
    *,
    saved: bool,
    ckpt1: Tensors,
    ckpt1_files: set[str],
    ckpt2: Tensors,
    orphans_allowed: bool = False,
) -> None:
    """ckpt-2 loads bit-exact if its save returned, else has no index (and no data); ckpt-1
    is untouched either way."""
    objects = env.objects()
    if saved:
        assert_bit_exact(await env.load_clean("ckpt-2"), ckpt2)
    else:
        assert "ckpt-2.index" not in objects
        if not orphans_allowed:
            assert ckpt_files(objects, "ckpt-2") == set()
        with pytest.raises(CheckpointNotFoundError):
            await env.load_clean("ckpt-2")
    assert ckpt_files(objects, "ckpt-1") == ckpt1_files
    assert_bit_exact(await env.load_clean("ckpt-1"), ckpt1)


async def save_ckpt1(env: Env) -> tuple[Tensors, set[str]]:
    ckpt1 = make_tensors(1)
    await env.save_clean("ckpt-1", ckpt1)
    files = ckpt_files(env.objects(), "ckpt-1")
    assert len(files) == SHARDS + 1
    return ckpt1, files


async def faulty_save(env: Env, tensors: Tensors, **kwargs: Any) -> tuple[SaveInfo, Store]:
    store, path = env.store("ckpt-2")
    info = await save_tensors(store, path, tensors, num_shards=SHARDS, overwrite=False, **kwargs)
    return info, store


# -- A. retries, permanent failures and adaptive concurrency ------------------------------------


@pytest.mark.anyio
async def test_one_503_on_the_index_write_is_one_retry_and_one_throttle(env: Env) -> None:
    tensors = make_tensors(2)
    rule = env.proxy.inject_status(503, **env.index_write("ckpt-2"))

    info = await streamckpt.save(
        env.url("ckpt-2"), tensors, num_shards=SHARDS, storage_options=env.options()
    )

    assert rule.fired == 1
    assert env.sent(env.index_write("ckpt-2")) == [503, 200]
    assert (info.stats["retries"], info.stats["throttles"], info.stats["failures"]) == (1, 1, 0)
    assert_bit_exact(await env.load_clean("ckpt-2"), tensors)


@pytest.mark.anyio
@pytest.mark.parametrize(("status", "throttle"), [(408, 0), (429, 1), (500, 0), (503, 1)])
@pytest.mark.parametrize("target", ["shard", "index"])
async def test_transient_status_on_save_is_retried(
    env: Env, status: int, throttle: int, target: str
) -> None:
    tensors = make_tensors(2)
    where = env.shard_upload("ckpt-2", 1) if target == "shard" else env.index_write("ckpt-2")
    env.proxy.inject_status(status, **where)

    info, _ = await faulty_save(env, tensors)

    assert env.sent(where) == [status, 200]
    assert (info.stats["retries"], info.stats["throttles"], info.stats["failures"]) == (
        1,
        throttle,
        0,
    )
    assert_bit_exact(await env.load_clean("ckpt-2"), tensors)


@pytest.mark.anyio
@pytest.mark.parametrize(("status", "throttle"), [(408, 0), (429, 1), (500, 0), (503, 1)])
async def test_transient_status_on_load_is_retried(env: Env, status: int, throttle: int) -> None:
    tensors = make_tensors(2)
    await env.save_clean("ckpt-2", tensors)
    where = env.shard_read("ckpt-2", 2)
    env.proxy.inject_status(status, **where)

    stats: dict[str, float] = {}
    loaded = await streamckpt.load(env.url("ckpt-2"), storage_options=env.options(), stats=stats)

    assert_bit_exact(loaded, tensors)
    assert env.sent(where) == [status, 206]
    assert (stats["retries"], stats["throttles"], stats["failures"]) == (1, throttle, 0)


@pytest.mark.anyio
async def test_connection_reset_mid_upload_is_retried(env: Env) -> None:
    tensors = make_tensors(2)
    where = env.shard_upload("ckpt-2", 1)
    rule = env.proxy.reset_request_after(8 * KiB, times=2, **where)

    info, _ = await faulty_save(env, tensors)

    assert rule.fired == 2
    statuses = env.sent(where)
    assert statuses[:2] == [0, 0] and statuses[2:] == [200]  # two cut, then one through
    retries = info.stats["retries"]
    if env.site.gcs:
        assert retries == 2  # gcsfs uploads with POST, which aiohttp never re-sends
    else:
        # aiohttp re-sends a PUT broken on a reused connection once, unseen by streamckpt
        assert 1 <= retries <= 2
    assert (info.stats["throttles"], info.stats["failures"]) == (0, 0)
    assert_bit_exact(await env.load_clean("ckpt-2"), tensors)


@pytest.mark.anyio
async def test_lost_answer_to_the_index_write_is_recognised_as_our_own_index(env: Env) -> None:
    tensors = make_tensors(2)
    where = env.index_write("ckpt-2")
    rule = env.proxy.drop_answer(**where)

    info, _ = await faulty_save(env, tensors)

    assert rule.fired == 1
    # the index landed unseen; the next try is refused as create-only, then read back as ours
    assert env.sent(where) == [200, 412]
    if env.site.gcs:
        assert info.stats["retries"] == 1
    else:
        # the second PUT was aiohttp's own re-send, so streamckpt saw one try and a 412
        assert info.stats["retries"] <= 1
    assert_bit_exact(await env.load_clean("ckpt-2"), tensors)


@pytest.mark.anyio
@pytest.mark.parametrize("fault", ["truncate_response", "reset_response_after"])
@pytest.mark.parametrize("target", ["shard", "index"])
async def test_cut_read_body_is_retried(env: Env, fault: str, target: str) -> None:
    tensors = make_tensors(2)
    await env.save_clean("ckpt-2", tensors)
    where = env.shard_read("ckpt-2", 0) if target == "shard" else env.index_read("ckpt-2")
    rule = getattr(env.proxy, fault)(100, **where)

    stats: dict[str, float] = {}
    loaded = await streamckpt.load(env.url("ckpt-2"), storage_options=env.options(), stats=stats)

    assert rule.fired == 1
    assert_bit_exact(loaded, tensors)
    assert len(env.sent(where)) == 2
    assert (stats["retries"], stats["throttles"], stats["failures"]) == (1, 0, 0)


@pytest.mark.anyio
async def test_403_on_load_is_permission_denied_and_not_retried(env: Env) -> None:
    await env.save_clean("ckpt-2", make_tensors(2))
    env.proxy.inject_status(403, error_code="AccessDenied", times=None, **env.index_read("ckpt-2"))
    store, path = env.store("ckpt-2")

    with pytest.raises(PermissionDeniedError) as caught:
        await open_reader(store, path)

    assert "ckpt-2.index" in str(caught.value)
    assert env.sent(env.index_read("ckpt-2")) == [403]
    assert (store.stats.retries, store.stats.failures) == (0, 1)


@pytest.mark.anyio
async def test_404_on_load_is_not_found_and_not_retried(env: Env) -> None:
    await env.save_clean("ckpt-2", make_tensors(2))
    env.proxy.inject_status(404, error_code="NoSuchKey", times=None, **env.index_read("ckpt-2"))
    store, path = env.store("ckpt-2")

    with pytest.raises(CheckpointNotFoundError):
        await open_reader(store, path)

    assert env.sent(env.index_read("ckpt-2")) == [404]
    assert (store.stats.retries, store.stats.failures) == (0, 1)


@pytest.mark.anyio
async def test_412_on_the_index_write_is_exists_and_not_retried(env: Env) -> None:
    ckpt1, ckpt1_files = await save_ckpt1(env)
    where = env.index_write("ckpt-2")
    env.proxy.inject_status(412, error_code="PreconditionFailed", times=None, **where)

    with pytest.raises(CheckpointExistsError):
        await faulty_save(env, make_tensors(2))

    assert env.sent(where) == [412]
    await assert_nothing_lost(
        env, saved=False, ckpt1=ckpt1, ckpt1_files=ckpt1_files, ckpt2=make_tensors(2)
    )


@pytest.mark.anyio
async def test_403_on_a_shard_upload_fails_the_save_at_once(env: Env) -> None:
    ckpt1, ckpt1_files = await save_ckpt1(env)
    where = env.shard_upload("ckpt-2", 2)
    env.proxy.inject_status(403, error_code="AccessDenied", times=None, **where)
    store, path = env.store("ckpt-2")

    with pytest.raises(PermissionDeniedError):
        await save_tensors(store, path, make_tensors(2), num_shards=SHARDS, overwrite=False)

    assert env.sent(where) == [403]
    assert store.stats.retries == 0
    assert env.sent(env.index_write("ckpt-2")) == []
    await assert_nothing_lost(
        env, saved=False, ckpt1=ckpt1, ckpt1_files=ckpt1_files, ckpt2=make_tensors(2)
    )


@pytest.mark.anyio
async def test_endless_503_fails_with_a_storage_error_after_the_policy_s_attempts(
    env: Env,
) -> None:
    ckpt1, ckpt1_files = await save_ckpt1(env)
    where = env.index_write("ckpt-2")
    env.proxy.inject_status(503, times=None, **where)
    store, path = env.store("ckpt-2")

    with pytest.raises(StorageError):
        await save_tensors(store, path, make_tensors(2), num_shards=SHARDS, overwrite=False)

    assert env.sent(where) == [503] * FAST.max_attempts
    stats = store.stats.snapshot()
    assert (stats["retries"], stats["throttles"], stats["failures"]) == (
        FAST.max_attempts - 1,
        FAST.max_attempts,
        1,
    )
    await assert_nothing_lost(
        env, saved=False, ckpt1=ckpt1, ckpt1_files=ckpt1_files, ckpt2=make_tensors(2)
    )


def sixteen_small_tensors(seed: int) -> Tensors:
    rng = np.random.default_rng(seed)
    return {f"t{i:02d}": rng.standard_normal(1024).astype(np.float32) for i in range(16)}


@pytest.mark.anyio
async def test_429_burst_on_16_shard_uploads_is_no_storm(env: Env) -> None:
    tensors = sixteen_small_tensors(3)
    burst = 6
    where = env.any_shard_upload("ckpt-2")
    env.proxy.inject_status(429, times=burst, **where)
    store, path = env.store("ckpt-2")

    info = await save_tensors(store, path, tensors, num_shards=16, overwrite=False)

    uploads = env.sent(where)  # one request per small shard
    assert uploads.count(429) == burst
    # each rejected request costs exactly one more: no storm of retries
    assert 16 + burst <= len(uploads) <= 16 + burst + 2
    assert (info.stats["throttles"], info.stats["retries"], info.stats["failures"]) == (
        burst,
        burst,
        0,
    )
    assert_bit_exact(await env.load_clean("ckpt-2"), tensors)


@pytest.mark.anyio
async def test_429_burst_on_shard_uploads_halves_the_adaptive_limit(env: Env) -> None:
    store, path = env.store("ckpt-2")
    assert isinstance(store, FsspecStore)
    store.limiter = AdaptiveLimiter(latency_factor=1e9)  # congestion: throttles only
    env.proxy.inject_status(429, times=6, **env.any_shard_upload("ckpt-2"))

    await save_tensors(store, path, sixteen_small_tensors(3), num_shards=16, overwrite=False)

    assert store.stats.throttles == 6
    # A throttled upload is the congestion signal the limiter exists for.
    assert store.limiter.cuts >= 1


@pytest.mark.anyio
async def test_429_burst_on_16_shard_reads_halves_the_adaptive_limit(env: Env) -> None:
    tensors = sixteen_small_tensors(4)
    await env.save_clean("ckpt-2", tensors, num_shards=16)
    burst = 6
    where = {"method": "GET", "path_contains": "ckpt-2.data-"}
    env.proxy.inject_status(429, times=burst, **where)
    store, path = env.store("ckpt-2")
    assert isinstance(store, FsspecStore)
    store.limiter = AdaptiveLimiter(latency_factor=1e9)  # congestion: throttles only

    reader = await open_reader(store, path)
    loaded = await reader.read_many(list(tensors))

    assert_bit_exact(loaded, tensors)
    reads = env.sent(where)
    assert reads.count(429) == burst and len(reads) == 16 + burst
    assert (store.stats.throttles, store.stats.retries) == (burst, burst)
    assert store.limiter.cuts >= 1


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(retry_module, "time", types.SimpleNamespace(monotonic=fake.monotonic))
    return fake


@pytest.mark.anyio
async def test_adaptive_limiter_grows_one_slot_per_window_of_successes(clock: FakeClock) -> None:
    limiter = AdaptiveLimiter(initial=4, maximum=6)
    for _ in range(4):
        limiter.on_success(0.01)
    assert limiter.current == 4  # +1/limit each: 4.92 after four, not a whole slot yet
    limiter.on_success(0.01)
    assert limiter.current == 5
    for _ in range(4):
        limiter.on_success(0.01)
    assert limiter.current == 5
    limiter.on_success(0.01)
    assert limiter.current == 6
    for _ in range(50):
        limiter.on_success(0.01)
    assert (limiter.current, limiter.peak, limiter.cuts) == (6, 6, 0)


@pytest.mark.anyio
async def test_adaptive_limiter_halves_once_per_burst_down_to_its_minimum(
    clock: FakeClock,
) -> None:
    limiter = AdaptiveLimiter(initial=8, minimum=2)
    limiter.on_throttle()
    assert (limiter.current, limiter.cuts) == (4, 1)
    clock.now += 0.01
    limiter.on_throttle()  # same burst of rejections: one congestion signal
    assert (limiter.current, limiter.cuts) == (4, 1)
    for expected in (2, 2):
        clock.now += 1.0
        limiter.on_throttle()
        assert limiter.current == expected
    assert limiter.cuts == 3


@pytest.mark.anyio
async def test_adaptive_limiter_halves_when_latency_climbs(clock: FakeClock) -> None:
    limiter = AdaptiveLimiter(initial=8)
    limiter.on_success(0.01)  # baseline
    limiter.on_success(0.045)  # over 4x the baseline, but too short to matter
    assert limiter.cuts == 0
    limiter.on_success(1.0)
    limiter.on_success(1.0)
    assert limiter.cuts == 0  # two slow requests are no trend yet
    limiter.on_success(1.0)
    assert (limiter.current, limiter.cuts) == (4, 1)


@pytest.mark.anyio
async def test_adaptive_limiter_ignores_slow_outliers_between_normal_requests(
    clock: FakeClock,
) -> None:
    """A small request queued behind large ones on a busy link is slow, yet no congestion."""
    limiter = AdaptiveLimiter(initial=8)
    limiter.on_success(0.01)
    for _ in range(5):
        limiter.on_success(1.0)
        limiter.on_success(1.0)
        limiter.on_success(0.01)
    assert limiter.cuts == 0
    # and sizes are compared within their class: 16 MiB parts at a capped bandwidth are slow
    limiter.on_success(0.2, 16 << 20)
    for _ in range(3):
        limiter.on_success(0.25, 16 << 20)
    assert limiter.cuts == 0


@pytest.mark.anyio
async def test_adaptive_limiter_bounds_concurrency_and_a_cut_takes_effect() -> None:
    limiter = AdaptiveLimiter(initial=4)
    inside = 0
    most = 0
    release = anyio.Event()

    async def request() -> None:
        nonlocal inside, most
        async with limiter:
            inside += 1
            most = max(most, inside)
            await release.wait()
            inside -= 1

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(request)
        await anyio.wait_all_tasks_blocked()
        assert inside == 4
        limiter.on_throttle()
        assert limiter.current == 2
        release.set()
    assert most == 4 and inside == 0

    entered_after_cut = 0
    gate = anyio.Event()

    async def later() -> None:
        nonlocal entered_after_cut
        async with limiter:
            entered_after_cut += 1
            await gate.wait()

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(later)
        await anyio.wait_all_tasks_blocked()
        assert entered_after_cut == 2
        gate.set()


# -- B. nothing lost: a fault matrix ------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """Arms the proxy before the save of ckpt-2 (or before loading it: `on_load`)."""

    name: str
    arm: Callable[[Env], object]
    must_save: bool = True  # the save must succeed through it (retried); else StorageError
    on_load: bool = False


def _index_answer_lost(env: Env) -> None:
    # The index reaches the store but its answer does not: the next try meets its own index
    # (on S3 that try is aiohttp's silent re-send, below streamckpt's retries).
    env.proxy.drop_answer(**env.index_write("ckpt-2"))


FAULTS = [
    Fault("latency", lambda env: env.proxy.set_latency(0.02)),
    Fault("bandwidth", lambda env: env.proxy.set_bandwidth(2 * MiB)),
    Fault(
        "reset_mid_upload",
        lambda env: env.proxy.reset_request_after(8 * KiB, **env.shard_upload("ckpt-2", 1)),
    ),
    Fault(
        "503_on_shard", lambda env: env.proxy.inject_status(503, **env.shard_upload("ckpt-2", 2))
    ),
    Fault("503_on_index", lambda env: env.proxy.inject_status(503, **env.index_write("ckpt-2"))),
    Fault(
        "429_burst",
        lambda env: env.proxy.inject_status(429, times=3, **env.any_shard_upload("ckpt-2")),
    ),
    Fault("index_answer_lost", _index_answer_lost),
    Fault("shard_answer_lost", lambda env: env.proxy.drop_answer(**env.shard_upload("ckpt-2", 0))),
    Fault(
        "endless_reset_on_shard",
        lambda env: env.proxy.reset_request_after(
            4 * KiB, times=None, **env.shard_upload("ckpt-2", 3)
        ),
        must_save=False,
    ),
    Fault(
        "endless_503_on_index",
        lambda env: env.proxy.inject_status(503, times=None, **env.index_write("ckpt-2")),
        must_save=False,
    ),
    Fault(
        "truncated_shard_read",
        lambda env: env.proxy.truncate_response(1000, **env.shard_read("ckpt-2", 1)),
        on_load=True,
    ),
    Fault(
        "truncated_index_read",
        lambda env: env.proxy.truncate_response(10, **env.index_read("ckpt-2")),
        on_load=True,
    ),
]
# A subset also runs against SeaweedFS, a real storage engine behind an S3 API.
SEAWEED_FAULTS = {"reset_mid_upload", "503_on_shard", "index_answer_lost", "truncated_shard_read"}


async def run_fault(env: Env, fault: Fault) -> None:
    ckpt1, ckpt1_files = await save_ckpt1(env)
    ckpt2 = make_tensors(2)
    if fault.on_load:
        await env.save_clean("ckpt-2", ckpt2)
        fault.arm(env)
        stats: dict[str, float] = {}
        loaded = await streamckpt.load(
            env.url("ckpt-2"), storage_options=env.options(), stats=stats
        )
        assert_bit_exact(loaded, ckpt2)
        assert stats["retries"] == 1
    else:
        fault.arm(env)
        saved = True
        try:
            await faulty_save(env, ckpt2)
        except StorageError:  # retries spent
            if fault.must_save:
                raise
            saved = False
        env.proxy.clear()
        assert saved == fault.must_save
        await assert_nothing_lost(
            env, saved=saved, ckpt1=ckpt1, ckpt1_files=ckpt1_files, ckpt2=ckpt2
        )
    assert_bit_exact(await env.load_clean("ckpt-1"), ckpt1)


@pytest.mark.anyio
@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
async def test_fault_loses_nothing(env: Env, fault: Fault) -> None:
    await run_fault(env, fault)


@pytest.fixture(scope="module")
def seaweed(servers: Any) -> Iterator[Site]:
    with open_site(servers, "seaweedfs") as opened:
        yield opened


@pytest.mark.anyio
@pytest.mark.parametrize(
    "fault",
    [f for f in FAULTS if f.name in SEAWEED_FAULTS],
    ids=[f.name for f in FAULTS if f.name in SEAWEED_FAULTS],
)
async def test_fault_loses_nothing_on_seaweedfs(seaweed: Site, fault: Fault) -> None:
    with env_on(seaweed) as env:
        await run_fault(env, fault)


# -- B. cancellation at any point -------------------------------------------------------------


def _cancel_points() -> list[tuple[str, float]]:
    """(what triggers the cancel, when): a fraction of the data bytes, or seconds."""
    rng = random.Random(20240607)
    points: list[tuple[str, float]] = [("bytes", 0.0), ("bytes", 0.5), ("bytes", 1.0)]
    points += [("bytes", round(rng.uniform(0.02, 0.98), 3)) for _ in range(3)]
    points += [("bytes", 1.001)]  # only the index's bytes cross it: after the commit
    points += [("seconds", 0.0)]
    points += [("seconds", round(rng.uniform(0.005, 0.25), 3)) for _ in range(4)]
    return points


@pytest.mark.anyio
@pytest.mark.parametrize(("trigger", "at"), _cancel_points())
async def test_cancelled_save_loses_nothing(env: Env, trigger: str, at: float) -> None:
    ckpt1, ckpt1_files = await save_ckpt1(env)
    ckpt2 = make_tensors(2)  # same sizes as ckpt-1
    data_bytes = sum(t.size for t in (await prepare_all(ckpt2, copy=False)).values())
    env.proxy.set_latency(0.01)
    loop_thread = threading.get_ident()
    lock = threading.Lock()
    moved = 0
    threshold = max(1, round(at * data_bytes))
    scope = anyio.CancelScope()

    def progress(nbytes: int) -> None:
        nonlocal moved
        with lock:
            before = moved
            moved += nbytes
            crossed = before < threshold <= moved
        if not crossed:
            return
        if threading.get_ident() == loop_thread:
            scope.cancel()
        else:  # a shard's worker thread: hand the cancel to the event loop
            anyio.from_thread.run_sync(scope.cancel)

    store, path = env.store("ckpt-2")
    with scope:
        if trigger == "seconds":
            scope.deadline = anyio.current_time() + at
        await save_tensors(
            store,
            path,
            ckpt2,
            num_shards=SHARDS,
            overwrite=False,
            chunk_bytes=4 * KiB,
            progress=progress if trigger == "bytes" else None,
        )
    env.proxy.clear()
    gc.collect()  # a shard file object left open would flush (upload) its buffer now
    saved = not scope.cancelled_caught
    if trigger == "bytes" and threshold <= data_bytes:
        assert not saved  # cancelled before every shard was up: there is no index to write
    if not saved and "ckpt-2.index" in env.objects():
        saved = True  # cancelled after its commit point: the checkpoint is whole, it must load
    await assert_nothing_lost(env, saved=saved, ckpt1=ckpt1, ckpt1_files=ckpt1_files, ckpt2=ckpt2)


# -- B. a saving process killed with SIGKILL --------------------------------------------------


def open_log(path: Path) -> BinaryIO:
    return open(path, "wb")  # a local file, before the child starts: blocking is fine


@pytest.mark.anyio
async def test_sigkilled_save_leaves_no_index(env: Env, tmp_path: Path) -> None:
    ckpt1, ckpt1_files = await save_ckpt1(env)
    env.proxy.set_bandwidth(256 * KiB)  # per connection: the child's 2 x 1 MiB take seconds
    env.proxy.reset_stats()
    log_path = tmp_path / "child.log"
    with open_log(log_path) as log:
        process = await anyio.open_process(
            [sys.executable, str(CHILD), env.url("ckpt-2"), json.dumps(env.options()), str(MiB)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        with anyio.fail_after(DEADLINE_S):
            while env.proxy.stats().bytes_up < 128 * KiB:
                assert process.returncode is None, log_path.read_text()
                await anyio.sleep(0.02)
        process.kill()  # SIGKILL: no cleanup of any kind runs
        await process.wait()
    finally:
        with anyio.move_on_after(DEADLINE_S, shield=True):
            if process.returncode is None:
                process.kill()
            await process.aclose()
    env.proxy.clear()
    assert process.returncode == -signal.SIGKILL, log_path.read_text()
    assert env.sent(env.any_shard_upload("ckpt-2"))  # it was uploading when it died

    await assert_nothing_lost(
        env,
        saved=False,
        ckpt1=ckpt1,
        ckpt1_files=ckpt1_files,
        ckpt2=make_tensors(2),
        orphans_allowed=True,
    )
    # The dead save's claim holds the prefix until its lease runs out: a save meanwhile is
    # refused and touches nothing.
    again = make_tensors(3)
    before = env.objects()
    assert "ckpt-2.claim" in before
    with pytest.raises(SaveInProgressError, match="renewed"):
        await env.save_clean("ckpt-2", again)
    assert env.objects() == before
    # Once the lease ran out (aged here, as two minutes would), the next save breaks the claim
    # and reclaims what the dead save left.
    claim_path = f"{env.directory}/ckpt-2.claim"
    record = json.loads(env.site.admin.cat_file(claim_path))
    record["renewed_at"] -= CLAIM_LEASE_S + 1
    env.site.admin.pipe_file(claim_path, json.dumps(record).encode())
    await env.save_clean("ckpt-2", again)
    assert_bit_exact(await env.load_clean("ckpt-2"), again)
    assert ckpt_files(env.objects(), "ckpt-2") == {
        *(f"ckpt-2.data-{i:05d}-of-{SHARDS:05d}" for i in range(SHARDS)),
        "ckpt-2.index",
    }


# -- B. reads never return wrong bytes -------------------------------------------------------


@pytest.mark.anyio
async def test_every_read_cut_short_fails_without_returning_data(env: Env) -> None:
    tensors = make_tensors(2)
    await env.save_clean("ckpt-2", tensors)
    where = env.shard_read("ckpt-2", 1)
    env.proxy.truncate_response(1000, times=None, **where)
    store, path = env.store("ckpt-2")
    reader = await open_reader(store, path)

    with pytest.raises((StorageError, CorruptCheckpointError)) as caught:
        await reader.read_many(list(tensors))

    assert caught.value.shard == 1
    assert len(env.sent(where)) == FAST.max_attempts
    assert (store.stats.retries, store.stats.failures) == (FAST.max_attempts - 1, 1)


@pytest.mark.anyio
@pytest.mark.parametrize("damage", ["flip", "shorten"])
async def test_corrupt_shard_is_refused_not_returned(env: Env, damage: str) -> None:
    tensors = make_tensors(2)
    await env.save_clean("ckpt-2", tensors)
    admin = env.site.admin
    target = f"{env.directory}/ckpt-2.data-00001-of-{SHARDS:05d}"
    body = bytearray(admin.cat_file(target))
    if damage == "flip":
        body[len(body) // 2] ^= 0x01
    else:
        del body[-7:]
    admin.pipe_file(target, bytes(body))

    with pytest.raises(CorruptCheckpointError) as caught:
        await streamckpt.load(env.url("ckpt-2"), storage_options=env.options())
    assert caught.value.shard == 1
    # the other shards' tensors still read fine, one at a time
    async with streamckpt.open(env.url("ckpt-2"), storage_options=env.options()) as reader:
        healthy = [name for name, info in reader.entries.items() if info.shard != 1]
        assert healthy
        assert_bit_exact(await reader.read_many(healthy), {name: tensors[name] for name in healthy})


# -- C. the parts of one large shard ---------------------------------------------------------
#
# A shard bigger than a part goes up as several parts at once (S3 multipart, GCS parts then a
# compose). Each part is a request of its own: it is retried on its own, and it holds a slot of
# the store's adaptive limit.

PARTS = 4


def large_shard_store(env: Env, **kwargs: Any) -> tuple[FsspecStore, str, Tensors]:
    """A store through the proxy whose one shard goes up in PARTS parts (the last one short)."""
    store, path = env.store("ckpt-2", **kwargs)
    assert isinstance(store, FsspecStore)
    store.write_block_size = 256 * KiB if env.site.gcs else 5 * MiB  # each store's smallest
    rng = np.random.default_rng(7)
    count = (PARTS - 1) * store.write_block_size // 4 + 1000
    return store, path, {"big": rng.standard_normal(count).astype(np.float32)}


def part_upload(env: Env, number: int) -> dict[str, Any]:
    if env.site.gcs:  # a temporary object named <shard>.part-<token>.<number>
        return {"method": "POST", "path_contains": f".{number:05d}"}
    return {"method": "PUT", "path_contains": f"partNumber={number}&"}


def upload_begins(env: Env) -> dict[str, Any]:
    """S3: the request that opens a multipart upload; GCS: the compose that joins the parts."""
    if env.site.gcs:
        return {"method": "POST", "path_contains": "/compose"}
    return {"method": "POST", "path_contains": "?uploads"}


@pytest.mark.anyio
async def test_a_503_on_one_part_resends_that_part_alone(env: Env) -> None:
    store, path, tensors = large_shard_store(env)
    env.proxy.inject_status(503, **part_upload(env, 2))

    info = await save_tensors(store, path, tensors, num_shards=1, overwrite=False)

    assert env.sent(part_upload(env, 2)) == [503, 200]
    for number in (1, 3, 4):  # the upload was not started over
        assert env.sent(part_upload(env, number)) == [200], number
    assert env.sent(upload_begins(env)) == [200]
    assert (info.stats["retries"], info.stats["throttles"], info.stats["failures"]) == (1, 1, 0)
    assert_bit_exact(await env.load_clean("ckpt-2"), tensors)
    assert ckpt_files(env.objects(), "ckpt-2") == {
        "ckpt-2.index",
        "ckpt-2.data-00000-of-00001",
    }  # no temporary part left behind


@pytest.mark.anyio
async def test_a_connection_reset_in_a_part_resends_that_part_alone(env: Env) -> None:
    store, path, tensors = large_shard_store(env)
    rule = env.proxy.reset_request_after(64 * KiB, **part_upload(env, 3))

    info = await save_tensors(store, path, tensors, num_shards=1, overwrite=False)

    assert rule.fired == 1
    assert env.sent(part_upload(env, 3)) == [0, 200]
    assert [env.sent(part_upload(env, n)) for n in (1, 2, 4)] == [[200]] * 3
    # aiohttp may re-send a broken PUT by itself (S3), unseen by streamckpt
    assert info.stats["retries"] == 1 if env.site.gcs else info.stats["retries"] <= 1
    assert info.stats["failures"] == 0
    assert_bit_exact(await env.load_clean("ckpt-2"), tensors)


@pytest.mark.anyio
async def test_a_part_that_always_fails_fails_the_save_without_starting_over(env: Env) -> None:
    ckpt1, ckpt1_files = await save_ckpt1(env)
    store, path, tensors = large_shard_store(env)
    env.proxy.inject_status(500, times=None, **part_upload(env, 2))

    with pytest.raises(StorageError, match="failed 6 times"):
        await save_tensors(store, path, tensors, num_shards=1, overwrite=False)

    assert env.sent(part_upload(env, 2)) == [500] * FAST.max_attempts
    # the policy's attempts, once in all: part 1 went up once (its answer may be an error,
    # when the abort reaches the server first)
    assert len(env.sent(part_upload(env, 1))) == 1
    stats = store.stats.snapshot()
    assert (stats["retries"], stats["failures"]) == (FAST.max_attempts - 1, 1)
    await assert_nothing_lost(
        env, saved=False, ckpt1=ckpt1, ckpt1_files=ckpt1_files, ckpt2=tensors
    )  # GCS: no temporary part either (they are named after the shard)
    if not env.site.gcs:
        uploads = env.site.admin.call_s3("list_multipart_uploads", Bucket=BUCKET)
        assert not uploads.get("Uploads"), "the multipart upload was not aborted"


@pytest.mark.anyio
@pytest.mark.parametrize("limit", [1, 2])
async def test_parts_in_flight_keep_to_the_adaptive_limit(env: Env, limit: int) -> None:
    store, path, tensors = large_shard_store(env)
    store.limiter = AdaptiveLimiter(initial=limit, maximum=limit)
    env.proxy.set_latency(0.05)  # every request overlaps the ones sent beside it

    await save_tensors(store, path, tensors, num_shards=1, overwrite=False)

    # (gcsfs reads an object's metadata with two GETs at once, under one slot)
    assert env.proxy.stats().peak_in_flight[env.upload_method] == limit
    assert_bit_exact(await env.load_clean("ckpt-2"), tensors)


@pytest.mark.anyio
async def test_parts_in_flight_without_a_tight_limit_are_the_planned_ones(env: Env) -> None:
    """The check above can fail: left alone, the parts of the shard do go up at once."""
    store, path, tensors = large_shard_store(env)
    env.proxy.set_latency(0.05)

    await save_tensors(store, path, tensors, num_shards=1, overwrite=False)

    assert env.proxy.stats().peak_in_flight[env.upload_method] >= 3


@pytest.mark.anyio
async def test_throttled_parts_halve_the_adaptive_limit(env: Env) -> None:
    store, path, tensors = large_shard_store(env)
    store.limiter = AdaptiveLimiter(latency_factor=1e9)  # congestion: throttles only
    where = {"method": part_upload(env, 1)["method"], "path_contains": "part"}
    if env.site.gcs:
        where["path_contains"] = ".part-"
    env.proxy.inject_status(429, times=2, **where)

    info = await save_tensors(store, path, tensors, num_shards=1, overwrite=False)

    assert (info.stats["throttles"], info.stats["retries"]) == (2, 2)
    assert store.limiter.cuts >= 1
    assert_bit_exact(await env.load_clean("ckpt-2"), tensors)


def upload_joins(env: Env) -> dict[str, Any]:
    """S3: the request that completes a multipart upload; GCS: the compose of the parts."""
    if env.site.gcs:
        return {"method": "POST", "path_contains": "/compose"}
    return {"method": "POST", "path_contains": "?uploadId="}


def one_writer_store(env: Env) -> tuple[FsspecStore, str, Tensors]:
    """Two shards of PARTS parts each, and a budget that lets one of them stream at a time."""
    store, path, _ = large_shard_store(env)
    store.budget = ByteBudget(6 * store.write_block_size)
    assert store.plan_writers([PARTS * store.write_block_size] * 2) == 1
    rng = np.random.default_rng(13)
    count = PARTS * store.write_block_size // 4
    tensors = {f"big{i}": rng.standard_normal(count).astype(np.float32) for i in range(2)}
    return store, path, tensors


@pytest.mark.anyio
async def test_the_next_shard_streams_while_the_store_joins_the_last_one(env: Env) -> None:
    """A shard whose bytes are all sent gives its writer slot back before its join (the
    server's own work), so a slow complete or compose does not hold the next shard back."""
    store, path, tensors = one_writer_store(env)
    held = env.proxy.delay(1.0, **upload_joins(env))

    info = await save_tensors(store, path, tensors, num_shards=2, overwrite=False)

    assert held.fired == 1
    # Either shard may take the one slot first, and the other's upload may open before the
    # first one's join is sent; what matters is that the other's parts stream while the join
    # is held (the held shard's own parts are all sent before its join).
    beside = [target for _, target in held.beside]
    part = ".part-" if env.site.gcs else "partNumber="
    assert any(part in target for target in beside), beside
    assert info.stats["failures"] == 0
    assert_bit_exact(await env.load_clean("ckpt-2"), tensors)


def part_delete(number: int) -> dict[str, Any]:
    """GCS: the delete of temporary part ``number`` after the compose."""
    return {"method": "DELETE", "path_contains": f".{number:05d}"}


@pytest.mark.anyio
async def test_gcs_part_deletes_run_beside_the_index_write_and_end_before_the_save(
    env: Env,
) -> None:
    """The composed shard is complete, so the deletes of its temporary parts need not hold
    the index back; the save still waits for them before it returns."""
    if not env.site.gcs:
        pytest.skip("S3 has no temporary objects to delete")
    store, path, tensors = large_shard_store(env)
    held = env.proxy.delay(1.0, **part_delete(2))

    info = await save_tensors(store, path, tensors, num_shards=1, overwrite=False)

    assert held.fired == 1
    beside = [target for _, target in held.beside]
    # the index: gcsfs names it in the body of a create-only upload
    assert any("ifGenerationMatch=0" in target for target in beside), beside
    assert info.stats["failures"] == 0
    assert ckpt_files(env.objects(), "ckpt-2") == {"ckpt-2.index", "ckpt-2.data-00000-of-00001"}
    assert_bit_exact(await env.load_clean("ckpt-2"), tensors)


@pytest.mark.anyio
async def test_gcs_a_failed_part_delete_is_retried_and_the_save_succeeds(env: Env) -> None:
    if not env.site.gcs:
        pytest.skip("S3 has no temporary objects to delete")
    store, path, tensors = large_shard_store(env)
    env.proxy.inject_status(503, **part_delete(3))

    info = await save_tensors(store, path, tensors, num_shards=1, overwrite=False)

    assert env.sent(part_delete(3)) == [503, 200]
    assert (info.stats["retries"], info.stats["failures"]) == (1, 0)
    assert ckpt_files(env.objects(), "ckpt-2") == {"ckpt-2.index", "ckpt-2.data-00000-of-00001"}
    assert_bit_exact(await env.load_clean("ckpt-2"), tensors)


@pytest.mark.anyio
async def test_a_whole_upload_sent_again_takes_its_writer_slot_back(env: Env) -> None:
    """S3 starts an upload over when its complete fails. The second attempt buffers parts
    again, so it takes the writer slot back that the first gave up before its complete."""
    if env.site.gcs:
        pytest.skip("a compose is retried alone: no GCS upload starts over")
    store, path, tensors = large_shard_store(env)
    env.proxy.inject_status(503, **upload_joins(env))
    calls: list[str] = []

    class Slot:
        def take(self) -> None:
            calls.append("take")

        def give_back(self) -> None:
            calls.append("give back")

    def stream(writer: Any) -> None:
        writer.write(memoryview(tensors["big"]).cast("B"))

    write = functools.partial(store.write_object, f"{path}.data-00000-of-00001", stream)
    await anyio.to_thread.run_sync(functools.partial(write, slot=Slot()))

    assert env.sent(upload_joins(env)) == [503, 200]
    assert calls == ["take", "give back"] * 2


@pytest.mark.anyio
async def test_uploads_started_over_beside_waiting_shards_finish(env: Env) -> None:
    """Three shards, one writer slot, and the first two S3 completes fail: each of those
    uploads starts over and needs the slot back while the third shard waits for its turn.
    A shard that held a slot while it waited for a worker thread would hang this save."""
    if env.site.gcs:
        pytest.skip("a compose is retried alone: no GCS upload starts over")
    store, path, _ = one_writer_store(env)
    rng = np.random.default_rng(17)
    count = PARTS * store.write_block_size // 4
    tensors = {f"big{i}": rng.standard_normal(count).astype(np.float32) for i in range(3)}
    env.proxy.set_latency(0.02)
    env.proxy.inject_status(503, times=2, **upload_joins(env))

    with anyio.fail_after(DEADLINE_S):
        info = await save_tensors(store, path, tensors, num_shards=3, overwrite=False)

    assert env.sent(upload_joins(env)).count(503) == 2
    assert info.stats["failures"] == 0
    assert_bit_exact(await env.load_clean("ckpt-2"), tensors)


# -- C. every S3 body goes up with its CRC-32C ------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("target", ["part", "whole"])
async def test_a_body_damaged_on_the_way_is_refused_by_seaweedfs_and_sent_again(
    seaweed: Site, target: str
) -> None:
    """SeaweedFS, like S3, checks the CRC-32C sent with each body: a flipped byte is caught at
    save time, not when the checkpoint is read back."""
    with env_on(seaweed) as env:
        store, path, tensors = large_shard_store(env)
        if target == "whole":
            store.write_block_size = 64 * MiB  # the shard goes up in one PUT
            where = {"method": "PUT", "path_contains": "ckpt-2.data-00000-of-00001"}
        else:
            where = part_upload(env, 2)
        rule = env.proxy.corrupt_request_at(12345, **where)

        info = await save_tensors(store, path, tensors, num_shards=1, overwrite=False)

        assert rule.fired == 1
        assert env.sent(where) == [400, 200]  # BadDigest, then the intact body
        assert (info.stats["retries"], info.stats["failures"]) == (1, 0)
        assert_bit_exact(await env.load_clean("ckpt-2"), tensors)


class _MisreportingStore:
    """What a store answers for an upload, with its crc32c changed (a part lost or swapped)."""

    @staticmethod
    def install(monkeypatch: pytest.MonkeyPatch) -> None:
        from streamckpt.storage import s3_upload

        original = s3_upload.S3MultipartWriter._check

        def check(self: Any, answer: Any, expected: str) -> None:
            if isinstance(answer, dict) and "ChecksumCRC32C" in answer:
                answer = answer | {"ChecksumCRC32C": "AAAAAA==" + answer["ChecksumCRC32C"][8:]}
            original(self, answer, expected)

        monkeypatch.setattr(s3_upload.S3MultipartWriter, "_check", check)


@pytest.mark.anyio
@pytest.mark.parametrize("target", ["multipart", "whole"])
async def test_an_upload_whose_reported_crc32c_differs_fails_and_leaves_nothing(
    seaweed: Site, target: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with env_on(seaweed) as env:
        ckpt1, ckpt1_files = await save_ckpt1(env)
        store, path, tensors = large_shard_store(env)
        if target == "whole":
            store.write_block_size = 64 * MiB
        _MisreportingStore.install(monkeypatch)

        with pytest.raises(ChecksumError, match="crc32c"):
            await save_tensors(store, path, tensors, num_shards=1, overwrite=False)

        await assert_nothing_lost(
            env, saved=False, ckpt1=ckpt1, ckpt1_files=ckpt1_files, ckpt2=tensors
        )


@pytest.mark.anyio
async def test_s3_uploads_carry_their_crc32c_and_the_store_keeps_it(servers: Any) -> None:
    with open_site(servers, "moto") as moto, env_on(moto) as env:
        store, path, tensors = large_shard_store(env)

        await save_tensors(store, path, tensors, num_shards=1, overwrite=False)

        key = f"{env.directory}/ckpt-2.data-00000-of-00001".split("/", 1)[1]
        head = moto.admin.call_s3("head_object", Bucket=BUCKET, Key=key, ChecksumMode="ENABLED")
        assert head.get("ChecksumCRC32C"), "the upload carried no CRC-32C"


@pytest.mark.anyio
@pytest.mark.parametrize("after", [0.05, 0.3, 0.8])
async def test_a_save_cancelled_while_its_parts_wait_for_slots_stops_and_loses_nothing(
    env: Env, after: float
) -> None:
    """Four multi-part shards share one slot: writer threads wait for it when the cancel comes."""
    ckpt1, ckpt1_files = await save_ckpt1(env)
    store, path, _ = large_shard_store(env)
    store.limiter = AdaptiveLimiter(initial=1, maximum=1)
    rng = np.random.default_rng(11)
    count = PARTS * store.write_block_size // 4
    tensors = {f"big{i}": rng.standard_normal(count).astype(np.float32) for i in range(4)}
    env.proxy.set_latency(0.05)

    with anyio.fail_after(DEADLINE_S):  # a hang fails here
        with anyio.move_on_after(after) as scope:
            await save_tensors(store, path, tensors, num_shards=4, overwrite=False)

    assert scope.cancelled_caught
    env.proxy.set_latency(0)
    await assert_nothing_lost(env, saved=False, ckpt1=ckpt1, ckpt1_files=ckpt1_files, ckpt2=tensors)
    if not env.site.gcs:
        uploads = env.site.admin.call_s3("list_multipart_uploads", Bucket=BUCKET)
        assert not uploads.get("Uploads"), "a multipart upload was left open"
