"""The one storage interface the pipeline talks to, and the error boundary for backends.

A Store holds paths of one filesystem. Reads are async (they overlap); writing a shard is a
*sync* object used from a worker thread, because the save loop that feeds it (crc32c, copies)
is CPU work that belongs in a thread anyway: one thread hop per shard, not per chunk.

Every backend error is translated here (``map_errors``) into the streamckpt error tree, with the
URI of the object that failed.
"""

from __future__ import annotations

import abc
import contextlib
import copy
import mmap
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import anyio
import anyio.from_thread

from streamckpt.errors import (
    StreamCkptError,
    TruncatedError,
    error_for,
)
from streamckpt.fileio import fresh_buffer as fresh_buffer
from streamckpt.storage.claim import Claim, StoreClaim
from streamckpt.storage.retry import StoreStats, http_status

T = TypeVar("T")


#: What reads return: anything memoryview() accepts.
Buffer = bytes | bytearray | mmap.mmap | memoryview


@dataclass(frozen=True, slots=True)
class ByteRange:
    """``[start, end)`` of one object."""

    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


class ShardWriter(abc.ABC):
    """Streams one object from a worker thread: ``write`` chunks, then ``commit`` or ``abort``.

    ``commit`` makes the bytes durable (fsync, or the completed upload); ``abort`` removes
    whatever was written and never raises.
    """

    #: bytes handed to ``write`` so far
    bytes_written: int = 0

    @abc.abstractmethod
    def write(self, chunk: memoryview) -> None: ...

    def write_many(self, chunks: Sequence[memoryview]) -> None:
        """``write`` of each chunk in order; like ``write``, done with them when it returns.

        A save hands its small payloads over this way, many at once, so that a store gathers
        them as it writes best: the local store with one ``writev`` from the caller's memory,
        or into its O_DIRECT staging. This default joins them and writes one chunk.
        """
        if len(chunks) == 1:
            self.write(chunks[0])
        elif chunks:
            self.write(memoryview(b"".join(chunks)))

    def flush(self) -> bool:
        """Send what is buffered; ``True`` when the writer then holds no buffers at all.

        What ``commit`` has left to do after a ``True`` is the store's own work (an S3
        complete, a GCS compose), so the memory this writer was planned with is free for the
        next one meanwhile. Writers whose commit still sends buffered bytes answer ``False``.
        """
        return False

    @abc.abstractmethod
    def commit(self) -> None: ...

    @abc.abstractmethod
    def abort(self) -> None: ...


class WriterSlot(Protocol):
    """The caller's share of memory for one streaming writer, held while it buffers bytes.

    Both are called from the writer's thread, and may be called again: ``take`` before each
    attempt streams, ``give_back`` once an attempt's bytes are all sent (so a retry of a
    whole upload takes the slot back before it buffers again).
    """

    def take(self) -> None: ...

    def give_back(self) -> None: ...


#: How often a worker thread waiting on the event loop looks for a cancellation.
WAIT_POLL_S = 0.1


def wait_from_thread(acquire: Callable[[], Awaitable[object]]) -> None:
    """From a worker thread: wait on the event loop for ``acquire()`` (a slot, a token).

    Cancellation of the thread's caller ends the wait, within ``WAIT_POLL_S``. A plain
    ``anyio.from_thread.run`` can wait for ever there: a task it starts in a cancel scope whose
    cancellation was already delivered is never cancelled (anyio's checkpoint then spins in
    ``sleep(0)``), so a shard's thread waiting for its slot after another shard failed hung the
    save. Here each wait is bounded by a scope of its own, and the thread looks for the
    cancellation between waits.
    """

    async def bounded() -> bool:
        with anyio.move_on_after(WAIT_POLL_S):
            await acquire()
            return True
        return False

    while True:
        anyio.from_thread.check_cancelled()
        if anyio.from_thread.run(bounded):
            return


def stream_into(
    writer: ShardWriter, stream: Callable[[ShardWriter], T], slot: WriterSlot | None = None
) -> T:
    """``stream(writer)``, then commit; on any failure (cancellation too) abort, and re-raise.

    ``slot`` is held while the writer holds buffers, and given back before a commit that is
    left with the store's own work only (see ``ShardWriter.flush``).
    """
    try:
        if slot is not None:
            slot.take()
        result = stream(writer)
        if writer.flush() and slot is not None:
            slot.give_back()
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    return result


