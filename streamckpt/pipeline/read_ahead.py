"""Whole data files read into fresh memory by worker threads while the caller decodes the index.

Why: a local load of a checkpoint of many small tensors spends its first tenth of a second in
Python, decoding 20,000 entries and planning their reads, and only then asks the disk for a
byte (issue 15.2, workload B: 0.08 s of a 0.4 s cold restore). Every byte of every data file is
wanted when the whole checkpoint is, so the reads need not wait for the plan: they start
with the index's header, and the entries, once decoded, only say where each tensor lies in
bytes already arriving.

Rule: a file is read whole into one buffer of its size as ``fstat`` gives it, never a size an
index claims; :data:`THREADS` chunks at a time, in order, each one from the page cache if it
holds it and else with O_DIRECT (:class:`streamckpt.fileio.CachedOrDirect`). :meth:`FileAhead.upto`
waits for a prefix and hands out a view of it; it raises the first error of a chunk before
that prefix, named by path, shard and offset. Nothing here checks a byte: the caller checks
every tensor's crc32c before it returns it.
"""

from __future__ import annotations

import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import cast

from streamckpt.errors import CheckpointNotFoundError, StreamCkptError, TruncatedError, error_for
from streamckpt.fileio import ALIGN, CachedOrDirect, fresh_buffer

# One read call's bytes: large enough that 40 calls cover 300 MiB, so the threads seldom
# want the GIL back from the decoding caller; a multiple of ALIGN for O_DIRECT.
CHUNK = 8 << 20
# Reads in flight over all files (a disk reads several requests faster than one at a time).
THREADS = 4


class FileAhead:
    """One data file, being read whole into :attr:`buffer` (see the module's rule)."""

    def __init__(self, path: str, shard_id: int) -> None:
        self.path = path
        self.shard_id = shard_id
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            self.size = os.fstat(self._fd).st_size
            # rounded up to ALIGN: a direct read may fill any chunk, the last one too
            self._memory = fresh_buffer(-(-self.size // ALIGN) * ALIGN, populate=False)
        except BaseException:
            os.close(self._fd)
            raise
        # page-aligned memory (a mapping) takes direct reads; a small file's bytearray not
        self._aligned = isinstance(self._memory, mmap.mmap)
        self._view = memoryview(self._memory)
        self.buffer = self._view[: self.size]
        self._chunks = -(-self.size // CHUNK)
        self._done = [False] * self._chunks
        self._ready = 0  # bytes [0, _ready) are in
        self._error: BaseException | None = None
        self._error_at = 0  # the chunk of _error
        self._cancelled = False
        self._cond = threading.Condition()

    def jobs(self) -> list[int]:
        return list(range(self._chunks))

    def read_chunk(self, i: int) -> None:
        """Worker thread: chunk ``i`` into the buffer; its error kept for :meth:`upto`."""
        if self._cancelled:
            return
        start = i * CHUNK
        end = min(self.size, start + CHUNK)
        try:
            file = CachedOrDirect(self._fd, self.path)
            try:
                stop = min(len(self._view), start + CHUNK)  # ALIGN-rounded at the end
                got = file.read(start, self._view[start:stop], aligned=self._aligned)
            finally:
                file.close()
            if got < end - start:
                raise TruncatedError(
                    f"file ends after {start + got} bytes, {self.size} were there when the "
                    "load began",
                    offset=start + got,
                )
        except OSError as exc:
            self._fail(i, error_for(exc, self.path).with_context(shard=self.shard_id, offset=start))
            return
        except StreamCkptError as exc:
            self._fail(i, exc.with_context(uri=self.path, shard=self.shard_id))
            return
        except BaseException as exc:
            self._fail(i, exc)
            return
        with self._cond:
            self._done[i] = True
            j = self._ready // CHUNK if self._ready < self.size else self._chunks
            while j < self._chunks and self._done[j]:
                j += 1
            self._ready = min(self.size, j * CHUNK)
            self._cond.notify_all()

    def upto(self, end: int) -> memoryview:
        """The buffer, once bytes ``[0, end)`` are in (``end`` at most :attr:`size`)."""
        if self._ready < end:
            with self._cond:
                while self._ready < end and not self._failed_before(end):
                    self._cond.wait()
                if self._ready < end:
                    raise cast(BaseException, self._error)
        return self.buffer

    def _failed_before(self, end: int) -> bool:
        return self._error is not None and self._error_at * CHUNK < end

    def _fail(self, i: int, exc: BaseException) -> None:
        """Chunk ``i`` failed: a wait for bytes from it on raises ``exc`` (the first chunk's)."""
        with self._cond:
            if self._error is None or i < self._error_at:
                self._error, self._error_at = exc, i
            self._cond.notify_all()

    def cancel(self) -> None:
        self._cancelled = True

    def close(self) -> None:
        try:
            os.close(self._fd)
        except OSError as exc:
            raise error_for(exc, self.path).with_context(shard=self.shard_id) from exc


class ReadAhead:
    """Every data file of a checkpoint read whole, :data:`THREADS` chunks at a time.

    Use as a context manager: leaving it cancels the chunks not yet begun and waits for the
    ones under way, so no thread writes into a buffer after the caller has given up on it.
    """

    def __init__(self, paths: list[str]) -> None:
        self.files: list[FileAhead] = []
        try:
            for shard_id, path in enumerate(paths):
                self.files.append(FileAhead(path, shard_id))
        except FileNotFoundError as exc:
            self._close_files()
            missing = paths[len(self.files)]
            raise CheckpointNotFoundError(
                "data shard is missing", uri=missing, shard=len(self.files)
            ) from exc
        except OSError as exc:
            self._close_files()
            missing = paths[len(self.files)]
            raise error_for(exc, missing).with_context(shard=len(self.files)) from exc
        except BaseException:
            self._close_files()
            raise
        self._pool = ThreadPoolExecutor(THREADS, thread_name_prefix="streamckpt-ahead")
        for f in self.files:
            for i in f.jobs():
                self._pool.submit(f.read_chunk, i)

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        for f in self.files:
            f.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)
        failed = self._close_files()
        if failed is not None and exc_type is None:  # else the error at hand is the one to tell
            raise failed

    def _close_files(self) -> StreamCkptError | None:
        """Close every file, even after one failed to; the first failure."""
        failed = None
        for f in self.files:
            try:
                f.close()
            except StreamCkptError as exc:
                failed = failed or exc
        return failed
