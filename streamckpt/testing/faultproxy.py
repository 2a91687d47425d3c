"""A fault-injecting HTTP/1.1 reverse proxy on 127.0.0.1 for the cloud tests.

`run_proxy(host, port)` starts an asyncio server on its own event loop in a daemon thread and
yields a `FaultProxy`; leaving the block closes every connection and joins the thread.

Invariants:
- Each client connection gets its own upstream connection, opened lazily and reused for the
  client's keep-alive requests. Heads and bodies are relayed byte for byte (Host untouched, so
  SigV4 signatures stay valid); the one rewrite points a Location header that names the
  upstream at the proxy, so GCS resumable-upload chunks come through the proxy as well.
- Bodies are framed by Content-Length, chunked coding (relayed raw) or, for a response with
  neither, the end of the connection. `Expect: 100-continue` goes upstream and the interim
  answer comes back (made up after EXPECT_WAIT_S if the upstream ignores the header).
- Every read has a timeout, so a stuck peer costs at most IO_TIMEOUT_S.
- Settings, rules and counters live behind one lock and are read once per request. A request
  fires at most one rule: the first that matches. Byte counts include heads; "after N bytes"
  counts body bytes on the wire (chunk framing included).
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import socket
import struct
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TypedDict, Unpack

IO_TIMEOUT_S = 30.0
MAX_HEAD_BYTES = 64 * 1024
COPY_CHUNK = 64 * 1024
EXPECT_WAIT_S = 1.0
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
S3_ERROR_CODES = {429: "SlowDown", 500: "InternalError", 503: "SlowDown"}
S3_MESSAGES = {"SlowDown": "Please reduce your request rate."}
GCS_REASONS = {429: "rateLimitExceeded", 500: "backendError", 503: "backendError"}
GCS_PATH_PREFIXES = ("/storage/", "/upload/storage/", "/download/storage/", "/batch/storage/")

Framing = tuple[str, int]  # ("length", n) | ("chunked", 0) | ("eof", 0)
Send = Callable[[bytes], Awaitable[None]]


class Where(TypedDict, total=False):
    """Which requests a rule hits; every given field must match."""

    method: str  # e.g. "PUT"
    path_contains: str  # substring of the request target (path and query)
    nth: int  # only the nth matching request, 1-based
    times: int | None  # fire at most this often (default 1); None: on every match


@dataclass
class FaultRule:
    """One fault and its match counters; `fired` tells a test how often it hit."""

    # "status" | "reset_request" | "corrupt_request" | "reset_response" | "truncate_response"
    # | "delay"
    kind: str
    status: int = 0
    after_bytes: int = 0
    seconds: float = 0.0
    error_code: str | None = None
    method: str | None = None
    path_contains: str | None = None
    nth: int | None = None
    times: int | None = 1
    matched: int = 0
    fired: int = 0
    # "delay": (method, target) of the requests that arrived while this rule held one
    beside: list[tuple[str, str]] = field(default_factory=list)

    def take(self, method: str, target: str) -> bool:
        if self.method is not None and method != self.method.upper():
            return False
        if self.path_contains is not None and self.path_contains not in target:
            return False
        self.matched += 1
        if (self.nth is not None and self.matched != self.nth) or (
            self.times is not None and self.fired >= self.times
        ):
            return False
        self.fired += 1
        return True


@dataclass(frozen=True, slots=True)
class ProxyStats:
    """A snapshot of the counters since start or `reset_stats()`."""

    requests: int
    requests_by_method: dict[str, int]
    bytes_up: int
    bytes_down: int
    connections: int
    faults_fired: int
    log: tuple[tuple[str, str, int], ...]  # (method, target, status the client got; 0: none)
    peak_in_flight: dict[str, int]  # the most requests of each method relayed at once


@dataclass
class _Counters:
    requests: int = 0
    by_method: Counter[str] = field(default_factory=Counter)
    bytes_up: int = 0
    bytes_down: int = 0
    connections: int = 0
    faults_fired: int = 0
    log: list[tuple[str, str, int]] = field(default_factory=list)
    peak_in_flight: Counter[str] = field(default_factory=Counter)
    # requests started since these counters began (a relay left over from an earlier test,
    # still draining, is not one of them)
    in_flight: Counter[str] = field(default_factory=Counter)


class _Cut(Exception):
    """A fault ends the connection mid-body: reset (RST) or closed cleanly (FIN)."""

    def __init__(self, reset: bool) -> None:
        super().__init__("reset" if reset else "closed")
        self.reset = reset


class FaultProxy:
    """The proxy's control surface; build it with `run_proxy`."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.port = 0
        self._lock = threading.Lock()
        self._latency_s = 0.0
        self._bandwidth: float | None = None
        self._rules: list[FaultRule] = []
        self._holding: list[FaultRule] = []  # "delay" rules holding a request now
        self._counters = _Counters()
        self._loop = asyncio.new_event_loop()
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="faultproxy", daemon=True
        )

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set_latency(self, seconds: float) -> None:
        """Hold every request `seconds` before forwarding it."""
        with self._lock:
            self._latency_s = seconds

    def set_bandwidth(self, bytes_per_s: float | None) -> None:
        """Cap each connection at `bytes_per_s` in each direction; None lifts the cap."""
        with self._lock:
            self._bandwidth = bytes_per_s

    def inject_status(
        self, status: int, *, error_code: str | None = None, **where: Unpack[Where]
    ) -> FaultRule:
        """Answer matching requests with `status` without asking the upstream.

        GCS JSON API paths get a JSON error, the rest an S3 XML error whose <Code> is
        `error_code` (default SlowDown for 429/503, InternalError otherwise).
        """
        return self._add(FaultRule("status", status=status, error_code=error_code, **where))

    def reset_request_after(self, n_bytes: int, **where: Unpack[Where]) -> FaultRule:
        """Forward `n_bytes` of a matching request's body, then reset the client connection."""
        return self._add(FaultRule("reset_request", after_bytes=n_bytes, **where))

    def corrupt_request_at(self, n_bytes: int, **where: Unpack[Where]) -> FaultRule:
        """Flip every bit of byte `n_bytes` of a matching request's body on its way upstream."""
        return self._add(FaultRule("corrupt_request", after_bytes=n_bytes, **where))

    def reset_response_after(self, n_bytes: int, **where: Unpack[Where]) -> FaultRule:
        """Send `n_bytes` of a matching response's body, then reset the client connection."""
        return self._add(FaultRule("reset_response", after_bytes=n_bytes, **where))

    def truncate_response(self, n_bytes: int, **where: Unpack[Where]) -> FaultRule:
        """Send the whole head (full Content-Length) but `n_bytes` of body, then close (FIN)."""
        return self._add(FaultRule("truncate_response", after_bytes=n_bytes, **where))

    def delay(self, seconds: float, **where: Unpack[Where]) -> FaultRule:
        """Hold a matching request `seconds` more before forwarding it (a slow server).

        The rule's `beside` lists the requests that arrived meanwhile: what a client did
        while it waited for this one.
        """
        return self._add(FaultRule("delay", seconds=seconds, **where))

    def clear(self) -> None:
        """Drop every rule, the latency and the bandwidth cap; counters stay."""
        with self._lock:
            self._rules.clear()
            self._latency_s = 0.0
            self._bandwidth = None

    def reset_stats(self) -> None:
        with self._lock:
            self._counters = _Counters()

    def stats(self) -> ProxyStats:
        with self._lock:
            c = self._counters
            return ProxyStats(
                requests=c.requests,
                requests_by_method=dict(c.by_method),
                bytes_up=c.bytes_up,
                bytes_down=c.bytes_down,
                connections=c.connections,
                faults_fired=c.faults_fired,
                log=tuple(c.log),
                peak_in_flight=dict(c.peak_in_flight),
            )

    def _add(self, rule: FaultRule) -> FaultRule:
        with self._lock:
            self._rules.append(rule)
        return rule

    def _start(self) -> None:
        self._thread.start()
        started = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0, limit=MAX_HEAD_BYTES), self._loop
        )
        server = self._server = started.result(IO_TIMEOUT_S)
        self.port = server.sockets[0].getsockname()[1]

    def _stop(self) -> None:
        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            # Aborting the sockets ends each connection's reads; cancel only what still hangs.
            for writer in list(self._writers):
                writer.transport.abort()
            if self._tasks:
                _, pending = await asyncio.wait(self._tasks, timeout=5.0)
                for task in pending:
                    task.cancel()

        if self._thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(IO_TIMEOUT_S)
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(IO_TIMEOUT_S)
        if not self._thread.is_alive():
            self._loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        with self._lock:
            self._counters.connections += 1
        conn = _Connection(reader, writer)
        reset = False
        try:
            while (head := await _next_request(reader)) is not None:
                if not await self._exchange(conn, head):
                    break
        except _Cut as cut:
            reset = cut.reset
        except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError):
            reset = True
        finally:
            self._tasks.discard(task)
            self._writers.discard(writer)
            if conn.upstream is not None:
                conn.upstream[1].transport.abort()
            _close(writer, reset=reset)

    async def _exchange(self, conn: _Connection, head: bytes) -> bool:
        """Relay one request and its response; say whether the connection may be reused."""
        method = _parse_head(head)[0]
        with self._lock:
            counters = self._counters
            counters.in_flight[method] += 1
            peak = counters.peak_in_flight
            peak[method] = max(peak[method], counters.in_flight[method])
        try:
            return await self._relay(conn, head)
        finally:
            with self._lock:
                counters.in_flight[method] -= 1

    async def _relay(self, conn: _Connection, head: bytes) -> bool:
        method, target, headers = _parse_head(head)
        with self._lock:
            c = self._counters
            c.requests += 1
            c.by_method[method] += 1
            latency, bandwidth = self._latency_s, self._bandwidth
            for held in self._holding:
                held.beside.append((method, target))
            rule = next((r for r in self._rules if r.take(method, target)), None)
            c.faults_fired += rule is not None
            c.log.append((method, target, 0))
            log, log_index = c.log, len(c.log) - 1

        def record(status: int) -> None:
            # Called before the client can see the response, so its counts are in place.
            with self._lock:
                log[log_index] = (method, target, status)

        if latency:
            await asyncio.sleep(latency)
        if rule is not None and rule.kind == "delay":
            with self._lock:
                self._holding.append(rule)
            try:
                await asyncio.sleep(rule.seconds)
            finally:
                with self._lock:
                    self._holding.remove(rule)
            rule = None
        if rule is not None and rule.kind == "status":
            return await self._refuse(conn, rule, method, target, headers, bandwidth, record)
        return await self._forward(conn, rule, head, method, headers, bandwidth, record)

    async def _refuse(
        self,
        conn: _Connection,
        rule: FaultRule,
        method: str,
        target: str,
        headers: dict[str, str],
        bandwidth: float | None,
        record: Callable[[int], None],
    ) -> bool:
        """Answer with the rule's error instead of the upstream."""
        # A client waiting for "100 Continue" sends no body; it must not reuse the connection.
        expects_continue = headers.get("expect", "").lower() == "100-continue"
        if not expects_continue:
            await _copy_body(conn.reader, _discard, _request_framing(headers))
        response = _error_response(rule, method, target, close=expects_continue)
        record(rule.status)
        await self._sender(conn.writer, bandwidth, up=False)(response)
        return not expects_continue

    async def _forward(
        self,
        conn: _Connection,
        rule: FaultRule | None,
        head: bytes,
        method: str,
        headers: dict[str, str],
        bandwidth: float | None,
        record: Callable[[int], None],
    ) -> bool:
        """Relay the request upstream and the response back, cutting where `rule` says."""
        kind = rule.kind if rule is not None else None
        cut_request = rule if kind == "reset_request" else None
        corrupt = rule if kind == "corrupt_request" else None
        cut_response = rule if kind in ("reset_response", "truncate_response") else None
        to_client = self._sender(conn.writer, bandwidth, up=False)
        up_reader, up_writer = await conn.open_upstream(self.upstream_host, self.upstream_port)
        await self._sender(up_writer, bandwidth, up=True)(head)
        expects_continue = headers.get("expect", "").lower() == "100-continue"
        response = await _interim_answer(up_reader) if expects_continue else None
        # A final answer instead of "100 Continue": the client may or may not send the body.
        body_skipped = response is not None and _status(response) >= 200
        if response is not None and _status(response) == 100:
            await to_client(response)
            response = None
        if response is None:
            to_upstream = self._sender(up_writer, bandwidth, up=True, cut=cut_request)
            if corrupt is not None:
                to_upstream = _corrupting(to_upstream, corrupt.after_bytes)
            await _copy_body(conn.reader, to_upstream, _request_framing(headers))
            response = await _read_head(up_reader)
            while _status(response) < 200:
                await to_client(response)
                response = await _read_head(up_reader)
        status = _status(response)
        record(status)
        _, _, response_headers = _parse_head(response)
        await to_client(self._rewrite_location(response, response_headers))
        to_client = self._sender(conn.writer, bandwidth, up=False, cut=cut_response)
        framing = _response_framing(method, status, response_headers)
        await _copy_body(up_reader, to_client, framing)
        connection = (
            headers.get("connection", "") + response_headers.get("connection", "")
        ).lower()
        return not body_skipped and "close" not in connection and framing[0] != "eof"

    def _sender(
        self,
        writer: asyncio.StreamWriter,
        bandwidth: float | None,
        *,
        up: bool,
        cut: FaultRule | None = None,
    ) -> Send:
        """A writer that counts bytes, keeps to `bandwidth` and applies a cut rule."""
        budget = cut.after_bytes if cut is not None else None
        slice_size = (
            COPY_CHUNK if bandwidth is None else max(1, min(COPY_CHUNK, int(bandwidth / 20)))
        )

        async def send(data: bytes) -> None:
            nonlocal budget
            cutting = budget is not None and len(data) >= budget
            if budget is not None:
                data, budget = data[:budget], budget - min(budget, len(data))
            for start in range(0, len(data), slice_size):
                piece = data[start : start + slice_size]
                with self._lock:
                    if up:
                        self._counters.bytes_up += len(piece)
                    else:
                        self._counters.bytes_down += len(piece)
                writer.write(piece)
                await asyncio.wait_for(writer.drain(), IO_TIMEOUT_S)
                if bandwidth:
                    await asyncio.sleep(len(piece) / bandwidth)
            if cutting:
                assert cut is not None
                raise _Cut(reset=cut.kind != "truncate_response")

        return send

    def _rewrite_location(self, head: bytes, headers: dict[str, str]) -> bytes:
        location = headers.get("location", "")
        upstream = f"//{self.upstream_host}:{self.upstream_port}"
        if upstream not in location:
            return head
        return head.replace(
            location.encode(), location.replace(upstream, f"//127.0.0.1:{self.port}").encode()
        )


