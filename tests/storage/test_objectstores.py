"""Smoke tests of the loopback object stores and the fault proxy, with plain gcsfs / s3fs.

They pin the client and server behaviour that streamckpt/testing/servers.py lists as quirks, so a
dependency upgrade that changes one shows up here first.
"""

from __future__ import annotations

import gc
import http.client
import http.server
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from urllib.parse import urlsplit

import aiohttp
import botocore.exceptions
import pytest

from streamckpt.testing.faultproxy import FaultProxy, run_proxy
from streamckpt.testing.servers import ObjectStoreServer, run_fake_gcs, run_moto, run_seaweedfs

pytestmark = [
    pytest.mark.cloud,
    # aiohttp warns on any body over 1 MiB given as bytes; gcsfs's upload chunks are such bodies.
    pytest.mark.filterwarnings("ignore:Sending a large body directly:ResourceWarning:aiohttp"),
]

SERVERS: dict[str, Callable[[], AbstractContextManager[ObjectStoreServer]]] = {
    "gcs": run_fake_gcs,
    "moto": run_moto,
    "seaweedfs": run_seaweedfs,
}
BUCKET = "streamckpt-smoke"
MiB = 2**20
# What the clients surface once a connection breaks mid-upload and nobody retries: gcsfs the
# aiohttp error as is, s3fs botocore's EndpointConnectionError ("Could not connect ...").
BROKEN_CONNECTION_ERRORS = (aiohttp.ClientError, botocore.exceptions.EndpointConnectionError)


@pytest.fixture(scope="module", params=sorted(SERVERS))
def server(request: pytest.FixtureRequest) -> Iterator[ObjectStoreServer]:
    with SERVERS[request.param]() as running:
        yield running


@pytest.fixture
def store(server: ObjectStoreServer) -> ObjectStoreServer:
    server.clear_bucket(BUCKET)
    return server


@pytest.fixture
def proxy(store: ObjectStoreServer) -> Iterator[FaultProxy]:
    upstream = urlsplit(store.endpoint)
    assert upstream.hostname is not None and upstream.port is not None
    with run_proxy(upstream.hostname, upstream.port) as running:
        yield running


def upload_method(store: ObjectStoreServer) -> str:
    return "POST" if store.scheme == "gs" else "PUT"


def test_put_get_list_delete(store: ObjectStoreServer) -> None:
    fs = store.filesystem()
    fs.pipe_file(f"{BUCKET}/dir/a", b"alpha")
    fs.pipe_file(f"{BUCKET}/dir/b", b"")

    assert fs.cat_file(f"{BUCKET}/dir/a") == b"alpha"
    assert fs.cat_file(f"{BUCKET}/dir/b") == b""
    assert sorted(fs.ls(f"{BUCKET}/dir", detail=False)) == [f"{BUCKET}/dir/a", f"{BUCKET}/dir/b"]
    assert fs.info(f"{BUCKET}/dir/a")["size"] == 5

    fs.rm(f"{BUCKET}/dir/a")
    assert not fs.exists(f"{BUCKET}/dir/a")
    assert fs.find(BUCKET) == [f"{BUCKET}/dir/b"]
    with pytest.raises(FileNotFoundError):
        fs.cat_file(f"{BUCKET}/dir/a")


def test_reset_forgets_every_bucket(store: ObjectStoreServer) -> None:
    store.create_bucket("streamckpt-other")
    store.filesystem().pipe_file("streamckpt-other/x", b"x")
    store.reset()
    assert store.filesystem().ls("", detail=False) == []
    store.create_bucket(BUCKET)


def test_ranged_get(store: ObjectStoreServer) -> None:
    fs = store.filesystem()
    fs.pipe_file(f"{BUCKET}/r", bytes(range(100)))

    assert fs.cat_file(f"{BUCKET}/r", start=10, end=20) == bytes(range(10, 20))
    assert fs.cat_file(f"{BUCKET}/r", start=90) == bytes(range(90, 100))
    assert fs.cat_file(f"{BUCKET}/r", start=95, end=200) == bytes(range(95, 100))
    # fsspec's cat_ranges returns a failed range's exception inside the list (on_error="return").
    results = fs.cat_ranges([f"{BUCKET}/r", f"{BUCKET}/missing"], [0, 0], [2, 2])
    assert results[0] == b"\x00\x01"
    assert isinstance(results[1], FileNotFoundError)


