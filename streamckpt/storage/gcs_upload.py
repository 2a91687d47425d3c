"""GCS uploads as parts sent at once and composed into one object.

gcsfs's file object sends a resumable upload one chunk after another, so a shard uses one
connection at a time (and each chunk is a round trip). Here each full part goes up as a
temporary object of its own, by a media upload (one request), several at once as coroutines
on gcsfs's event loop; the commit composes the parts into the shard and deletes them. GCS
composes at most 32 sources per request, so larger shards compose in levels. The composed
object's crc32c is GCS's own combination of its parts', which ``verify_upload`` then compares
with the crc32c we computed while streaming, as for any upload. An object smaller than one part
is a single media upload, with no temporary objects at all.

Temporary parts are named ``<shard>.part-<token>-<n>``: never taken for a checkpoint file, and
removed on commit and abort (a killed process leaves them behind, as it leaves an unfinished
S3 multipart upload).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import secrets
from collections.abc import Coroutine
from typing import Any
from urllib.parse import quote

from streamckpt.storage.base import ShardWriter, map_errors
from streamckpt.storage.retry import StoreStats

logger = logging.getLogger(__name__)

#: GCS's limit on the sources of one compose request.
MAX_COMPOSE_SOURCES = 32


class GcsComposeWriter(ShardWriter):
    def __init__(
        self,
        fs: Any,
        path: str,
        uri: str,
        stats: StoreStats,
        *,
        part_size: int,
        parts_in_flight: int,
    ) -> None:
        self._fs = fs
        self._path = path
        self._uri = uri
        self._stats = stats
        self._part_size = part_size
        self._parts_in_flight = max(1, parts_in_flight)
        self._token = secrets.token_hex(6)
        self._buffer = bytearray()
        self._pending: list[tuple[concurrent.futures.Future[Any], int]] = []
        self._temporary: list[str] = []  # every temporary object sent (or being sent)
        self._parts: list[str] = []  # the parts, in order
        self.bytes_written = 0

    def _run(self, coroutine: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
        self._stats.add(requests=1)
        return asyncio.run_coroutine_threadsafe(coroutine, self._fs.loop)

    def _name(self, label: str) -> str:
        return f"{self._path}.part-{self._token}-{label}"

    def _collect(self, until: int) -> None:
        """Wait for part uploads until at most ``until`` remain in flight."""
        while len(self._pending) > until:
            future, size = self._pending.pop(0)
            with map_errors(self._uri):
                future.result()
            self._stats.add(bytes_written=size)

    async def _upload(self, path: str, data: bytes) -> None:
        """One media upload: the object's name is in the URL, and the body is our bytes.

        (gcsfs's simple upload wraps the bytes in a multipart body, a copy of each part.)
        """
        bucket, key, _ = self._fs.split_path(path)
        await self._fs._call(
            "POST",
            f"{self._fs._location}/upload/storage/v1/b/{quote(bucket, safe='')}/o",
            uploadType="media",
            name=key,
            data=data,
            headers={"Content-Type": "application/octet-stream"},
        )

    def _send_part(self, data: bytes) -> None:
        self._collect(self._parts_in_flight - 1)
        name = self._name(f"{len(self._parts) + 1:05d}")
        self._parts.append(name)
        self._temporary.append(name)
        self._pending.append((self._run(self._upload(name, data)), len(data)))

    def write(self, chunk: memoryview) -> None:
        self._buffer += chunk
        self.bytes_written += len(chunk)
        while len(self._buffer) >= self._part_size:
            part = bytes(memoryview(self._buffer)[: self._part_size])  # one copy, not two
            del self._buffer[: self._part_size]
            self._send_part(part)

    def _compose(self, target: str, sources: list[str]) -> concurrent.futures.Future[Any]:
        return self._run(self._fs._merge(target, sources))

    def commit(self) -> None:
        if not self._parts:
            with map_errors(self._uri):
                self._run(self._upload(self._path, bytes(self._buffer))).result()
            self._stats.add(bytes_written=len(self._buffer))
            self._buffer.clear()
            return
        if self._buffer:
            self._send_part(bytes(self._buffer))
            self._buffer.clear()
        self._collect(0)
        sources, level = self._parts, 0
        with map_errors(self._uri):
            while len(sources) > MAX_COMPOSE_SOURCES:
                level += 1
                groups = [
                    sources[i : i + MAX_COMPOSE_SOURCES]
                    for i in range(0, len(sources), MAX_COMPOSE_SOURCES)
                ]
                names = [self._name(f"c{level}-{i:05d}") for i in range(len(groups))]
                self._temporary += names
                futures = [self._compose(n, g) for n, g in zip(names, groups, strict=True)]
                for future in futures:
                    future.result()
                sources = names
            self._compose(self._path, sources).result()
        self._remove_temporary()
        with contextlib.suppress(Exception):
            self._fs.invalidate_cache(self._path)

    def _remove_temporary(self) -> None:
        """Delete the parts; the shard is whole either way, so a failure is only logged."""
        if not self._temporary:
            return
        try:
            # one request per object: a batch still bills (and a server may run) each delete
            self._stats.add(requests=len(self._temporary) - 1)
            self._run(self._fs._rm(list(self._temporary))).result(timeout=60)
        except Exception as exc:
            logger.warning("could not delete temporary parts of %s: %r", self._uri, exc)
        self._temporary.clear()

    def abort(self) -> None:
        for future, _ in self._pending:
            future.cancel()
        for future, _ in self._pending:
            with contextlib.suppress(BaseException):
                future.result(timeout=30)
        self._pending.clear()
        self._remove_temporary()
        with contextlib.suppress(Exception):
            self._fs.rm_file(self._path)
