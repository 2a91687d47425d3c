"""Uploads that send the parts of one object at once, on the filesystem's own event loop.

The clients' own file objects (s3fs, gcsfs) send the parts of an object one after another, so
a shard uses one connection at a time. Here a writer cuts the stream into parts of
``part_size`` and sends them as coroutines on fsspec's loop (where the client's session
lives), up to ``parts_in_flight`` at once; the writer thread only blocks when that many are
pending. An object smaller than one part goes up whole, in one request. How the parts become
one object is the store's: S3 completes a multipart upload, GCS composes temporary objects.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import contextlib
from collections.abc import Coroutine, Sequence
from typing import Any

from streamckpt.storage.base import ShardWriter, map_errors
from streamckpt.storage.retry import StoreStats

DEFAULT_PARTS_IN_FLIGHT = 4
MAX_PARTS_IN_FLIGHT = 8


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
    ) -> None:
        self._fs = fs
        self._path = path
        self._uri = uri
        self._stats = stats
        self._part_size = part_size
        self._parts_in_flight = max(1, parts_in_flight)
        self._buffer = bytearray()
        self._pending: list[tuple[int, concurrent.futures.Future[Any], int]] = []
        self._parts_sent = 0
        self.bytes_written = 0

    # -- what a store supplies ------------------------------------------------------------

    @abc.abstractmethod
    def _send_part(self, number: int, data: bytes) -> concurrent.futures.Future[Any]:
        """Start sending part ``number`` (from 1); :meth:`_submit` it."""

    def _part_sent(self, number: int, answer: Any) -> None:
        """Part ``number`` is stored; ``answer`` is what its request returned."""

    @abc.abstractmethod
    def _put_whole(self, data: bytes) -> None:
        """Store an object smaller than one part, in one request; block until it is."""

    @abc.abstractmethod
    def _join_parts(self) -> None:
        """Every part is stored: make them the object; block until it is."""

    @abc.abstractmethod
    def _discard_parts(self) -> None:
        """Abort: remove whatever the parts left on the store; never raise."""

    # -- the stream -----------------------------------------------------------------------

    def _submit(self, coroutine: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
        self._stats.add(requests=1)
        return asyncio.run_coroutine_threadsafe(coroutine, self._fs.loop)

    def _collect(self, until: int) -> None:
        """Wait for pending parts until at most ``until`` remain in flight."""
        while len(self._pending) > until:
            number, future, size = self._pending.pop(0)
            with map_errors(self._uri):
                answer = future.result()
            self._part_sent(number, answer)
            self._stats.add(bytes_written=size)

    def _queue_part(self, data: bytes) -> None:
        self._collect(self._parts_in_flight - 1)
        self._parts_sent += 1
        with map_errors(self._uri):
            future = self._send_part(self._parts_sent, data)
        self._pending.append((self._parts_sent, future, len(data)))

    def write(self, chunk: memoryview) -> None:
        self._buffer += chunk
        self.bytes_written += len(chunk)
        while len(self._buffer) >= self._part_size:
            part = bytes(memoryview(self._buffer)[: self._part_size])  # one copy, not two
            del self._buffer[: self._part_size]
            self._queue_part(part)

    def commit(self) -> None:
        if not self._parts_sent:
            with map_errors(self._uri):
                self._put_whole(bytes(self._buffer))
            self._stats.add(bytes_written=len(self._buffer))
            self._buffer.clear()
        else:
            if self._buffer:
                self._queue_part(bytes(self._buffer))
                self._buffer.clear()
            self._collect(0)
            with map_errors(self._uri):
                self._join_parts()
        with contextlib.suppress(Exception):
            self._fs.invalidate_cache(self._path)

    def abort(self) -> None:
        for _, future, _ in self._pending:
            future.cancel()
        for _, future, _ in self._pending:
            with contextlib.suppress(BaseException):
                future.result(timeout=30)
        self._pending.clear()
        self._discard_parts()
        with contextlib.suppress(Exception):
            self._fs.rm_file(self._path)
