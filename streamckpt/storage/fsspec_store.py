"""Any fsspec filesystem: ``memory://``, ``gs://`` (gcsfs), ``s3://`` (s3fs), and the rest.

Calls go through fsspec's blocking API in worker threads. For async filesystems (gcsfs, s3fs)
fsspec runs the requests on its own event loop, so one blocking call such as ``cat_ranges``
still overlaps many requests; for the others a thread is what they need anyway. This keeps the
store free of any tie between a filesystem's HTTP session and the caller's event loop, which
matters for the sync face (its loop lives in a worker thread).

Every request goes through :func:`call_with_retries`: an adaptive concurrency limit, retries of
transient failures, and the counters reported in a save's or load's statistics. For the
filesystems streamckpt creates itself, the clients' own retry loops are switched off so that
one policy, ours, decides (s3fs over botocore would otherwise send a throttled PUT 25 times;
see :mod:`streamckpt.storage.owned`).
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import anyio.to_thread

from streamckpt.errors import (
    CheckpointExistsError,
    ChecksumError,
    StorageError,
    StreamCkptError,
    TruncatedError,
    unwrap_task_group,
)
from streamckpt.storage.base import (
    Buffer,
    ByteBudget,
    ByteRange,
    ShardWriter,
    Store,
    WriterSlot,
    check_length,
    map_errors,
    stream_into,
    wait_from_thread,
)
from streamckpt.storage.gcs_upload import GcsComposeWriter
from streamckpt.storage.parts import DEFAULT_PARTS_IN_FLIGHT, plan_uploads
from streamckpt.storage.retry import (
    AdaptiveLimiter,
    RetryPolicy,
    StoreStats,
    call_with_retries,
    classify,
    http_status,
    run_blocking_with_retries,
)
from streamckpt.storage.s3_upload import S3MultipartWriter

T = TypeVar("T")
logger = logging.getLogger(__name__)

# Upload part size for streamed shard writes: big enough for throughput, small enough that
# the buffers of several shards in flight stay modest (S3 needs at least 5 MiB per part).
DEFAULT_WRITE_BLOCK = 16 << 20
# Large reads are split into parts of this size, fetched in parallel.
DEFAULT_READ_PART = 16 << 20
DEFAULT_MAX_INFLIGHT_BYTES = 256 << 20
# Shard size a save aims at on S3 and GCS when the caller gives no shard count: four parts.
# The server joins each shard after its last part (an S3 complete, a GCS compose), work that
# grows with the object, and several shards are joined side by side. Through a 20 ms /
# 100 MB/s link (python -m benchmarks objectstore), 256 MiB as 4 shards saved at 4.4-5.8x a naive
# writer on all three test servers; as 1 shard at 2.9-5.9x (fake-gcs-server composes the
# whole object after the last part), and moto loaded one object at 4.2-5.2x, 4 at 12.4-15.4x.
AUTO_SHARD_BYTES = 64 << 20


def _is_precondition_failure(exc: BaseException) -> bool:
    current: BaseException | None = exc
    for _ in range(8):
        if current is None:
            return False
        if isinstance(current, FileExistsError):
            return True
        response = getattr(current, "response", None)
        if isinstance(response, dict):
            if response.get("Error", {}).get("Code") == "PreconditionFailed":
                return True
            if response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 412:
                return True
        if getattr(current, "code", None) == 412:
            return True
        current = current.__cause__ or current.__context__
    return False


class FsspecShardWriter(ShardWriter):
    """A streamed upload (multipart for S3, resumable for GCS) with bounded buffers."""

    def __init__(self, store: FsspecStore, path: str) -> None:
        self._fs = store.fs
        self._path = path
        self._uri = store.uri(path)
        self._stats = store.stats
        self.bytes_written = 0
        with map_errors(self._uri):
            self._file = self._fs.open(path, "wb", block_size=store.write_block_size)
        self._closed = False

    def write(self, chunk: memoryview) -> None:
        with map_errors(self._uri):
            self._file.write(chunk)
        self.bytes_written += len(chunk)
        self._stats.add(bytes_written=len(chunk))

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
                    # discard() may leave the file open (gcsfs before its upload started,
                    # s3fs always): its __del__ would then flush the buffer, i.e. upload it
                    self._file.closed = True
                else:
                    self._file.close()
            except Exception:
                pass
        with contextlib.suppress(Exception):
            self._fs.rm_file(self._path)


class FsspecStore(Store):
    def __init__(
        self,
        fs: Any,
        *,
        write_block_size: int = DEFAULT_WRITE_BLOCK,
        read_part_size: int = DEFAULT_READ_PART,
        retry_policy: RetryPolicy | None = None,
        limiter: AdaptiveLimiter | None = None,
        max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES,
    ) -> None:
        self.fs = fs
        # parts must fit the budget a few times over, and S3 needs at least 5 MiB per part
        smallest = 5 << 20 if type(fs).__name__ == "S3FileSystem" else 256 << 10
        self.write_block_size = max(smallest, min(write_block_size, max_inflight_bytes // 4))
        self.read_part_size = max(1 << 20, min(read_part_size, max_inflight_bytes // 4))
        self.retry_policy = retry_policy or RetryPolicy()
        self.limiter = limiter or AdaptiveLimiter()
        self.stats = StoreStats()
        self.budget = ByteBudget(max_inflight_bytes)
        self.reports_crc32c = "GCSFileSystem" in type(fs).__name__
        self._parts_in_flight = DEFAULT_PARTS_IN_FLIGHT  # until plan_writers shares the budget
        if self._parallel_parts:
            self.shard_bytes = AUTO_SHARD_BYTES
        # clean-up that commits left running on fsspec's loop (GCS's temporary parts), for drain
        self._background: list[concurrent.futures.Future[None]] = []

    @property
    def cache_key(self) -> object:
        return ("fsspec", id(self.fs))

    @property
    def _parallel_parts(self) -> bool:
        """Whether our own writer sends the parts of one object at once (S3, GCS)."""
        return type(self.fs).__name__ in ("S3FileSystem", "GCSFileSystem")

    def plan_writers(self, sizes: Sequence[int]) -> int:
        writers, self._parts_in_flight = plan_uploads(
            sizes,
            budget=self.budget.total,
            part_size=self.write_block_size,
            parallel_parts=self._parallel_parts,
        )
        return writers

    def _new_writer(self, path: str) -> ShardWriter:
        name = type(self.fs).__name__
        if name not in ("S3FileSystem", "GCSFileSystem"):
            return FsspecShardWriter(self, path)
        options: dict[str, Any] = {
            "part_size": self.write_block_size,
            "parts_in_flight": self._parts_in_flight,
            "limiter": self.limiter,
            "policy": self.retry_policy,
        }
        if name == "S3FileSystem":
            return S3MultipartWriter(self.fs, path, self.uri(path), self.stats, **options)
        return GcsComposeWriter(
            self.fs,
            path,
            self.uri(path),
            self.stats,
            in_background=self._background.append,
            **options,
        )

    def uri(self, path: str) -> str:
        return str(self.fs.unstrip_protocol(path))

    def join(self, *parts: str) -> str:
        return "/".join(p.rstrip("/") for p in parts[:-1]) + "/" + parts[-1]

    def dirname(self, path: str) -> str:
        return path.rsplit("/", 1)[0] if "/" in path else ""

    async def _call(
        self, path: str, fn: Callable[..., T], *args: Any, nbytes: int = 0, **kwargs: Any
    ) -> T:
        with map_errors(self.uri(path)):
            return await call_with_retries(
                functools.partial(fn, *args, **kwargs),
                policy=self.retry_policy,
                limiter=self.limiter,
                stats=self.stats,
                nbytes=nbytes,
            )

    async def size(self, path: str) -> int:
        info = await self._call(path, self._info, path)
        return int(info["size"])

    def _info(self, path: str) -> dict[str, Any]:
        self.fs.invalidate_cache(path)
        info: dict[str, Any] = self.fs.info(path)
        return info

    async def exists(self, path: str) -> bool:
        def work() -> bool:
            self.fs.invalidate_cache(path)
            return bool(self.fs.exists(path))

        return await self._call(path, work)

    async def read_range(self, path: str, start: int, end: int) -> Buffer:
        if end <= start:
            return b""  # s3fs would send an invalid Range header for an empty read
        if end - start > self.read_part_size:
            out = bytearray(end - start)
            await self.read_into(path, start, memoryview(out))
            return out
        taken = await self.budget.acquire(end - start)
        try:
            data = await self._read_part(path, start, end)
        finally:
            await self.budget.release(taken)
        check_length(data, end - start, uri=self.uri(path), offset=start)
        self.stats.add(bytes_read=len(data))
        return data

    async def _read_part(self, path: str, start: int, end: int) -> bytes:
        """One ranged GET; a range the object is too short for is a TruncatedError.

        Servers answer a range that starts at or past the end with 416, which would
        otherwise read as a backend failure, not as the short object it is.
        """
        try:
            data: bytes = await self._call(
                path, self.fs.cat_file, path, start=start, end=end, nbytes=end - start
            )
        except StorageError as exc:
            if http_status(exc) != 416:
                raise
            raise TruncatedError(
                f"wanted bytes {start} to {end}, the object ends before {start}",
                uri=self.uri(path),
                offset=start,
            ) from exc
        return data

    async def read_into(self, path: str, start: int, out: memoryview) -> None:
        """Fill ``out`` with parallel ranged parts: one buffer, no second copy of the whole."""
        import anyio

        part = self.read_part_size
        uri = self.uri(path)

        async def fetch(offset: int) -> None:
            length = min(part, len(out) - offset)
            taken = await self.budget.acquire(length)
            try:
                data = await self._read_part(path, start + offset, start + offset + length)
                check_length(data, length, uri=uri, offset=start + offset)
                out[offset : offset + length] = data
                del data
            finally:
                await self.budget.release(taken)
            self.stats.add(bytes_read=length)

        with unwrap_task_group():
            async with anyio.create_task_group() as tg:
                for offset in range(0, len(out), part):
                    tg.start_soon(fetch, offset)

    async def read_ranges(self, path: str, ranges: Sequence[ByteRange]) -> list[Buffer]:
        import anyio

        results: list[Buffer] = [b""] * len(ranges)

        async def fetch(i: int, r: ByteRange) -> None:
            results[i] = await self.read_range(path, r.start, r.end)

        with unwrap_task_group():
            async with anyio.create_task_group() as tg:
                for i, r in enumerate(ranges):
                    tg.start_soon(fetch, i, r)
        return results

    async def read_suffix(self, path: str, length: int) -> tuple[bytes, int | None]:
        try:
            data: bytes = await self._call(path, self.fs.cat_file, path, start=-length)
        except StorageError as exc:
            if http_status(exc) != 416:
                raise
            return b"", 0  # SeaweedFS answers a suffix of an empty object with 416
        self.stats.add(bytes_read=len(data))
        return data, (len(data) if len(data) < length else None)

    async def read_all(self, path: str) -> bytes:
        def work() -> bytes:
            data: bytes = self.fs.cat_file(path)
            return data

        data = await self._call(path, work)
        self.stats.add(bytes_read=len(data))
        return data

    async def write_atomic(self, path: str, data: bytes, *, exclusive: bool) -> None:
        uri = self.uri(path)

        def put() -> None:
            self.fs.pipe_file(path, data, mode="create" if exclusive else "overwrite")
            self.fs.invalidate_cache(path)

        try:
            await self._call(path, put)
        except StreamCkptError as exc:
            if not (exclusive and _is_precondition_failure(exc)):
                raise
            if await self._holds(path, data):
                # an earlier try landed but its answer was lost: the object is ours. That try
                # may be ours or the HTTP client's own (aiohttp re-sends a PUT unseen)
                return
            raise CheckpointExistsError(
                "a checkpoint index already exists (create-only write refused)", uri=uri
            ) from exc
        self.stats.add(bytes_written=len(data))

    async def _holds(self, path: str, data: bytes) -> bool:
        try:
            return await self.read_all(path) == data
        except StreamCkptError:
            return False

    def open_writer(self, path: str, *, chunk_bytes: int = 8 << 20) -> ShardWriter:
        return self._new_writer(path)

    def write_object(
        self,
        path: str,
        stream: Callable[[ShardWriter], T],
        *,
        chunk_bytes: int = 8 << 20,
        slot: WriterSlot | None = None,
    ) -> T:
        """Stream a whole object from a worker thread, restarting it on a transient failure.

        ``stream`` writes every chunk to the writer it gets; it is called again from the start
        after a failure, so it must be a pure function of data the caller still holds. Parts
        are sized by the store's block size, not by ``chunk_bytes``.
        """
        import anyio.from_thread

        def attempt() -> T:
            if self._parallel_parts:  # its requests take slots and signal the limit themselves
                return stream_into(self._new_writer(path), stream, slot)
            # The whole upload holds a slot of the adaptive limit, like any other request, so
            # that throttled uploads shrink the concurrency of everything else on this store.
            token = object()
            wait_from_thread(functools.partial(self.limiter.acquire_on_behalf_of, token))
            started = time.monotonic()
            self.stats.add(requests=1)
            try:
                writer = self._new_writer(path)
                result = stream_into(writer, stream, slot)
            except Exception as exc:
                if classify(exc) == "throttle":
                    anyio.from_thread.run_sync(self.limiter.on_throttle)
                raise
            finally:
                anyio.from_thread.run_sync(self.limiter.release_on_behalf_of, token)
            # Limits change on the event loop's thread only: raising one wakes waiting tasks,
            # and a wake-up sent from this thread would not reach the sleeping loop.
            anyio.from_thread.run_sync(
                self.limiter.on_success, time.monotonic() - started, writer.bytes_written
            )
            return result

        return run_blocking_with_retries(
            attempt,
            policy=self.retry_policy,
            stats=self.stats,
            should_stop=anyio.from_thread.check_cancelled,
        )

    async def verify_upload(self, path: str, *, size: int, crc32c: int | None) -> None:
        """Compare an uploaded object, as the store has it now, with what we streamed.

        Its size always; and the store's own crc32c where it reports one (GCS does; S3 only
        when asked for at upload time). One fresh metadata request, never an answer kept
        from the upload: a save runs this right before its commit, to catch a store that lost
        the object since (a server restarted).
        """
        info = await self._call(path, self._info, path)
        uri = self.uri(path)
        if int(info.get("size", -1)) != size:
            raise TruncatedError(
                f"uploaded object has {info.get('size')} bytes, {size} were written", uri=uri
            )
        reported = info.get("crc32c")
        if crc32c is not None and isinstance(reported, str):
            stored = int.from_bytes(base64.b64decode(reported), "big")
            if stored != crc32c:
                raise ChecksumError(
                    f"store reports crc32c {stored:#010x} for the upload, we sent {crc32c:#010x}",
                    uri=uri,
                )

    async def drain(self) -> None:
        while self._background:
            future = self._background.pop()
            try:
                await anyio.to_thread.run_sync(future.result)
            except Exception as exc:  # the deletes log their own failures
                logger.warning("background clean-up failed: %r", exc)

    async def delete(self, paths: Sequence[str]) -> None:
        import anyio

        async def remove(path: str) -> None:
            def work() -> None:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(path)
                self.fs.invalidate_cache(path)

            await self._call(path, work)

        with unwrap_task_group():
            async with anyio.create_task_group() as tg:
                for path in paths:
                    tg.start_soon(remove, path)

    async def reclaim(self, directory: str, name: str, *, committed: bool) -> None:
        """Also abort the S3 multipart uploads left open under the name's data files.

        An upload is left open when the answer to its creation was lost (its id unknown) or
        its abort failed (a frozen server); under the prefix's claim, any open upload of
        these names is a failed or crashed save's.
        """
        await super().reclaim(directory, name, committed=committed)
        if type(self.fs).__name__ == "S3FileSystem":
            shards = self.join(directory, f"{name}.data-") if directory else f"{name}.data-"
            await self._call(shards, self._abort_uploads, shards)

    def _abort_uploads(self, key_prefix: str) -> None:
        bucket, prefix, _ = self.fs.split_path(key_prefix)
        answer = self.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix)
        for upload in answer.get("Uploads", []):
            self.fs.call_s3(
                "abort_multipart_upload",
                Bucket=bucket,
                Key=upload["Key"],
                UploadId=upload["UploadId"],
            )

    async def list_dir(self, path: str) -> list[str]:
        own = path.rstrip("/")

        def work() -> list[str]:
            try:
                self.fs.invalidate_cache(path)
                listed = self.fs.ls(path, detail=False)
            except FileNotFoundError:
                return []
            # SeaweedFS keeps an emptied directory, and s3fs lists it as its own entry 'DIR/'
            return sorted(str(p) for p in listed if str(p).rstrip("/") != own)

        return list(await self._call(path, work))


__all__ = ["DEFAULT_READ_PART", "DEFAULT_WRITE_BLOCK", "FsspecStore", "classify"]
