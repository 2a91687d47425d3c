"""The one error tree of streamckpt.

```
StreamCkptError
├── CheckpointNotFoundError      (also FileNotFoundError)  no index, or a shard missing
├── CheckpointExistsError        (also FileExistsError)    save onto a committed checkpoint
├── CorruptCheckpointError       (also ValueError)         bytes that break the format's rules
│   ├── ChecksumError                                      a block or tensor crc32c mismatch
│   └── TruncatedError                                     a file shorter than its index says
├── UnsupportedError             (also NotImplementedError) valid but not handled (dtype, version)
├── TensorNotFoundError          (also KeyError)           a name the checkpoint does not hold
│   └── NameMismatchError                                  tree names and stored names differ
│       └── ObjectMatchError     (also AssertionError)     a RestoreStatus assertion failed
├── NamingError                  (also ValueError)         a tree that cannot be named 1:1
│   └── ValueMismatchError                                 stored values that do not fit leaves
├── StorageError                 (also OSError)            the backend failed
│   ├── PermissionDeniedError    (also PermissionError)    HTTP 401/403, EACCES, EPERM
│   └── RetriesExhaustedError                              transient failures outlasted retries
├── SaveInProgressError          (also RuntimeError)       a second save while one runs
└── CoordinationError            (also RuntimeError)       processes of one save disagree or
                                                           a peer failed, died or timed out
```

Every message names what it can of: the URI, the tensor, the shard and the byte offset. The
context travels as attributes too, so a caller can act on it without parsing text.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterable, Iterator

__all__ = [
    "CheckpointExistsError",
    "CheckpointNotFoundError",
    "ChecksumError",
    "CoordinationError",
    "CorruptCheckpointError",
    "NameMismatchError",
    "NamingError",
    "ObjectMatchError",
    "PermissionDeniedError",
    "RetriesExhaustedError",
    "SaveInProgressError",
    "StorageError",
    "StreamCkptError",
    "TensorNotFoundError",
    "TruncatedError",
    "UnsupportedError",
    "ValueMismatchError",
]


class StreamCkptError(Exception):
    """Root of every error streamckpt raises on purpose.

    ``uri``, ``tensor``, ``shard`` and ``offset`` carry the context that is known where the
    error is raised; layers above fill in what they know (the format layer knows offsets, the
    pipeline knows URIs) through :meth:`with_context`.
    """

    def __init__(
        self,
        message: str,
        *,
        uri: str | None = None,
        tensor: str | None = None,
        shard: int | None = None,
        offset: int | None = None,
    ) -> None:
        self.message = message
        self.uri = uri
        self.tensor = tensor
        self.shard = shard
        self.offset = offset
        super().__init__(self._render())

    def _render(self) -> str:
        parts = [self.message]
        if self.uri is not None:
            parts.append(f"uri={self.uri}")
        if self.tensor is not None:
            parts.append(f"tensor={self.tensor!r}")
        if self.shard is not None:
            parts.append(f"shard={self.shard}")
        if self.offset is not None:
            parts.append(f"offset={self.offset}")
        return parts[0] if len(parts) == 1 else f"{parts[0]} ({', '.join(parts[1:])})"

    def __str__(self) -> str:
        return self._render()

    def with_context(
        self,
        *,
        uri: str | None = None,
        tensor: str | None = None,
        shard: int | None = None,
        offset: int | None = None,
    ) -> StreamCkptError:
        """Fill in context that was unknown where the error was raised; keeps what is set."""
        if self.uri is None:
            self.uri = uri
        if self.tensor is None:
            self.tensor = tensor
        if self.shard is None:
            self.shard = shard
        if self.offset is None:
            self.offset = offset
        self.args = (self._render(),)
        return self


class CheckpointNotFoundError(StreamCkptError, FileNotFoundError):
    """No checkpoint at the prefix (no ``.index``), or a data shard it names is missing."""


class CheckpointExistsError(StreamCkptError, FileExistsError):
    """A save targets a prefix that already holds a committed checkpoint."""


class CorruptCheckpointError(StreamCkptError, ValueError):
    """Bytes that break the format's rules: bad magic, bad varint, impossible sizes, ..."""


class ChecksumError(CorruptCheckpointError):
    """A stored crc32c (block trailer, tensor, string lengths) does not match the bytes."""


class TruncatedError(CorruptCheckpointError):
    """A file ends before the bytes its index points to."""


class UnsupportedError(StreamCkptError, NotImplementedError):
    """Well-formed input this version does not handle: a dtype, a format version, a feature."""


class TensorNotFoundError(StreamCkptError, KeyError):
    """The checkpoint holds no tensor of that name."""

    def __str__(self) -> str:  # KeyError would repr() the message; keep it readable
        return self._render()


class NameMismatchError(TensorNotFoundError):
    """The names a tree asks for and the names a flat mapping holds do not match.

    Strict loading reports every problem at once, so that fixing a renamed layer takes one
    round, not one per tensor. ``missing`` are checkpoint names the tree needs and the mapping
    lacks, ``unexpected`` are names the mapping holds and nothing in the tree asked for, and
    ``unmapped`` are model names that the name map has no entry for.
    """

    def __init__(
        self,
        message: str,
        *,
        missing: Iterable[str] = (),
        unexpected: Iterable[str] = (),
        unmapped: Iterable[str] = (),
    ) -> None:
        self.missing = tuple(missing)
        self.unexpected = tuple(unexpected)
        self.unmapped = tuple(unmapped)
        super().__init__(message)


