"""The contract of :class:`streamckpt.storage.Store`, as one class of tests run against every store.

Subclass :class:`StoreTests` once per store (as zarr-python's ``StoreTests``) and give it the
``store_factory`` fixture: a callable that returns a *fresh* store (fresh statistics, as the
pipeline makes one per save or load) and a base path that is empty for this test. Every test
uses only the public Store methods, the way the pipeline calls them: writers from worker
threads, ``plan_writers`` before writers open, ``make_dirs`` before the first write into a
directory.

The rule this suite keeps: the contract is what ``Store``'s docstrings say, plus what the
pipeline relies on where they are silent (each such test says so in its docstring). Stores
should be made with a small byte budget (a few MiB) so that ranged reads and streamed writes
run their multi-part paths on objects of ``large_bytes``.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, ClassVar

import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest

from streamckpt.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    ChecksumError,
    TruncatedError,
)
from streamckpt.format.crc import crc32c
from streamckpt.storage.base import ByteRange, ShardWriter, Store

#: What a subclass's ``store_factory`` fixture returns: ``() -> (fresh store, base path)``.
StoreFactory = Callable[[], tuple[Store, str]]

MiB = 1 << 20


class StreamFailed(Exception):
    """Raised by a test's stream callback part-way through a write."""


def payload(nbytes: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(nbytes)


def chunked(data: bytes, sizes: Sequence[int]) -> list[bytes]:
    """``data`` cut into chunks of the given sizes, cycled (so never aligned to a part)."""
    chunks, start, i = [], 0, 0
    while start < len(data):
        chunks.append(data[start : start + sizes[i % len(sizes)]])
        start += sizes[i % len(sizes)]
        i += 1
    return chunks


class StoreTests:
    """Every promise of the Store protocol; subclasses provide ``store_factory``.

    A subclass names the cases its store is known to fail in ``known_failures`` (test function
    name -> the bug): they run as strict xfails, so a fix shows up as a failure to remove.
    """

    known_failures: ClassVar[Mapping[str, str]] = {}

    pytestmark: ClassVar[list[pytest.MarkDecorator]] = [
        pytest.mark.anyio,
        # gcsfs hands aiohttp bodies over 1 MiB as bytes, which it warns about
        pytest.mark.filterwarnings("ignore:Sending a large body directly:ResourceWarning:aiohttp"),
    ]

    #: An object that spans several upload parts and read parts of a small-budget store.
    large_bytes = 6 * MiB + 3

    @pytest.fixture
    def anyio_backend(self) -> str:
        return "asyncio"

    @pytest.fixture
    def store_factory(self) -> StoreFactory:
        raise NotImplementedError("a StoreTests subclass provides the store_factory fixture")

    @pytest.fixture
    def store_and_base(self, store_factory: StoreFactory) -> tuple[Store, str]:
        return store_factory()

    @pytest.fixture(autouse=True)
    def _known_failure(self, request: pytest.FixtureRequest) -> None:
        reason = self.known_failures.get(request.node.originalname)
        if reason is not None:
            request.applymarker(pytest.mark.xfail(strict=True, reason=reason))

    # -- helpers ----------------------------------------------------------------------------

    @staticmethod
    async def put(store: Store, path: str, data: bytes) -> None:
        await store.make_dirs(store.dirname(path))
        await store.write_atomic(path, data, exclusive=False)

    @staticmethod
    async def stream(
        store: Store, path: str, chunks: Sequence[bytes], *, fail_after: int | None = None
    ) -> int:
        """Stream ``chunks`` into ``path`` as a save does; what the writer counted.

        With ``fail_after`` the stream raises :class:`StreamFailed` after that many chunks.
        """
        await store.make_dirs(store.dirname(path))
        store.plan_writers([sum(map(len, chunks))])

        def write(writer: ShardWriter) -> int:
            for i, chunk in enumerate(chunks):
                if i == fail_after:
                    raise StreamFailed(path)
                writer.write(memoryview(chunk))
            return writer.bytes_written

        run = functools.partial(store.write_object, path, write, chunk_bytes=MiB)
        return await anyio.to_thread.run_sync(run)

    # -- paths --------------------------------------------------------------------------------

    async def test_join_dirname_uri(self, store_and_base: tuple[Store, str]) -> None:
        store, base = store_and_base
        nested = store.join(base, "run", "ckpt-1.index")
        assert store.dirname(nested) == store.join(base, "run")
        assert store.dirname(store.dirname(nested)) == base
        assert store.dirname(store.join(base, "x")) == base
        uris = {store.uri(store.join(base, name)) for name in ("a", "b", "a.index")}
        assert len(uris) == 3  # the index cache keys on it: distinct paths, distinct URIs
        assert store.uri(nested).replace("\\", "/").endswith("/run/ckpt-1.index")

    async def test_odd_names(self, store_and_base: tuple[Store, str]) -> None:
        """Checkpoint prefixes are the user's: spaces, ``+``, ``=``, ``%``, non-ASCII."""
        store, base = store_and_base
        directory = store.join(base, "run 1+x=2%20é")
        atomic, streamed = store.join(directory, "ck pt+é.index"), store.join(directory, "a=b%c")
        await self.put(store, atomic, b"index")
        await self.stream(store, streamed, [b"shard"])
        assert await store.read_all(atomic) == b"index"
        assert bytes(await store.read_range(streamed, 1, 4)) == b"har"
        assert set(await store.list_dir(directory)) == {atomic, streamed}
        await store.delete([atomic, streamed])
        assert not await store.exists(atomic) and not await store.exists(streamed)

    # -- whole objects --------------------------------------------------------------------

    async def test_read_all_size_exists(self, store_and_base: tuple[Store, str]) -> None:
        store, base = store_and_base
        path, data = store.join(base, "obj"), payload(3000)
        assert not await store.exists(path)
        await self.put(store, path, data)
        assert await store.exists(path)
        assert await store.size(path) == 3000
        assert await store.read_all(path) == data

    async def test_empty_object(self, store_and_base: tuple[Store, str]) -> None:
        store, base = store_and_base
        path = store.join(base, "empty")
        await self.put(store, path, b"")
        assert await store.exists(path)
        assert await store.size(path) == 0
        assert await store.read_all(path) == b""
        assert len(await store.read_range(path, 0, 0)) == 0

    async def test_read_suffix_of_empty_object(self, store_and_base: tuple[Store, str]) -> None:
        """All of it, i.e. nothing (an empty index then fails as too short for its footer)."""
        store, base = store_and_base
        path = store.join(base, "empty.index")
        await self.put(store, path, b"")
        tail, size = await store.read_suffix(path, 16)
        assert tail == b"" and size in (0, None)

    @pytest.mark.parametrize("name", ["missing", "dir/missing.index"])
    async def test_missing_object(self, store_and_base: tuple[Store, str], name: str) -> None:
        """Every read of a missing object: CheckpointNotFoundError (a FileNotFoundError).

        Its ``uri`` is the object's.
        """
        store, base = store_and_base
        path = store.join(base, name)
        assert not await store.exists(path)
        reads: list[Callable[[], Awaitable[Any]]] = [
            functools.partial(store.size, path),
            functools.partial(store.read_all, path),
            functools.partial(store.read_range, path, 0, 10),
            functools.partial(store.read_ranges, path, [ByteRange(0, 4), ByteRange(4, 8)]),
            functools.partial(store.read_suffix, path, 64),
        ]
        for read in reads:
            with pytest.raises(CheckpointNotFoundError) as caught:
                await read()
            assert isinstance(caught.value, FileNotFoundError)
            assert caught.value.uri == store.uri(path)

    async def test_prefix_of_an_object_is_not_an_object(
        self, store_and_base: tuple[Store, str]
    ) -> None:
        """``ckpt`` is not there because ``ckpt.index`` is (saves check ``exists(index)``)."""
        store, base = store_and_base
        await self.put(store, store.join(base, "ckpt.index"), b"x")
        assert not await store.exists(store.join(base, "ckpt"))
        assert not await store.exists(store.join(base, "ckpt.ind"))
        with pytest.raises(CheckpointNotFoundError):
            await store.size(store.join(base, "ckpt"))

    # -- ranges -----------------------------------------------------------------------------

    async def test_read_range(self, store_and_base: tuple[Store, str]) -> None:
        store, base = store_and_base
        path, data = store.join(base, "obj"), payload(5000, seed=1)
        await self.put(store, path, data)
        for start, end in [(0, 1), (0, 5000), (1234, 4321), (4990, 5000), (4999, 5000)]:
            got = await store.read_range(path, start, end)
            assert bytes(memoryview(got)) == data[start:end], (start, end)

    async def test_empty_ranges(self, store_and_base: tuple[Store, str]) -> None:
        """Zero bytes anywhere inside the object, its end included (an empty tensor's range)."""
        store, base = store_and_base
        path = store.join(base, "obj")
        await self.put(store, path, payload(100))
        for at in (0, 50, 100):
            assert len(await store.read_range(path, at, at)) == 0
        got = await store.read_ranges(path, [ByteRange(0, 0), ByteRange(3, 7), ByteRange(100, 100)])
        assert [bytes(b) for b in got] == [b"", payload(100)[3:7], b""]

    async def check_truncated(self, store: Store, base: str, start: int, end: int) -> None:
        """A range a 100-byte object is too short for: TruncatedError naming the URI.

        That is what an index that claims more than a shard holds must meet: never short data
        or another error.
        """
        path = store.join(base, "obj")
        await self.put(store, path, payload(100))
        reads: list[Callable[[], Awaitable[Any]]] = [
            functools.partial(store.read_range, path, start, end),
            functools.partial(store.read_ranges, path, [ByteRange(0, 10), ByteRange(start, end)]),
        ]
        for read in reads:
            with pytest.raises(TruncatedError) as caught:
                await read()
            assert caught.value.uri == store.uri(path)

    async def test_range_across_the_end(self, store_and_base: tuple[Store, str]) -> None:
        await self.check_truncated(*store_and_base, 95, 105)

    async def test_range_from_the_end(self, store_and_base: tuple[Store, str]) -> None:
        await self.check_truncated(*store_and_base, 100, 101)

    async def test_range_beyond_the_end(self, store_and_base: tuple[Store, str]) -> None:
        await self.check_truncated(*store_and_base, 150, 160)

    async def test_large_range(self, store_and_base: tuple[Store, str]) -> None:
        """A range larger than a read part comes back whole and in order."""
        store, base = store_and_base
        path, data = store.join(base, "big"), payload(5 * MiB, seed=2)
        await self.put(store, path, data)
        assert bytes(await store.read_range(path, 7, 5 * MiB - 9)) == data[7 : 5 * MiB - 9]
        assert store.budget.available == store.budget.total

    async def test_cancelled_read_gives_back_its_budget(
        self, store_and_base: tuple[Store, str]
    ) -> None:
        """A read cancelled in flight returns the bytes it took from ``budget``.

        Loads are cancelled (timeouts, a failed sibling read in the same task group); a
        budget that leaks stalls every later read of the store.
        """
        store, base = store_and_base
        path = store.join(base, "big")
        await self.put(store, path, payload(3 * MiB))
        finished = anyio.Event()

        async def read() -> None:
            await store.read_range(path, 0, 3 * MiB)
            finished.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            # cancelled while it holds budget (a store that takes none finishes instead); the
            # budget has no event to wait for, so each turn of the loop looks at it
            while store.budget.available == store.budget.total and not finished.is_set():
                await anyio.lowlevel.checkpoint()
            tg.cancel_scope.cancel()
        assert store.budget.available == store.budget.total
        assert bytes(await store.read_range(path, 5, 9)) == payload(3 * MiB)[5:9]

    async def test_many_ranges_at_once(self, store_and_base: tuple[Store, str]) -> None:
        """Results in the order asked, whatever the order, overlap or repetition of ranges."""
        store, base = store_and_base
        path, data = store.join(base, "obj"), payload(64 << 10, seed=3)
        await self.put(store, path, data)
        rng = random.Random(4)
        ranges = [ByteRange(a, a + rng.randrange(0, 3000)) for a in rng.sample(range(60000), 60)]
        ranges += [ranges[5], ByteRange(0, len(data)), ByteRange(len(data) - 1, len(data))]
        got = await store.read_ranges(path, ranges)
        assert [bytes(b) for b in got] == [data[r.start : r.end] for r in ranges]
        assert store.budget.available == store.budget.total

    async def test_read_suffix(self, store_and_base: tuple[Store, str]) -> None:
        """The size, when given, is the object's (the reader decodes the footer with it)."""
        store, base = store_and_base
        path, data = store.join(base, "obj.index"), payload(1000, seed=5)
        await self.put(store, path, data)
        for length in (1, 48, 999, 1000, 1001, 1 << 20):
            tail, size = await store.read_suffix(path, length)
            assert tail == data[-length:], length
            assert size in (None, 1000), length

    async def test_transfers_are_counted(self, store_and_base: tuple[Store, str]) -> None:
        """Ranged reads and streamed writes count their bytes in ``stats``.

        A save's and a load's statistics and progress callbacks are these counters.
        """
        store, base = store_and_base
        path = store.join(base, "obj")
        written = store.stats.bytes_written
        await self.stream(store, path, chunked(payload(70_000), [30_000]))
        assert store.stats.bytes_written - written == 70_000
        read = store.stats.bytes_read
        await store.read_range(path, 10, 110)
        await store.read_ranges(path, [ByteRange(0, 50), ByteRange(1000, 1300)])
        await store.read_suffix(path, 200)
        assert store.stats.bytes_read - read == 100 + 350 + 200

    # -- streamed writes --------------------------------------------------------------------

    @pytest.mark.parametrize("nbytes", [0, 1, 70_000, "large"])
    async def test_streamed_write(self, store_and_base: tuple[Store, str], nbytes: object) -> None:
        """What was streamed, byte for byte; the stream's result comes back."""
        store, base = store_and_base
        size = self.large_bytes if nbytes == "large" else int(str(nbytes))
        path, data = store.join(base, "shard.data-00000-of-00001"), payload(size, seed=6)
        await self.stream(store, path, chunked(data, [MiB + 17, 1, 4096, 3 * MiB]))
        await store.drain()
        assert await store.size(path) == size
        assert await store.read_all(path) == data
        assert await store.list_dir(base) == [path]  # no temporary parts left behind
        await store.verify_upload(path, size=size, crc32c=crc32c(data))

    async def test_writer_counts_bytes_written(self, store_and_base: tuple[Store, str]) -> None:
        """``ShardWriter.bytes_written``: the bytes handed to ``write`` so far."""
        store, base = store_and_base
        chunks = chunked(payload(2 * MiB + 5), [MiB // 3, 1])
        assert await self.stream(store, store.join(base, "obj"), chunks) == 2 * MiB + 5

    async def test_writer_does_not_keep_chunks(self, store_and_base: tuple[Store, str]) -> None:
        """``write`` is done with a chunk when it returns.

        A save writes small tensors from one bytearray that it then empties and refills: a
        view kept would make that resize fail, and a reference kept would upload new bytes.
        """
        store, base = store_and_base
        path, data = store.join(base, "shard"), payload(5 * MiB + 7, seed=9)
        await store.make_dirs(base)
        store.plan_writers([len(data)])

        def stream(writer: ShardWriter) -> None:
            pending = bytearray()
            for chunk in chunked(data, [700_000, 3, MiB]):
                pending += chunk
                writer.write(memoryview(pending))
                pending[:] = b"\xee" * 5  # overwritten and resized at once
                del pending[:]

        await anyio.to_thread.run_sync(store.write_object, path, stream)
        await store.drain()
        assert await store.read_all(path) == data

    async def test_streamed_write_replaces(self, store_and_base: tuple[Store, str]) -> None:
        """A shard rewritten in place (an overwrite where the store cannot rename)."""
        store, base = store_and_base
        path = store.join(base, "shard")
        await self.stream(store, path, [payload(5000, seed=1)])
        await self.stream(store, path, [payload(300, seed=2)])
        assert await store.read_all(path) == payload(300, seed=2)

    @pytest.mark.parametrize("large", [False, True], ids=["small", "large"])
    async def test_failed_stream_leaves_nothing(
        self, store_and_base: tuple[Store, str], large: bool
    ) -> None:
        """A stream that fails part-way: its error comes out, and no object (or part) stays."""
        store, base = store_and_base
        path = store.join(base, "shard")
        chunks = chunked(payload(self.large_bytes if large else 5000), [MiB])
        with pytest.raises(StreamFailed):
            await self.stream(store, path, chunks, fail_after=len(chunks) - 1)
        await store.drain()
        assert not await store.exists(path)
        assert await store.list_dir(base) == []

    @pytest.mark.parametrize("nbytes", [0, 5000, "large"])
    async def test_abort_leaves_nothing(
        self, store_and_base: tuple[Store, str], nbytes: object
    ) -> None:
        """``abort`` removes whatever was written and never raises."""
        store, base = store_and_base
        path = store.join(base, "shard")
        data = payload(self.large_bytes if nbytes == "large" else int(str(nbytes)))
        await store.make_dirs(base)

        def write_then_abort() -> None:
            writer = store.open_writer(path, chunk_bytes=MiB)
            for chunk in chunked(data, [MiB]):
                writer.write(memoryview(chunk))
            writer.abort()

        await anyio.to_thread.run_sync(write_then_abort)
        await store.drain()
        assert not await store.exists(path)
        assert await store.list_dir(base) == []

    async def test_flush_then_commit(self, store_and_base: tuple[Store, str]) -> None:
        """``flush`` sends what is buffered; the commit after it still makes the object."""
        store, base = store_and_base
        path, data = store.join(base, "shard"), payload(3 * MiB + 1, seed=7)
        await store.make_dirs(base)

        def write() -> bool:
            writer = store.open_writer(path, chunk_bytes=MiB)
            for chunk in chunked(data, [MiB]):
                writer.write(memoryview(chunk))
            flushed = writer.flush()
            writer.commit()
            return flushed

        assert isinstance(await anyio.to_thread.run_sync(write), bool)
        await store.drain()
        assert await store.read_all(path) == data

    async def test_concurrent_streamed_writes(self, store_and_base: tuple[Store, str]) -> None:
        """Several shards streamed at once, as a save does, each intact."""
        store, base = store_and_base
        sizes = [self.large_bytes, 1 << 20, 300, 0]
        paths = [store.join(base, f"ckpt.data-{i:05d}-of-00004") for i in range(4)]
        await store.make_dirs(base)
        assert store.plan_writers(sizes) >= 1

        async def one(i: int) -> None:
            def stream(writer: ShardWriter) -> None:
                for chunk in chunked(payload(sizes[i], seed=i), [MiB]):
                    writer.write(memoryview(chunk))

            await anyio.to_thread.run_sync(store.write_object, paths[i], stream)

        async with anyio.create_task_group() as tg:
            for i in range(4):
                tg.start_soon(one, i)
        await store.drain()
        for i, path in enumerate(paths):
            assert await store.read_all(path) == payload(sizes[i], seed=i)

    async def test_verify_upload(self, store_and_base: tuple[Store, str]) -> None:
        """Passes for what was streamed; where the store can tell, refuses a wrong size or crc."""
        store, base = store_and_base
        path, data = store.join(base, "shard"), payload(70_000, seed=8)
        await self.stream(store, path, [data])
        await store.verify_upload(path, size=len(data), crc32c=crc32c(data))
        await store.verify_upload(path, size=len(data), crc32c=None)
        if type(store).verify_upload is not Store.verify_upload:
            with pytest.raises(TruncatedError):
                await store.verify_upload(path, size=len(data) + 1, crc32c=None)
        if store.reports_crc32c:
            with pytest.raises(ChecksumError):
                await store.verify_upload(path, size=len(data), crc32c=crc32c(data) ^ 1)

    async def test_plan_writers(self, store_and_base: tuple[Store, str]) -> None:
        """At least one writer, whatever the sizes (it sizes a CapacityLimiter).

        Beside it, ``shard_bytes`` (the shard size an automatic save aims at) is None or
        positive.
        """
        store, _ = store_and_base
        assert store.shard_bytes is None or store.shard_bytes > 0
        for sizes in ([0], [1], [self.large_bytes] * 3, [1 << 40], [5] * 200):
            writers = store.plan_writers(sizes)
            assert isinstance(writers, int) and writers >= 1, sizes

    # -- the index: one write, atomic, create-only ------------------------------------------

    async def test_write_atomic_exclusive(self, store_and_base: tuple[Store, str]) -> None:
        store, base = store_and_base
        path = store.join(base, "ckpt.index")
        await store.make_dirs(base)
        await store.write_atomic(path, b"first", exclusive=True)
        with pytest.raises(CheckpointExistsError) as caught:
            await store.write_atomic(path, b"second", exclusive=True)
        assert isinstance(caught.value, FileExistsError)
        assert await store.read_all(path) == b"first"
        assert await store.list_dir(base) == [path]  # nothing of the refused write stays

    async def test_write_atomic_exclusive_onto_streamed(
        self, store_and_base: tuple[Store, str]
    ) -> None:
        store, base = store_and_base
        path = store.join(base, "ckpt.index")
        await self.stream(store, path, [b"streamed"])
        with pytest.raises(CheckpointExistsError):
            await store.write_atomic(path, b"index", exclusive=True)
        assert await store.read_all(path) == b"streamed"

    async def test_write_atomic_race(self, store_and_base: tuple[Store, str]) -> None:
        """Two create-only writes at once: exactly one wins, and its bytes are what stays."""
        store, base = store_and_base
        path = store.join(base, "ckpt.index")
        await store.make_dirs(base)
        outcome: dict[bytes, bool] = {}

        async def attempt(data: bytes) -> None:
            try:
                await store.write_atomic(path, data, exclusive=True)
                outcome[data] = True
            except CheckpointExistsError:
                outcome[data] = False

        async with anyio.create_task_group() as tg:
            for data in (payload(2000, seed=1), payload(2000, seed=2)):
                tg.start_soon(attempt, data)
        winners = [data for data, won in outcome.items() if won]
        assert len(winners) == 1
        assert await store.read_all(path) == winners[0]

    async def test_write_atomic_overwrite(self, store_and_base: tuple[Store, str]) -> None:
        store, base = store_and_base
        path = store.join(base, "checkpoint")
        await store.make_dirs(base)
        await store.write_atomic(path, payload(900), exclusive=False)
        await store.write_atomic(path, b"short", exclusive=False)
        assert await store.read_all(path) == b"short"
        assert await store.size(path) == 5
        assert await store.list_dir(base) == [path]  # no temporary file left beside it

    # -- delete, list -----------------------------------------------------------------------

    async def test_delete(self, store_and_base: tuple[Store, str]) -> None:
        """Missing objects are ignored; an empty list is fine."""
        store, base = store_and_base
        paths = [store.join(base, f"obj-{i}") for i in range(12)]
        for path in paths:
            await self.put(store, path, path.encode())
        await store.delete([paths[0], store.join(base, "never-there"), paths[1]])
        assert not await store.exists(paths[0]) and await store.exists(paths[2])
        with pytest.raises(CheckpointNotFoundError):
            await store.read_all(paths[1])
        await store.delete(paths)
        await store.delete(paths)
        await store.delete([])
        assert not set(paths) & set(await store.list_dir(base))

    async def test_list_dir_after_everything_deleted(
        self, store_and_base: tuple[Store, str]
    ) -> None:
        """A directory whose objects are all gone lists no entries (it holds no objects)."""
        store, base = store_and_base
        directory = store.join(base, "run")
        paths = [store.join(directory, name) for name in ("ckpt-1.index", "checkpoint")]
        for path in paths:
            await self.put(store, path, b"x")
        await store.delete(paths)
        assert await store.list_dir(directory) == []

    async def test_list_dir(self, store_and_base: tuple[Store, str]) -> None:
        """The objects directly inside, as paths the other methods take.

        (A save deletes the stale shards it lists.) Nothing from deeper down; empty for a
        missing directory.
        """
        store, base = store_and_base
        directory = store.join(base, "run")
        names = ["ckpt-1.index", "ckpt-1.data-00000-of-00001", "checkpoint"]
        for name in names:
            await self.put(store, store.join(directory, name), name.encode())
        await self.put(store, store.join(directory, "nested", "deep.index"), b"deep")
        await self.put(store, store.join(base, "run-other"), b"beside")
        listed = await store.list_dir(directory)
        objects = {store.join(directory, name) for name in names}
        assert objects <= set(listed)
        assert set(listed) - objects <= {store.join(directory, "nested")}
        for name in names:
            assert await store.read_all(store.join(directory, name)) == name.encode()
        assert await store.list_dir(store.join(base, "nothing")) == []
        assert await store.list_dir(store.join(directory, "ckpt-1")) == []

    # -- the rest of the protocol -----------------------------------------------------------

    async def test_version(self, store_and_base: tuple[Store, str]) -> None:
        """None for a missing object; if given, stable, and changed when the object is replaced.

        The index cache trusts it.
        """
        store, base = store_and_base
        path = store.join(base, "ckpt.index")
        assert await store.version(path) is None
        await self.put(store, path, payload(100, seed=1))
        first = await store.version(path)
        if first is None:
            return
        assert await store.version(path) == first
        await store.write_atomic(path, payload(100, seed=2), exclusive=False)
        assert await store.version(path) != first

    async def test_cache_key(self, store_factory: StoreFactory) -> None:
        """Fresh stores on one backend share a hashable key (each load makes its own store)."""
        first, _ = store_factory()
        second, _ = store_factory()
        assert first.cache_key == second.cache_key
        assert hash(first.cache_key) == hash(second.cache_key)

    async def test_rename(self, store_and_base: tuple[Store, str]) -> None:
        """Where ``supports_rename``: replaces the target and the source is gone."""
        store, base = store_and_base
        source, target = store.join(base, "shard.tmp-1"), store.join(base, "shard")
        await self.put(store, source, b"new")
        await self.put(store, target, b"old")
        if not store.supports_rename:
            with pytest.raises(NotImplementedError):
                await store.rename(source, target)
            return
        await store.rename(source, target)
        assert await store.read_all(target) == b"new"
        assert not await store.exists(source)

    async def test_make_dirs_and_sync_dir(self, store_and_base: tuple[Store, str]) -> None:
        """Both may be called again, and on directories that hold objects."""
        store, base = store_and_base
        directory = store.join(base, "a", "b")
        await store.make_dirs(directory)
        await store.make_dirs(directory)
        path = store.join(directory, "ckpt.index")
        await store.write_atomic(path, b"x", exclusive=True)
        await store.make_dirs(directory)
        await store.sync_dir(directory)
        assert await store.list_dir(directory) == [path]

    async def test_drain_without_writes(self, store_and_base: tuple[Store, str]) -> None:
        store, _ = store_and_base
        await store.drain()
        await store.drain()
        assert store.stats.failures == 0