def test_empty_ranges_are_client_and_server_specific(store: ObjectStoreServer) -> None:
    fs = store.filesystem()
    path = f"{BUCKET}/r"
    fs.pipe_file(path, b"0123456789")

    if store.scheme == "gs":
        assert [fs.cat_file(path, start=n, end=n) for n in (0, 5, 10)] == [b""] * 3
    else:
        # s3fs asks for "bytes=n-(n-1)"; a server may ignore that malformed range.
        assert fs.cat_file(path, start=0, end=0) == b"0123456789"
        if store.kind == "moto":
            assert fs.cat_file(path, start=5, end=5) == b"0123456789"
        else:
            with pytest.raises(OSError, match="range is not satisfiable"):
                fs.cat_file(path, start=5, end=5)
        with pytest.raises(OSError, match="range is not satisfiable"):
            fs.cat_file(path, start=10, end=10)
    with pytest.raises(Exception, match=r"416|range is not satisfiable"):
        fs.cat_file(path, start=10)


def test_multipart_upload(store: ObjectStoreServer, proxy: FaultProxy) -> None:
    fs = store.filesystem(proxy.endpoint)
    payload = os.urandom(12 * MiB)
    with fs.open(f"{BUCKET}/big", "wb", block_size=5 * MiB) as f:
        for offset in range(0, len(payload), MiB):
            f.write(payload[offset : offset + MiB])

    targets = [target for method, target, _ in proxy.stats().log if method != "GET"]
    if store.scheme == "gs":
        chunks = [t for t in targets if "upload_id=" in t]
        assert len(chunks) == 3  # 5 + 5 + 2 MiB, all through the proxy (Location rewritten)
    else:
        assert sum("partNumber=" in t for t in targets) == 3
    assert fs.cat_file(f"{BUCKET}/big") == payload


def test_conditional_create_single_request(store: ObjectStoreServer) -> None:
    fs = store.filesystem()
    path = f"{BUCKET}/once"
    fs.pipe_file(path, b"first", mode="create")

    with pytest.raises(OSError) as caught:
        fs.pipe_file(path, b"second", mode="create")
    if store.kind == "seaweedfs":
        # 412 PreconditionFailed without <Condition>: s3fs maps it to EINVAL, not exists.
        assert not isinstance(caught.value, FileExistsError)
        assert "PreconditionFailed" in str(caught.value.__cause__)
    else:
        assert isinstance(caught.value, FileExistsError)
    assert fs.cat_file(path) == b"first"


def test_conditional_create_multipart(store: ObjectStoreServer) -> None:
    fs = store.filesystem()
    path = f"{BUCKET}/once"
    fs.pipe_file(path, b"first")
    block = 256 * 1024 if store.scheme == "gs" else 5 * MiB

    def write_exclusively() -> None:
        with fs.open(path, "xb", block_size=block) as f:
            f.write(os.urandom(block + 1024))

    if store.scheme == "gs":
        write_exclusively()  # fake-gcs-server ignores ifGenerationMatch=0 on resumable uploads
        assert fs.info(path, refresh=True)["size"] == block + 1024
    else:
        with pytest.raises(OSError, match="pre-conditions"):
            write_exclusively()  # If-None-Match: * rides on CompleteMultipartUpload
        assert fs.cat_file(path) == b"first"


def test_latency_and_bandwidth(store: ObjectStoreServer, proxy: FaultProxy) -> None:
    fs = store.filesystem(proxy.endpoint)
    fs.pipe_file(f"{BUCKET}/x", os.urandom(256 * 1024))

    proxy.set_latency(0.4)
    started = time.monotonic()
    fs.cat_file(f"{BUCKET}/x", start=0, end=10)
    assert time.monotonic() - started >= 0.4
    proxy.clear()

    proxy.set_bandwidth(1 * MiB)
    started = time.monotonic()
    assert len(fs.cat_file(f"{BUCKET}/x", start=0, end=256 * 1024)) == 256 * 1024
    assert time.monotonic() - started >= 0.2
    proxy.clear()
    assert proxy.stats().bytes_down > 256 * 1024


def test_injected_503_is_retried_by_default(store: ObjectStoreServer, proxy: FaultProxy) -> None:
    fs = store.filesystem(proxy.endpoint)
    fs.pipe_file(f"{BUCKET}/x", b"payload")
    proxy.reset_stats()
    rule = proxy.inject_status(503, method="GET", times=1)

    assert fs.cat_file(f"{BUCKET}/x", start=0, end=7) == b"payload"
    assert rule.fired == 1
    assert [status for _, _, status in proxy.stats().log] == [503, 206]


def test_injected_503_without_retries(store: ObjectStoreServer, proxy: FaultProxy) -> None:
    fs = store.filesystem(proxy.endpoint, retries=False)
    fs.pipe_file(f"{BUCKET}/x", b"payload")
    proxy.reset_stats()
    proxy.inject_status(503, method="GET", times=None)

    with pytest.raises(Exception, match=r"reduce your request rate|Unavailable") as caught:
        fs.cat_file(f"{BUCKET}/x", start=0, end=7)
    if store.scheme == "gs":
        import gcsfs.retry

        # gcsfs raises its HttpError for a 5xx, which is not an OSError.
        assert not isinstance(caught.value, OSError)
        assert isinstance(caught.value, gcsfs.retry.HttpError)
    else:
        assert isinstance(caught.value, OSError)
    assert proxy.stats().requests_by_method == {"GET": 1}


