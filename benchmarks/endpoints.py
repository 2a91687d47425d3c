"""Where the object-store benchmark sends its requests: servers, a slow link, endpoints.

Servers come from ``streamckpt.testing.servers`` (bound to 127.0.0.1, stopped on exit); an
``Endpoint`` is one way to reach one of them, directly or through the slow link.

The slow link is ``streamckpt.testing.faultproxy`` in a child. Rule: the proxy relays in its
own interpreter, so its work does not compete with the measured
client for the GIL; the parent drives it with one JSON line per request over stdin / stdout
(start, config, reset, stats), and closing stdin stops it.

Pacing. faultproxy's bandwidth cap sleeps ``len(piece) / bandwidth`` after each piece, so
write time, timer rounding and scheduling delays add to the sleeps: on a busy 2-core machine
a "100 MB/s" connection moves 25-40 MB/s. ``--proxy-pacing clock`` (the default) paces each
transfer against its own start instead (``PacedProxy``), so a connection gets the configured
rate whenever the machine can deliver it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from benchmarks.harness import ROOT

BUCKET = "bench"
SERVERS = ("moto", "seaweedfs", "gcs")
PACE_PIECE = 64 << 10


class ProxyChild:
    """The parent's handle on the proxy child."""

    def __init__(self, upstream: str, pacing: str) -> None:
        parts = urlsplit(upstream)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.endpoints", pacing],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            start_new_session=True,
        )
        port = self._ask({"op": "start", "host": parts.hostname, "port": parts.port})["port"]
        self.endpoint = f"http://127.0.0.1:{port}"

    def _ask(self, message: dict[str, Any]) -> dict[str, Any]:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(json.dumps(message) + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"proxy child exited ({self._proc.poll()})")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def configure(self, *, latency_s: float, bandwidth: float | None) -> None:
        self._ask({"op": "config", "latency": latency_s, "bandwidth": bandwidth})

    def reset_stats(self) -> None:
        self._ask({"op": "reset"})

    def requests(self) -> int:
        return int(self._ask({"op": "stats"})["requests"])

    def close(self) -> None:
        proc = self._proc
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                assert proc.stdin is not None
                proc.stdin.close()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
        if proc.stdout is not None:
            proc.stdout.close()


@contextlib.contextmanager
def proxy_child(upstream: str, pacing: str = "clock") -> Iterator[ProxyChild]:
    proxy = ProxyChild(upstream, pacing)
    try:
        yield proxy
    finally:
        proxy.close()


def _paced_proxy_class() -> Any:
    """FaultProxy whose bandwidth cap paces each transfer against its own clock.

    It overrides faultproxy's ``_sender`` (fault rules, unused here, keep the original).
    """
    from streamckpt.testing.faultproxy import FaultProxy

    class PacedProxy(FaultProxy):
        def _sender(self, writer: Any, bandwidth: Any, *, up: bool, cut: Any = None) -> Any:
            if cut is not None or not bandwidth:
                return super()._sender(writer, bandwidth, up=up, cut=cut)
            plain = super()._sender(writer, None, up=up)  # counts bytes, writes, drains
            started: float | None = None
            sent = 0

            async def send(data: bytes) -> None:
                nonlocal started, sent
                loop = asyncio.get_running_loop()
                if started is None:
                    started = loop.time()
                for i in range(0, len(data), PACE_PIECE):
                    piece = data[i : i + PACE_PIECE]
                    await plain(piece)
                    sent += len(piece)
                    ahead = started + sent / bandwidth - loop.time()
                    if ahead > 0:
                        await asyncio.sleep(ahead)

            return send

    return PacedProxy


@contextlib.contextmanager
def _serve(host: str, port: int, pacing: str) -> Iterator[Any]:
    from streamckpt.testing.faultproxy import run_proxy

    if pacing == "faultproxy":
        with run_proxy(host, port) as proxy:
            yield proxy
        return
    proxy = _paced_proxy_class()(host, port)
    try:
        proxy._start()
        yield proxy
    finally:
        proxy._stop()


def child(pacing: str) -> int:
    """The proxy child: one JSON line answered per request line; EOF on stdin stops it."""

    def reply(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    start = json.loads(sys.stdin.readline())
    with _serve(start["host"], int(start["port"]), pacing) as proxy:
        reply({"port": proxy.port})
        for line in sys.stdin:
            message = json.loads(line)
            if message["op"] == "config":
                proxy.set_latency(float(message["latency"]))
                proxy.set_bandwidth(message["bandwidth"])
                reply({})
            elif message["op"] == "reset":
                proxy.reset_stats()
                reply({})
            elif message["op"] == "stats":
                reply({"requests": proxy.stats().requests})
            else:
                reply({"error": f"unknown op {message['op']!r}"})
    return 0


# -- endpoints ----------------------------------------------------------------------------------


@dataclass
class Endpoint:
    """One way to reach one server: directly or through the proxy."""

    label: str
    server: Any  # streamckpt.testing.servers.ObjectStoreServer
    url: str
    proxy: ProxyChild | None = None
    direct: str | None = None  # the label of the same server without the proxy
    _fs: Any = field(default=None, repr=False)

    @property
    def scheme(self) -> str:
        return str(self.server.scheme)

    def options(self) -> dict[str, Any]:
        return dict(self.server.storage_options(self.url))

    def fs(self) -> Any:
        """A sync fsspec filesystem on this endpoint (the naive tool's and the link check's)."""
        if self._fs is None:
            self._fs = self.server.filesystem(self.url)
        return self._fs

    def clear(self) -> None:
        self.server.clear_bucket(BUCKET)
        if self._fs is not None:
            self._fs.invalidate_cache()

    def wire_begin(self) -> None:
        if self.proxy is not None:
            self.proxy.reset_stats()

    def wire_requests(self) -> int | None:
        return None if self.proxy is None else self.proxy.requests()


def direct_to(server: Any) -> Endpoint:
    """The endpoint that reaches ``server`` without the proxy."""
    return Endpoint(server.kind, server, server.endpoint)


@contextlib.contextmanager
def start_server(kind: str) -> Iterator[Any]:
    from streamckpt.testing import servers

    runner = {"moto": servers.run_moto, "seaweedfs": servers.run_seaweedfs}
    t0 = time.perf_counter()
    with runner.get(kind, servers.run_fake_gcs)() as server:
        server.create_bucket(BUCKET)
        print(f"[{kind}] up at {server.endpoint} in {time.perf_counter() - t0:.1f} s", flush=True)
        yield server


if __name__ == "__main__":
    sys.exit(child(sys.argv[1]))
