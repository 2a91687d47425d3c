"""Retries with jittered exponential backoff, adaptive concurrency, and request statistics.

Object stores throttle bursts (429, 503 SlowDown), drop connections and time out. A request
that failed for one of those reasons is retried after a random wait drawn from an exponentially
growing window ("full jitter"), until a total deadline; anything else (403, 404, 412, a bad
request) fails at once. Concurrency per store follows AIMD: it grows by one slot per window of
successes and halves on a throttle or when latency climbs well above its running baseline, so
16 shards starting at once turn into a steady stream instead of a storm of rejected requests.
"""

from __future__ import annotations

import errno
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import anyio

from streamckpt.errors import RetriesExhaustedError

T = TypeVar("T")
Verdict = Literal["transient", "throttle", "permanent"]

_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_THROTTLE_STATUS = frozenset({429, 503})
_THROTTLE_CODES = frozenset({"SlowDown", "ServiceUnavailable", "TooManyRequests", "Throttling"})
# S3 answers 400 to these, yet another try can succeed: a body damaged on the way (its
# checksum did not match), and a body that came too slowly
_TRANSIENT_CODES = frozenset({"BadDigest", "XAmzContentChecksumMismatch", "RequestTimeout"})
_TRANSIENT_NAMES = frozenset(
    {
        # aiohttp / botocore / requests connection-level failures, matched by class name so
        # that this module need not import any backend
        "ClientConnectionError",
        "ClientConnectorError",
        "ClientOSError",
        "ClientPayloadError",
        "ServerDisconnectedError",
        "ServerTimeoutError",
        "ConnectionClosedError",
        "EndpointConnectionError",
        "ReadTimeoutError",
        "ConnectTimeoutError",
        "ResponseStreamingError",
        "IncompleteReadError",
        "ContentLengthError",
        "TransferEncodingError",
    }
)


def _status_of(exc: BaseException) -> tuple[int | None, str | None]:
    """HTTP status and error code of a backend exception, if it carries them."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        meta = response.get("ResponseMetadata", {})
        error = response.get("Error", {})
        status = meta.get("HTTPStatusCode")
        return (int(status) if status else None), error.get("Code")
    for attr in ("status", "code"):  # aiohttp deprecates `code`: reading it warns
        value = getattr(exc, attr, None)
        if isinstance(value, int) and 100 <= value < 600:
            return value, None
    return None, None


def http_status(exc: BaseException) -> int | None:
    """The HTTP status that the first exception in the chain carrying one answered."""
    for item in _chain(exc):
        status, _ = _status_of(item)
        if status is not None:
            return status
    return None


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen and len(seen) < 8:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _looks_transient(exc: BaseException) -> bool:
    if isinstance(exc, TimeoutError | ConnectionError):
        return True
    if type(exc).__name__ in _TRANSIENT_NAMES:
        return True
    return isinstance(exc, OSError) and exc.errno in (errno.ECONNRESET, errno.EPIPE)


def classify(exc: BaseException) -> Verdict:
    """Whether a failure is worth retrying, and whether the store asked us to slow down."""
    verdict: Verdict = "permanent"
    for item in _chain(exc):
        if isinstance(item, RetriesExhaustedError):
            return "permanent"
        if type(item).__name__ in _TRANSIENT_NAMES:
            # aiohttp's parser errors carry a `code` (400) that no server sent: a body cut
            # short is ContentLengthError(code=400) under ClientPayloadError
            verdict = "transient"
            continue
        status, code = _status_of(item)
        if code in _THROTTLE_CODES or status in _THROTTLE_STATUS:
            return "throttle"
        if code in _TRANSIENT_CODES:
            return "transient"
        if status is not None:
            return "transient" if status in _TRANSIENT_STATUS else "permanent"
        if isinstance(item, FileNotFoundError | PermissionError | FileExistsError):
            return "permanent"
        if isinstance(item, OSError) and item.errno == errno.EBUSY:
            return "throttle"  # s3fs's translation of SlowDown / ServiceUnavailable
        if _looks_transient(item):
            verdict = "transient"
    return verdict


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How hard to try: attempts, backoff window, and a deadline over all attempts."""

    max_attempts: int = 8
    initial_backoff: float = 0.05
    max_backoff: float = 5.0
    multiplier: float = 2.0
    deadline: float = 300.0

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """Full jitter: uniform in [0, min(max, initial * multiplier**attempt)]."""
        window = min(self.max_backoff, self.initial_backoff * self.multiplier**attempt)
        return rng.uniform(0, window)


@dataclass(slots=True)
class StoreStats:
    """Counters of one store (one save or load): what moved and what it took."""

    requests: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    retries: int = 0
    throttles: int = 0
    failures: int = 0
    #: called with the bytes of every read or write as it completes (progress bars)
    on_bytes: Callable[[int], None] | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)
        moved = counts.get("bytes_read", 0) + counts.get("bytes_written", 0)
        if moved and self.on_bytes is not None:
            self.on_bytes(moved)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {
                "requests": self.requests,
                "bytes_read": self.bytes_read,
                "bytes_written": self.bytes_written,
                "retries": self.retries,
                "throttles": self.throttles,
                "failures": self.failures,
            }