class _Connection:
    """One client connection and the upstream connection that serves it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def open_upstream(
        self, host: str, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.upstream is not None and self.upstream[0].at_eof():
            self.upstream[1].transport.abort()
            self.upstream = None
        if self.upstream is None:
            opening = asyncio.open_connection(host, port, limit=MAX_HEAD_BYTES)
            self.upstream = await asyncio.wait_for(opening, IO_TIMEOUT_S)
        return self.upstream


@contextlib.contextmanager
def run_proxy(upstream_host: str, upstream_port: int) -> Iterator[FaultProxy]:
    """Run a `FaultProxy` in front of `upstream_host:upstream_port` for the block."""
    proxy = FaultProxy(upstream_host, upstream_port)
    try:
        proxy._start()
        yield proxy
    finally:
        proxy._stop()


async def _next_request(reader: asyncio.StreamReader) -> bytes | None:
    """The next request head, or None once the client has closed between requests."""
    try:
        return await _read_head(reader)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return None


async def _interim_answer(reader: asyncio.StreamReader) -> bytes:
    """The upstream's answer to `Expect: 100-continue`; one it does not give in time is a yes."""
    try:
        return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), EXPECT_WAIT_S)
    except TimeoutError:
        return CONTINUE  # readuntil consumes nothing until it finds the end of a head


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    try:
        return await _read(reader.readuntil(b"\r\n\r\n"))
    except asyncio.LimitOverrunError as exc:
        raise ValueError("HTTP head too long") from exc


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    """The first two words of the start line and the headers, names lower-cased."""
    start, *lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
    first, second, *_ = [*start.split(" ", 2), ""]
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return first, second, headers


