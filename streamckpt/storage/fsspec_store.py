"""Any fsspec filesystem: ``memory://``, ``gs://`` (gcsfs), ``s3://`` (s3fs), and the rest.

Calls go through fsspec's blocking API in worker threads. For async filesystems (gcsfs, s3fs)
fsspec runs the requests on its own event loop, so one blocking call such as ``cat_ranges``
still overlaps many requests; for the others a thread is what they need anyway. This keeps the
store free of any tie between a filesystem's HTTP session and the caller's event loop, which
matters for the sync face (its loop lives in a worker thread).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import anyio.to_thread

from streamckpt.errors import CheckpointExistsError
from streamckpt.storage.base import ByteRange, ShardWriter, Store, check_length, map_errors

# Upload part size for streamed shard writes: big enough for throughput, small enough that
# the buffers of several shards in flight stay modest.
DEFAULT_WRITE_BLOCK = 16 << 20


class FsspecShardWriter(ShardWriter):
    def __init__(self, fs: Any, path: str, uri: str, block_size: int) -> None:
        self._fs = fs
        self._path = path
        self._uri = uri
        with map_errors(uri):
            self._file = fs.open(path, "wb", block_size=block_size)
        self._closed = False

    def write(self, chunk: memoryview) -> None:
        with map_errors(self._uri):
            self._file.write(chunk)

    def commit(self) -> None:
        with map_errors(self._uri):
            self._closed = True
            self._file.close()

    def abort(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                discard = getattr(self._file, "discard", None)
                if discard is not None:
                    discard()  # aborts a multipart / resumable upload in progress
                else:
                    self._file.close()
            except Exception:
                pass
        with contextlib.suppress(Exception):
            self._fs.rm_file(self._path)


class FsspecStore(Store):
    atomic_exclusive = False

    def __init__(self, fs: Any, *, write_block_size: int = DEFAULT_WRITE_BLOCK) -> None:
        self.fs = fs
        self._write_block_size = write_block_size

    def uri(self, path: str) -> str:
        return str(self.fs.unstrip_protocol(path))

    def join(self, *parts: str) -> str:
        return "/".join(p.rstrip("/") for p in parts[:-1]) + "/" + parts[-1]

    def dirname(self, path: str) -> str:
        return path.rsplit("/", 1)[0] if "/" in path else ""

    async def _call(self, uri: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        def work() -> Any:
            with map_errors(uri):
                return fn(*args, **kwargs)

        return await anyio.to_thread.run_sync(work)

    async def size(self, path: str) -> int:
        return int(await self._call(self.uri(path), self.fs.size, path))

    async def exists(self, path: str) -> bool:
        return bool(await self._call(self.uri(path), self.fs.exists, path))

    async def read_range(self, path: str, start: int, end: int) -> bytes:
        if end <= start:
            return b""  # s3fs would send an invalid Range header for an empty read
        uri = self.uri(path)
        data: bytes = await self._call(uri, self.fs.cat_file, path, start=start, end=end)
        check_length(data, end - start, uri=uri, offset=start)
        return data

    async def read_ranges(self, path: str, ranges: Sequence[ByteRange]) -> list[bytes | bytearray]:
        wanted = [r for r in ranges if r.length > 0]
        uri = self.uri(path)
        results: list[Any] = []
        if wanted:
            results = await self._call(
                uri,
                self.fs.cat_ranges,
                [path] * len(wanted),
                [r.start for r in wanted],
                [r.end for r in wanted],
                on_error="return",  # fsspec's default too: errors come back inside the list
            )
        found = iter(results)
        out: list[bytes | bytearray] = []
        for r in ranges:
            if r.length == 0:
                out.append(b"")
                continue
            item = next(found)
            if isinstance(item, BaseException):
                with map_errors(uri):
                    raise item
            check_length(item, r.length, uri=uri, offset=r.start)
            out.append(item)
        return out

    async def read_suffix(self, path: str, length: int) -> tuple[bytes, int | None]:
        data: bytes = await self._call(self.uri(path), self.fs.cat_file, path, start=-length)
        return data, (len(data) if len(data) < length else None)

    async def read_all(self, path: str) -> bytes:
        data: bytes = await self._call(self.uri(path), self.fs.cat_file, path)
        return data

    async def write_atomic(self, path: str, data: bytes, *, exclusive: bool) -> None:
        uri = self.uri(path)
        if exclusive and await self.exists(path):
            raise CheckpointExistsError("a checkpoint index already exists", uri=uri)
        await self._call(uri, self.fs.pipe_file, path, data)

    def open_writer(self, path: str) -> ShardWriter:
        return FsspecShardWriter(self.fs, path, self.uri(path), self._write_block_size)

    async def delete(self, paths: Sequence[str]) -> None:
        def work() -> None:
            for path in paths:
                try:
                    self.fs.rm_file(path)
                except FileNotFoundError:
                    pass
                except Exception as exc:
                    with map_errors(self.uri(path)):
                        raise exc

        await anyio.to_thread.run_sync(work)

    async def list_dir(self, path: str) -> list[str]:
        def work() -> list[str]:
            try:
                self.fs.invalidate_cache(path)
                return sorted(str(p) for p in self.fs.ls(path, detail=False))
            except FileNotFoundError:
                return []

        return list(await self._call(self.uri(path), work))