class Store(abc.ABC):
    """Async access to the objects of one filesystem, addressed by that filesystem's paths."""

    #: ``True`` where the store reports a crc32c of each object (worth computing ours).
    reports_crc32c: bool = False
    #: Requests, bytes, retries and throttles of this store: one store per save or load.
    stats: StoreStats
    #: Bytes that uploads and downloads may hold in flight at once.
    budget: ByteBudget

    def write_object(
        self,
        path: str,
        stream: Callable[[ShardWriter], T],
        *,
        chunk_bytes: int = 8 << 20,
        slot: WriterSlot | None = None,
    ) -> T:
        """Stream one object from a worker thread: ``stream(writer)``, then commit.

        ``chunk_bytes`` is the size of the chunks ``stream`` writes: a writer that stages
        bytes sizes its buffer from it. Stores with retries restart ``stream`` after a
        transient failure. ``slot`` is held while the writer buffers (see ``stream_into``).
        """
        return stream_into(self.open_writer(path, chunk_bytes=chunk_bytes), stream, slot)

    async def verify_upload(self, path: str, *, size: int, crc32c: int | None) -> None:  # noqa: B027
        """Check a committed object against what was streamed, where the store can tell."""

    async def drain(self) -> None:  # noqa: B027 - most stores leave nothing running
        """Wait for clean-up that commits left running (a save's last step; never raises).

        A commit may leave the deletes of temporary objects (GCS's parts) running in the
        background: the shard is complete, so the save goes on to its index meanwhile.
        """

    @property
    def cache_key(self) -> object:
        """Identifies the backend in the index cache (two stores may name the same path)."""
        return type(self).__name__

    async def version(self, path: str) -> object:
        """A version stamp of an object when the backend gives one for free, else None."""
        return None

    #: ``True`` where :meth:`rename` is cheap and atomic (local disk).
    supports_rename: bool = False
    #: The size of shard a save aims at when the caller gives no shard count
    #: (``pipeline.plan.auto_num_shards``); ``None``: one shard, where more objects gain nothing.
    shard_bytes: int | None = None
    #: Bytes between two wanted ranges of one file that are cheaper to read through than to
    #: ask for in a second request: a round trip's worth on an object store; none on local
    #: disk, where a request is a system call and a box read fetches only its own bytes.
    read_gap: int = 256 << 10

    async def rename(self, source: str, target: str) -> None:
        raise NotImplementedError("this store cannot rename")

    def plan_writers(self, sizes: Sequence[int]) -> int:
        """Objects of these sizes are about to be streamed: how many may stream at once.

        Called once per save, before any writer opens; a store whose writers buffer in memory
        shares its byte budget out among them here.
        """
        return max(1, min(len(sizes), 64))

    @abc.abstractmethod
    def uri(self, path: str) -> str:
        """A full URI for messages (``gs://bucket/x``, a local path)."""

    @abc.abstractmethod
    def join(self, *parts: str) -> str: ...

    @abc.abstractmethod
    def dirname(self, path: str) -> str: ...

    @abc.abstractmethod
    async def size(self, path: str) -> int: ...

    @abc.abstractmethod
    async def exists(self, path: str) -> bool: ...

    @abc.abstractmethod
    async def read_range(self, path: str, start: int, end: int) -> Buffer:
        """Exactly ``end - start`` bytes; a short object raises TruncatedError."""

    async def read_ranges(self, path: str, ranges: Sequence[ByteRange]) -> list[Buffer]:
        """Several ranges of one object; backends override to overlap the requests."""
        return [await self.read_range(path, r.start, r.end) for r in ranges]

    @abc.abstractmethod
    async def read_suffix(self, path: str, length: int) -> tuple[bytes, int | None]:
        """The last ``length`` bytes (all of them if the object is shorter).

        Also the object's size, when the backend knows it for free.
        """

    @abc.abstractmethod
    async def read_all(self, path: str) -> bytes: ...

    @abc.abstractmethod
    async def write_atomic(self, path: str, data: bytes, *, exclusive: bool) -> None:
        """Publish a whole object in one step.

        With ``exclusive``, refuse an existing one (CheckpointExistsError).
        """

    @abc.abstractmethod
    def open_writer(self, path: str, *, chunk_bytes: int = 8 << 20) -> ShardWriter:
        """Called from a worker thread; may block."""

    async def claim(self, path: str) -> Claim:
        """Take the claim at ``path`` that makes a save its prefix's one writer.

        Raises SaveInProgressError while another save holds it (see ``storage.claim``).
        """
        # Its requests are the claim's, not the save's: another statistics record, so that a
        # save's byte counts and progress report its checkpoint alone.
        unaccounted = copy.copy(self)
        unaccounted.stats = StoreStats()
        claim = StoreClaim(unaccounted, path)
        await claim.take()
        return claim

    async def reclaim(self, directory: str, name: str, *, committed: bool) -> None:
        """Remove what crashed saves of checkpoint ``name`` in ``directory`` left behind.

        Called by a save that holds the prefix's claim, so no other save is writing these:
        staged shards and temporary parts (``.tmp-``, ``.part-``), index temp files, and,
        where no index is ``committed``, every data file of the name (no index points to it).
        """
        shards = f"{name}.data-"
        temps = f".{name}.index.tmp-"
        garbage = []
        for path in await self.list_dir(directory or "."):
            base = path.replace("\\", "/").rsplit("/", 1)[-1]
            if base.startswith(temps) or (
                base.startswith(shards) and (not committed or ".tmp-" in base or ".part-" in base)
            ):
                garbage.append(path)
        if garbage:
            await self.delete(garbage)

    @abc.abstractmethod
    async def delete(self, paths: Sequence[str]) -> None:
        """Remove objects; missing ones are ignored."""

    @abc.abstractmethod
    async def list_dir(self, path: str) -> list[str]:
        """Paths of the objects directly inside ``path`` (empty when it does not exist)."""

    async def make_dirs(self, path: str) -> None:  # noqa: B027 - object stores need nothing
        """Create a directory where the backend has them."""

    async def sync_dir(self, path: str) -> None:  # noqa: B027 - object stores need nothing
        """Make a directory's entries durable where the backend has them."""