def _status(head: bytes) -> int:
    return int(_parse_head(head)[1])


def _request_framing(headers: dict[str, str]) -> Framing:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return ("chunked", 0)
    return ("length", int(headers.get("content-length", "0")))


def _response_framing(method: str, status: int, headers: dict[str, str]) -> Framing:
    if method == "HEAD" or status in (204, 304) or status < 200:
        return ("length", 0)
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return ("chunked", 0)
    if "content-length" in headers:
        return ("length", int(headers["content-length"]))
    return ("eof", 0)


async def _copy_body(reader: asyncio.StreamReader, send: Send, framing: Framing) -> None:
    kind, length = framing
    if kind == "length":
        while length > 0:
            data = await _read(reader.read(min(length, COPY_CHUNK)))
            if not data:
                raise asyncio.IncompleteReadError(b"", length)
            length -= len(data)
            await send(data)
    elif kind == "eof":
        while data := await _read(reader.read(COPY_CHUNK)):
            await send(data)
    else:
        while True:
            size_line = await _read(reader.readuntil(b"\r\n"))
            await send(size_line)
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            while size > 0:
                data = await _read(reader.read(min(size, COPY_CHUNK)))
                if not data:
                    raise asyncio.IncompleteReadError(b"", size)
                size -= len(data)
                await send(data)
            await send(await _read(reader.readexactly(2)))
        while (trailer := await _read(reader.readuntil(b"\r\n"))) != b"\r\n":
            await send(trailer)
        await send(trailer)


