"""S3 multipart uploads with several parts in flight.

s3fs's file object uploads the parts of one object one after another, so one shard can use one
connection at a time. Here the parts of a shard are sent as coroutines on fsspec's own event
loop (the loop s3fs's session lives on), up to ``parts_in_flight`` at once; the writer thread
only blocks when that many are pending. An object smaller than one part goes up as a single
PUT, with no multipart round trips at all.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections.abc import Sequence
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


class S3MultipartWriter(ShardWriter):
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
        self._bucket, self._key, _ = fs.split_path(path)
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._pending: list[tuple[int, concurrent.futures.Future[Any], int]] = []
        self._done: list[dict[str, Any]] = []
        self._next_part = 1
        self.bytes_written = 0

    def _run(self, method: str, **kwargs: Any) -> concurrent.futures.Future[Any]:
        coroutine = self._fs._call_s3(method, Bucket=self._bucket, Key=self._key, **kwargs)
        self._stats.add(requests=1)
        return asyncio.run_coroutine_threadsafe(coroutine, self._fs.loop)

    def _collect(self, until: int) -> None:
        """Wait for pending parts until at most ``until`` remain in flight."""
        while len(self._pending) > until:
            number, future, size = self._pending.pop(0)
            with map_errors(self._uri):
                answer = future.result()
            self._done.append({"PartNumber": number, "ETag": answer["ETag"]})
            self._stats.add(bytes_written=size)

    def _send_part(self, data: bytes) -> None:
        if self._upload_id is None:
            with map_errors(self._uri):
                self._upload_id = self._run("create_multipart_upload").result()["UploadId"]
        self._collect(self._parts_in_flight - 1)
        future = self._run(
            "upload_part", PartNumber=self._next_part, UploadId=self._upload_id, Body=data
        )
        self._pending.append((self._next_part, future, len(data)))
        self._next_part += 1

    def write(self, chunk: memoryview) -> None:
        self._buffer += chunk
        self.bytes_written += len(chunk)
        while len(self._buffer) >= self._part_size:
            part = bytes(memoryview(self._buffer)[: self._part_size])  # one copy, not two
            del self._buffer[: self._part_size]
            self._send_part(part)

    def commit(self) -> None:
        if self._upload_id is None:
            with map_errors(self._uri):
                self._run("put_object", Body=bytes(self._buffer)).result()
            self._stats.add(bytes_written=len(self._buffer))
            self._buffer.clear()
            return
        if self._buffer:
            self._send_part(bytes(self._buffer))
            self._buffer.clear()
        self._collect(0)
        with map_errors(self._uri):
            self._run(
                "complete_multipart_upload",
                UploadId=self._upload_id,
                MultipartUpload={"Parts": self._done},
            ).result()
        self._upload_id = None
        with contextlib.suppress(Exception):
            self._fs.invalidate_cache(self._path)

    def abort(self) -> None:
        for _, future, _ in self._pending:
            future.cancel()
        for _, future, _ in self._pending:
            with contextlib.suppress(BaseException):
                future.result(timeout=30)
        self._pending.clear()
        if self._upload_id is not None:
            with contextlib.suppress(Exception):
                self._run("abort_multipart_upload", UploadId=self._upload_id).result(timeout=30)
            self._upload_id = None
        with contextlib.suppress(Exception):
            self._fs.rm_file(self._path)