class ObjectMatchError(NameMismatchError, AssertionError):
    """A restore status assertion failed.

    ``missing`` are the keys under which Python values would be saved and for which the
    checkpoint had nothing; ``unexpected`` are checkpoint keys no Python value took. It is an
    ``AssertionError`` because TensorFlow's assertions raise that, so code written against
    ``tf.train.Checkpoint`` keeps catching it.
    """


class NamingError(StreamCkptError, ValueError):
    """A tree and a set of names that cannot be matched up one to one.

    Raised for two leaves that end up with one name, and for a value whose shape or dtype
    cannot go into the leaf it is meant for.
    """


class ValueMismatchError(NamingError):
    """Restore found values that cannot go into their leaves; nothing was written.

    ``mismatched`` lists the checkpoint key of every such value (wrong shape, a dtype that does
    not cast safely, or a leaf that can be neither filled in place nor replaced).
    """

    def __init__(self, message: str, *, mismatched: Iterable[str], uri: str | None = None):
        self.mismatched = tuple(mismatched)
        super().__init__(message, uri=uri)


class StorageError(StreamCkptError, OSError):
    """The storage backend failed, after any retries.

    ``errno`` is the backend's own when it had one (``ENOSPC``, ``EROFS``, ...).
    """


class PermissionDeniedError(StorageError, PermissionError):
    """The backend refused access (HTTP 401/403, EACCES)."""


class RetriesExhaustedError(StorageError):
    """A request was retried until the policy gave up: no outer loop may start it over."""


class SaveInProgressError(StreamCkptError, RuntimeError):
    """A save was started while another one of the same object is still running."""


class CoordinationError(StreamCkptError, RuntimeError):
    """The processes of one distributed save or restore could not finish it together.

    A peer failed (its own error is in the message), was cancelled, died, or did not answer
    within the coordinator's timeout; or the processes disagree about the checkpoint (a tensor
    given with two dtypes, slices that do not tile their tensor). ``ranks`` names the
    processes at fault where that is known, empty where it is not.
    """

    def __init__(self, message: str, *, ranks: Iterable[int] = (), uri: str | None = None):
        self.ranks = tuple(sorted(set(ranks)))
        super().__init__(message, uri=uri)

    def __reduce__(self) -> tuple[object, ...]:  # picklable, to travel between processes
        return (_rebuild_coordination_error, (self.message, self.ranks, self.uri))


def _rebuild_coordination_error(
    message: str, ranks: tuple[int, ...], uri: str | None
) -> CoordinationError:
    return CoordinationError(message, ranks=ranks, uri=uri)


@contextlib.contextmanager
def unwrap_task_group() -> Iterator[None]:
    """Re-raise a task group's failure as the child's own error, not an ExceptionGroup.

    anyio wraps even a single child failure in an ExceptionGroup, which would slip past a
    caller's ``except CheckpointNotFoundError`` / ``except OSError``. The first of our errors
    wins, else the first ordinary exception; a group of cancellations only stays as it is.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        leaves: list[BaseException] = []
        pending: list[BaseException] = [group]
        while pending:
            item = pending.pop(0)
            if isinstance(item, BaseExceptionGroup):
                pending[:0] = item.exceptions
            else:
                leaves.append(item)
        primary: BaseException | None = next(
            (e for e in leaves if isinstance(e, StreamCkptError)), None
        )
        if primary is None:
            primary = next((e for e in leaves if isinstance(e, Exception)), None)
        if primary is None:
            raise
        raise primary from primary.__cause__  # keep its own chain; drop the group


def error_for(exc: Exception, uri: str, *, status: int | None = None) -> StreamCkptError:
    """The streamckpt error for an exception of the OS or a storage client.

    Pure, so that the blocking local reads and the stores translate alike; ``status`` is the
    HTTP status a client's exception carried, if any. The first ``errno`` in the exception's
    chain stays on the error (``ENOSPC`` and ``EROFS`` call for different actions).
    """
    code = _errno_of(exc)
    text = str(exc) if isinstance(exc, OSError) else repr(exc)
    error: StreamCkptError
    if isinstance(exc, FileNotFoundError) or code == errno.ENOENT or status == 404:
        error = CheckpointNotFoundError(f"not found: {text}", uri=uri)
    elif isinstance(exc, FileExistsError) or code == errno.EEXIST:
        error = CheckpointExistsError(f"already exists: {text}", uri=uri)
    elif (
        isinstance(exc, PermissionError)
        or code in (errno.EACCES, errno.EPERM)
        or status in (401, 403)
        or text.startswith("Forbidden")  # gcsfs raises a bare OSError("Forbidden: ...")
    ):
        error = PermissionDeniedError(f"permission denied: {text}", uri=uri)
    else:
        error = StorageError(f"storage error: {text}", uri=uri)
    if isinstance(error, OSError):
        error.errno = code
        if code is not None:
            error.strerror = os.strerror(code)
    return error


def _errno_of(exc: BaseException) -> int | None:
    """The first errno in the exception's chain (a client may wrap the OSError it got)."""
    current: BaseException | None = exc
    for _ in range(8):
        if current is None:
            return None
        if isinstance(current, OSError) and isinstance(current.errno, int):
            return current.errno
        current = current.__cause__ or current.__context__
    return None