class AdaptiveLimiter:
    """AIMD concurrency limit: +1 slot per ``limit`` successes, halved on congestion.

    Congestion is a throttle verdict, or ``slow_streak`` requests in a row of one size class
    each slower than ``latency_factor`` times that class's running (exponentially weighted)
    latency baseline. One slow request is no trend: measured through a 20 ms / 100 MB/s link,
    cutting on single outliers (a 4 KiB tail part queued behind 16 MiB parts) cost GCS saves
    30-40% of their speed.
    """

    def __init__(
        self,
        *,
        initial: int = 8,
        minimum: int = 1,
        maximum: int = 64,
        latency_factor: float = 4.0,
        slow_streak: int = 3,
    ) -> None:
        self.limit = float(initial)
        self.minimum = minimum
        self.maximum = maximum
        self.latency_factor = latency_factor
        self.slow_streak = slow_streak
        self._limiter = anyio.CapacityLimiter(initial)
        # running latency per request-size class: a 16 MiB part at a capped bandwidth is
        # slow by nature, and must not read as congestion next to 4 KiB requests
        self._baselines: dict[int, float] = {}
        self._slow: dict[int, int] = {}  # slow requests in a row, per size class
        self._last_cut = 0.0
        self.cuts = 0
        self.peak = initial

    @property
    def current(self) -> int:
        return int(self._limiter.total_tokens)

    def _apply(self) -> None:
        tokens = max(self.minimum, min(self.maximum, math.floor(self.limit)))
        self._limiter.total_tokens = tokens
        self.peak = max(self.peak, tokens)

    def on_success(self, seconds: float, nbytes: int = 0) -> None:
        size_class = max(0, nbytes.bit_length() - 16) // 2  # <=64 KiB, then factors of 4
        baseline = self._baselines.get(size_class)
        if baseline is None:
            self._baselines[size_class] = seconds
        elif seconds > self.latency_factor * baseline and seconds > 0.05:
            slow = self._slow.get(size_class, 0) + 1
            self._slow[size_class] = 0 if slow >= self.slow_streak else slow
            if slow >= self.slow_streak:
                self._cut()
            return
        else:
            self._slow[size_class] = 0
            self._baselines[size_class] = 0.9 * baseline + 0.1 * seconds
        self.limit = min(self.maximum, self.limit + 1.0 / max(1.0, self.limit))
        self._apply()

    def on_throttle(self) -> None:
        self._cut()

    def _cut(self) -> None:
        now = time.monotonic()
        if now - self._last_cut < 0.05:
            return  # one burst of rejections is one congestion signal, not many
        self._last_cut = now
        self.limit = max(float(self.minimum), self.limit / 2)
        self.cuts += 1
        self._apply()

    async def acquire_on_behalf_of(self, token: object) -> None:
        """Take a slot for work running in another thread (a streamed upload)."""
        await self._limiter.acquire_on_behalf_of(token)

    def try_acquire_on_behalf_of(self, token: object) -> bool:
        """Take a slot for ``token`` if one is free now."""
        try:
            self._limiter.acquire_on_behalf_of_nowait(token)
        except anyio.WouldBlock:
            return False
        return True

    def release_on_behalf_of(self, token: object) -> None:
        self._limiter.release_on_behalf_of(token)

    def settle_on_behalf_of(
        self, token: object, seconds: float | None, nbytes: int, throttles: int
    ) -> None:
        """Give back ``token``'s slot, with what its request saw (``seconds``: None if failed)."""
        self._limiter.release_on_behalf_of(token)
        if throttles:
            self.on_throttle()
        if seconds is not None:
            self.on_success(seconds, nbytes)

    async def __aenter__(self) -> None:
        await self._limiter.acquire()

    async def __aexit__(self, *exc_info: object) -> None:
        self._limiter.release()


async def call_with_retries(
    fn: Callable[[], T],
    *,
    policy: RetryPolicy,
    limiter: AdaptiveLimiter,
    stats: StoreStats,
    rng: random.Random | None = None,
    nbytes: int = 0,
) -> T:
    """Run blocking ``fn`` in a worker thread under the limiter, retrying transient failures.

    ``nbytes`` (what the request moves) lets the limiter compare its latency with requests of
    the same size.
    """
    rng = rng or random.Random()
    started = time.monotonic()
    attempt = 0
    while True:
        t0 = time.monotonic()
        try:
            async with limiter:
                stats.add(requests=1)
                result = await anyio.to_thread.run_sync(fn)
        except Exception as exc:
            verdict = classify(exc)
            if verdict == "throttle":
                stats.add(throttles=1)
                limiter.on_throttle()
            attempt += 1
            out_of_time = time.monotonic() - started >= policy.deadline
            if verdict == "permanent" or attempt >= policy.max_attempts or out_of_time:
                stats.add(failures=1)
                raise
            stats.add(retries=1)
            await anyio.sleep(policy.backoff(attempt, rng))
            continue
        limiter.on_success(time.monotonic() - t0, nbytes)
        return result


def run_blocking_with_retries(
    fn: Callable[[], T],
    *,
    policy: RetryPolicy,
    stats: StoreStats,
    should_stop: Callable[[], Any] | None = None,
    rng: random.Random | None = None,
) -> T:
    """The same retry rule for code already on a worker thread (a shard's upload loop)."""
    rng = rng or random.Random()
    started = time.monotonic()
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as exc:
            verdict = classify(exc)
            if verdict == "throttle":
                stats.add(throttles=1)
            attempt += 1
            out_of_time = time.monotonic() - started >= policy.deadline
            if verdict == "permanent" or attempt >= policy.max_attempts or out_of_time:
                stats.add(failures=1)
                raise
            stats.add(retries=1)
            if should_stop is not None:
                should_stop()
            time.sleep(policy.backoff(attempt, rng))