def _corrupting(send: Send, at: int) -> Send:
    """`send`, with the byte at offset `at` of what passes through it inverted."""
    seen = 0

    async def corrupt(data: bytes) -> None:
        nonlocal seen
        if seen <= at < seen + len(data):
            i = at - seen
            data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]
        seen += len(data)
        await send(data)

    return corrupt


async def _read(pending: Awaitable[bytes]) -> bytes:
    return await asyncio.wait_for(pending, IO_TIMEOUT_S)


async def _discard(data: bytes) -> None:
    return None


def _error_response(rule: FaultRule, method: str, target: str, *, close: bool) -> bytes:
    status = rule.status
    phrase = http.HTTPStatus(status).phrase
    if target.startswith(GCS_PATH_PREFIXES):
        reason = GCS_REASONS.get(status, "backendError")
        error = {
            "code": status,
            "message": phrase,
            "errors": [{"message": phrase, "domain": "global", "reason": reason}],
        }
        body = json.dumps({"error": error}).encode()
        content_type = "application/json; charset=UTF-8"
    else:
        code = rule.error_code or S3_ERROR_CODES.get(status, "InternalError")
        message = S3_MESSAGES.get(code, phrase)
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message>"
            "<RequestId>faultproxy</RequestId><HostId>faultproxy</HostId></Error>"
        ).encode()
        content_type = "application/xml"
    head = f"HTTP/1.1 {status} {phrase}\r\nContent-Type: {content_type}\r\n"
    head += f"Content-Length: {len(body)}\r\n" + ("Connection: close\r\n\r\n" if close else "\r\n")
    return head.encode() + (b"" if method == "HEAD" else body)


def _close(writer: asyncio.StreamWriter, *, reset: bool) -> None:
    if reset:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
    else:
        writer.close()