def test_reset_mid_upload(store: ObjectStoreServer, proxy: FaultProxy) -> None:
    fs = store.filesystem(proxy.endpoint, retries=False)
    fs.pipe_file(f"{BUCKET}/warm", b"")  # so the failing upload rides a reused connection
    proxy.reset_stats()
    method = upload_method(store)
    proxy.reset_request_after(256 * 1024, method=method, times=None)

    with pytest.raises(BROKEN_CONNECTION_ERRORS):
        fs.pipe_file(f"{BUCKET}/x", os.urandom(MiB))
    # aiohttp itself sends an idempotent request (PUT) once more after a reused connection
    # breaks; gcsfs uploads with POST, which it does not repeat.
    assert proxy.stats().requests_by_method == {method: 2 if method == "PUT" else 1}

    proxy.clear()
    fs.pipe_file(f"{BUCKET}/x", b"fine")
    assert fs.cat_file(f"{BUCKET}/x") == b"fine"


@pytest.mark.parametrize("fault", ["truncate_response", "reset_response_after"])
def test_broken_response_body(store: ObjectStoreServer, proxy: FaultProxy, fault: str) -> None:
    fs = store.filesystem(proxy.endpoint, retries=False)
    payload = os.urandom(MiB)
    fs.pipe_file(f"{BUCKET}/x", payload)
    getattr(proxy, fault)(1000, method="GET")

    # Both clients raise aiohttp's ClientPayloadError as is, not an OSError.
    with pytest.raises(aiohttp.ClientPayloadError):
        fs.cat_file(f"{BUCKET}/x", start=0, end=MiB)
    assert fs.cat_file(f"{BUCKET}/x", start=0, end=MiB) == payload


def test_seaweedfs_checks_signatures(store: ObjectStoreServer) -> None:
    if store.kind != "seaweedfs":
        pytest.skip("moto accepts any credentials; fake-gcs-server has none")
    with pytest.raises(PermissionError):
        store.filesystem(key="wrong", secret="wrong").ls(BUCKET)
    with pytest.raises(PermissionError):
        store.filesystem(anon=True).ls(BUCKET)


@pytest.fixture
def no_sync_filesystems_left(store: ObjectStoreServer) -> None:
    # A sync s3fs instance collected while another loop runs in this thread schedules its
    # session close on that loop (s3fs close_session uses get_running_loop) and the loop
    # reports "attached to a different loop"; collect them (also those `store` made) first.
    gc.collect()


@pytest.mark.anyio
@pytest.mark.usefixtures("no_sync_filesystems_left")
async def test_async_filesystem(store: ObjectStoreServer) -> None:
    fs = store.filesystem(asynchronous=True)
    if store.scheme == "s3":
        await fs.set_session()
    try:
        await fs._pipe_file(f"{BUCKET}/async", b"async bytes")
        assert await fs._cat_file(f"{BUCKET}/async", start=6) == b"bytes"
    finally:
        if store.scheme == "s3":
            await fs._s3.close()
        else:
            await fs.session.close()


class _ChunkedEcho(http.server.BaseHTTPRequestHandler):
    """Echoes a chunked request body as a chunked response; on /silent it ignores Expect."""

    protocol_version = "HTTP/1.1"

    def handle_expect_100(self) -> bool:
        return True if self.path == "/silent" else super().handle_expect_100()

    def do_PUT(self) -> None:
        body = b""
        while size := int(self.rfile.readline().split(b";")[0], 16):
            body += self.rfile.read(size)
            self.rfile.readline()
        while self.rfile.readline() not in (b"\r\n", b""):
            pass
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for start in range(0, len(body), 5):
            piece = body[start : start + 5]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        self.wfile.write(b"0\r\n\r\n")

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_proxy_relays_chunked_bodies_and_expect_on_one_connection() -> None:
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ChunkedEcho)
    serving = threading.Thread(target=upstream.serve_forever)
    serving.start()
    try:
        with run_proxy("127.0.0.1", upstream.server_address[1]) as proxy:
            conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
            try:
                for path, expect in [("/echo", False), ("/echo", True), ("/silent", True)]:
                    pieces = [b"hello ", b"chunked ", path.encode()]
                    headers = {"Expect": "100-continue"} if expect else {}
                    conn.request("PUT", path, iter(pieces), headers, encode_chunked=True)
                    response = conn.getresponse()
                    assert response.status == 200
                    assert response.read() == b"".join(pieces)
            finally:
                conn.close()
            stats = proxy.stats()
            assert (stats.requests, stats.connections) == (3, 1)
    finally:
        upstream.shutdown()
        upstream.server_close()
        serving.join(10)
