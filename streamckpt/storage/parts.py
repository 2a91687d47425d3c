"""Uploads that send the parts of one object at once, on the filesystem's own event loop.

The clients' own file objects (s3fs, gcsfs) send the parts of an object one after another, so
a shard uses one connection at a time. Here a writer cuts the stream into parts of
``part_size`` and sends them as coroutines on fsspec's loop (where the client's session
lives), up to ``parts_in_flight`` at once; the writer thread only blocks when that many are
pending. An object smaller than one part goes up whole, in one request. How the parts become
one object is the store's: S3 completes a multipart upload, GCS composes temporary objects.

Each request is one of the store's requests like any other:

- it holds a slot of the store's adaptive limit while it runs, so a store that throttles or
  slows down shrinks the parts in flight too, not only the number of uploads;
- a part that fails transiently is sent again on its own, under the store's retry policy: a
  connection reset at part 500 of a 10 GiB shard costs one part, not the 8 GiB before it.

Slots are taken and given back from the writer thread through anyio. A writer waiting for a
slot keeps settling its own finished parts meanwhile, so it never waits on slots that only it
could give back.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio.from_thread

from streamckpt.errors import RetriesExhaustedError
from streamckpt.storage.base import ShardWriter, map_errors, wait_from_thread
from streamckpt.storage.retry import (
    AdaptiveLimiter,
    RetryPolicy,
    StoreStats,
    classify,
)

#: One request, made anew for each attempt (a coroutine can be awaited only once).
Request = Callable[[], Awaitable[Any]]

DEFAULT_PARTS_IN_FLIGHT = 4
MAX_PARTS_IN_FLIGHT = 8
#: How long an abort lets the requests in flight end before it cancels them.
ABORT_WAIT_S = 30.0


def plan_uploads(
    sizes: Sequence[int], *, budget: int, part_size: int, parallel_parts: bool
) -> tuple[int, int]:
    """How many of these objects to upload at once, and how many parts each keeps in flight.

    Parallel parts are what make an upload fast over a slow link, and about
    ``MAX_PARTS_IN_FLIGHT`` requests keep a link busy without flooding the server: one large
    object gets them all; smaller objects, with fewer parts each, go up more at once. All of it
    fits the budget: an upload holds the part being filled and one transient copy of it, and
    each part in flight twice over (our bytes, and the HTTP client's copy while it sends them:
    measured, peak RSS grows by two parts per part in flight). Without parallel parts a writer
    holds a part being filled and its copy.
    """
    largest = max(sizes, default=0)
    budget_parts = max(1, budget // max(1, min(part_size, largest)))  # small objects hold less
    count = max(1, len(sizes))
    if not parallel_parts:
        return max(1, min(count, budget_parts // 2)), 1
    parts_per_object = max(1, -(-largest // part_size))

    def parts_each(writers: int) -> int:
        fits = (budget_parts // writers - 2) // 2
        return min(parts_per_object, MAX_PARTS_IN_FLIGHT // writers, fits)

    # the most parts in flight in all, with as few uploads as give that many
    best = max(range(1, count + 1), key=lambda w: (w * parts_each(w), -w))
    return best, max(1, parts_each(best))


@dataclass(slots=True)
class _Flight:
    """A request on its way: what it carries, its slot, and what to do with its answer."""

    nbytes: int  # the bytes it sends
    slot: object | None
    on_done: Callable[[Any], None] | None
    # Whether its time tells the limiter about congestion: that of a transfer does; that of
    # housekeeping (create, complete, compose, delete) is mostly the server's own work on
    # whole objects, and would read as congestion next to small requests.
    timed: bool


class PartsWriter(ShardWriter):
    def __init__(
        self,
        fs: Any,
        path: str,
        uri: str,
        stats: StoreStats,
        *,
        part_size: int,
        parts_in_flight: int = DEFAULT_PARTS_IN_FLIGHT,
        limiter: AdaptiveLimiter | None = None,
        policy: RetryPolicy | None = None,
    ) -> None:
        self._fs = fs
        self._path = path
        self._uri = uri
        self._stats = stats
        self._part_size = part_size
        self._parts_in_flight = max(1, parts_in_flight)
        self._limiter = limiter
        self._policy = policy or RetryPolicy()
        self._rng = random.Random()
        self._buffer = bytearray()
        self._pending: dict[concurrent.futures.Future[tuple[Any, float]], _Flight] = {}
        self._throttled: collections.deque[None] = collections.deque()  # from fsspec's loop
        self._parts_sent = 0
        self._aborting = False  # no more retries: the upload is being abandoned
        self._flushed = False  # every byte sent: only the join is left
        self.bytes_written = 0

    # -- what a store supplies ------------------------------------------------------------

    @abc.abstractmethod
    def _part_request(self, number: int, data: bytes) -> Request:
        """The request that stores part ``number`` (from 1).

        Called in the writer thread, so that per-part work (a checksum) stays off the loop.
        """

    def _part_sent(self, number: int, answer: Any) -> None:
        """Part ``number`` is stored; ``answer`` is what its request returned."""

    @abc.abstractmethod
    def _whole_request(self, data: bytes) -> Request:
        """The request that stores an object smaller than one part."""

    def _whole_sent(self, answer: Any) -> None:
        """The object smaller than one part is stored; ``answer`` is what its request returned."""

    def _begin_parts(self) -> None:
        """Before the first part: whatever the store needs first (S3: the upload's id)."""

    @abc.abstractmethod
    def _join_parts(self) -> None:
        """Every part is stored: make them the object; block until it is."""

    @abc.abstractmethod
    def _discard_parts(self) -> None:
        """Abort: remove whatever the parts left on the store; never raise."""

    # -- requests -------------------------------------------------------------------------

    def _requests(
        self,
        requests: Sequence[Request],
        *,
        retry: bool = True,
        nbytes: int = 0,
        timed: bool = False,
    ) -> list[Any]:
        """Send these requests at once and wait for their answers (none may be pending)."""
        answers: list[Any] = [None] * len(requests)
        for i, request in enumerate(requests):
            on_done = functools.partial(answers.__setitem__, i)
            self._launch(request, nbytes, on_done, retry=retry, timed=timed)
        self._wait(0)
        return answers

    def _request(
        self, request: Request, *, retry: bool = True, nbytes: int = 0, timed: bool = False
    ) -> Any:
        return self._requests([request], retry=retry, nbytes=nbytes, timed=timed)[0]

    def _launch(
        self,
        request: Request,
        nbytes: int,
        on_done: Callable[[Any], None] | None,
        *,
        retry: bool,
        timed: bool = False,
    ) -> None:
        slot = self._take_slot()
        self._stats.add(requests=1)
        future = asyncio.run_coroutine_threadsafe(self._attempts(request, retry), self._fs.loop)
        self._pending[future] = _Flight(nbytes, slot, on_done, timed)

    async def _attempts(self, request: Request, retry: bool) -> tuple[Any, float]:
        """Send ``request`` until it succeeds, under the retry policy; its answer and time.

        Without ``retry`` a failure is the caller's to handle (a request that is not safe to
        repeat on its own, such as completing a multipart upload).
        """
        first = time.monotonic()
        attempt = 0
        while True:
            started = time.monotonic()
            try:
                return await request(), time.monotonic() - started
            except Exception as exc:
                verdict = classify(exc)
                if verdict == "throttle":
                    self._throttled.append(None)
                if not retry or verdict == "permanent" or self._aborting:
                    raise
                if verdict == "throttle":
                    self._stats.add(throttles=1)
                attempt += 1
                policy = self._policy
                if attempt >= policy.max_attempts or time.monotonic() - first >= policy.deadline:
                    raise RetriesExhaustedError(
                        f"a request failed {attempt} times: {exc!r}", uri=self._uri
                    ) from exc
                self._stats.add(retries=1, requests=1)
                await asyncio.sleep(policy.backoff(attempt, self._rng))

    # -- the adaptive limit ---------------------------------------------------------------

    def _take_slot(self) -> object | None:
        """A slot of the store's limit; while none is free, settle our own finished parts.

        An abort's clean-up takes none: it must run even when the save was cancelled (and a
        wait on the event loop would be cancelled too).
        """
        if self._limiter is None or self._aborting:
            return None
        slot = object()
        while not anyio.from_thread.run_sync(self._limiter.try_acquire_on_behalf_of, slot):
            if not self._pending:  # we hold no slots: others will give theirs back
                wait_from_thread(functools.partial(self._limiter.acquire_on_behalf_of, slot))
                break
            self._wait(len(self._pending) - 1)
        return slot

    def _give_back(self, flight: _Flight, seconds: float | None) -> None:
        """Its slot back to the limiter, with any throttles seen and its time (if it counts)."""
        throttles = 0
        while self._throttled:
            self._throttled.popleft()
            throttles += 1
        if self._limiter is not None and flight.slot is not None:
            anyio.from_thread.run_sync(
                self._limiter.settle_on_behalf_of, flight.slot, seconds, flight.nbytes, throttles
            )

    # -- the stream -----------------------------------------------------------------------

    def _wait(self, until: int) -> None:
        """Wait for requests to finish until at most ``until`` remain in flight."""
        while len(self._pending) > until:
            done, _ = concurrent.futures.wait(
                list(self._pending), return_when=concurrent.futures.FIRST_COMPLETED
            )
            self._settle(done)

    def _settle(self, done: Iterable[concurrent.futures.Future[tuple[Any, float]]]) -> None:
        for future in done:
            flight = self._pending.pop(future)
            try:
                answer, seconds = future.result()
            except BaseException:
                self._give_back(flight, None)
                with map_errors(self._uri):
                    raise
            self._give_back(flight, seconds if flight.timed else None)
            if flight.on_done is not None:
                flight.on_done(answer)
            if flight.nbytes:
                self._stats.add(bytes_written=flight.nbytes)

    def _queue_part(self, data: bytes) -> None:
        self._wait(self._parts_in_flight - 1)
        if not self._parts_sent:
            self._begin_parts()
        self._parts_sent += 1
        number = self._parts_sent
        self._launch(
            self._part_request(number, data),
            len(data),
            functools.partial(self._part_sent, number),
            retry=True,
            timed=True,
        )

    def write(self, chunk: memoryview) -> None:
        self._buffer += chunk
        self.bytes_written += len(chunk)
        while len(self._buffer) >= self._part_size:
            part = bytes(memoryview(self._buffer)[: self._part_size])  # one copy, not two
            del self._buffer[: self._part_size]
            self._queue_part(part)
        if finished := [future for future in self._pending if future.done()]:
            self._settle(finished)  # their slots go back now, not at the next full part

    def flush(self) -> bool:
        if self._flushed:
            return True
        if not self._parts_sent:
            data = bytes(self._buffer)
            self._buffer = bytearray()
            request = self._whole_request(data)
            self._whole_sent(self._request(request, nbytes=len(data), timed=True))
        else:
            if self._buffer:
                self._queue_part(bytes(self._buffer))
                self._buffer = bytearray()
            self._wait(0)
        self._flushed = True
        return True

    def commit(self) -> None:
        self.flush()
        if self._parts_sent:
            self._join_parts()
        with contextlib.suppress(Exception):
            self._fs.invalidate_cache(self._path)

    def abort(self) -> None:
        # The requests in flight end first, for at most ABORT_WAIT_S: a part that a server
        # is still storing would land after the deletes below (or an S3 abort) and stay.
        self._aborting = True
        pending = list(self._pending)
        _, unfinished = concurrent.futures.wait(pending, timeout=ABORT_WAIT_S)
        for future in unfinished:
            future.cancel()
        flights = list(self._pending.values())
        self._pending.clear()
        for flight in flights:
            with contextlib.suppress(BaseException):  # a cancelled save still cleans up
                self._give_back(flight, None)
        self._discard_parts()
        with contextlib.suppress(Exception):
            self._fs.rm_file(self._path)