class ByteBudget:
    """A semaphore counted in bytes: holds transfers back while the budget is spent.

    A request larger than the whole budget waits for all of it, then runs alone.
    """

    def __init__(self, total: int) -> None:
        self.total = max(1, total)
        self.available = self.total
        self.peak_in_flight = 0
        self._condition = anyio.Condition()

    async def acquire(self, nbytes: int) -> int:
        """Wait until ``nbytes`` (capped at the total) are free; return what was taken."""
        taken = min(nbytes, self.total)
        async with self._condition:
            while self.available < taken:
                await self._condition.wait()
            self.available -= taken
            self.peak_in_flight = max(self.peak_in_flight, self.total - self.available)
        return taken

    async def release(self, taken: int) -> None:
        """Give ``taken`` bytes back; shielded, so a cancelled transfer still returns them.

        Called from ``finally`` blocks: unshielded, a cancelled task stopped at the lock's
        checkpoint and the bytes were lost for good, until every later transfer hung.
        """
        with anyio.CancelScope(shield=True):
            async with self._condition:
                self.available += taken
                self._condition.notify_all()


def check_length(
    data: bytes | bytearray | memoryview, expected: int, *, uri: str, offset: int
) -> None:
    if len(data) != expected:
        raise TruncatedError(
            f"wanted {expected} bytes, the object has only {len(data)} there",
            uri=uri,
            offset=offset,
        )


@contextlib.contextmanager
def map_errors(uri: str) -> Iterator[None]:
    """Translate backend exceptions into the streamckpt tree, naming the URI.

    Every ``Exception`` that reaches here leaves as a ``StreamCkptError``: a caller of
    streamckpt catches one tree, whatever client (os, gcsfs, botocore, aiohttp) failed under
    it. The backend's ``errno`` stays on the error (``ENOSPC`` and ``EROFS`` call for different
    actions), and the original exception is its ``__cause__``. Cancellation and other
    ``BaseException``s pass through untouched.
    """
    try:
        yield
    except StreamCkptError as exc:
        raise exc.with_context(uri=uri) from None
    except Exception as exc:
        raise translate_error(exc, uri) from exc


def translate_error(exc: Exception, uri: str) -> StreamCkptError:
    """The streamckpt error for one backend exception (see ``map_errors``)."""
    if isinstance(exc, StreamCkptError):
        return exc.with_context(uri=uri)
    return error_for(exc, uri, status=http_status(exc))
