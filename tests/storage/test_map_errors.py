"""``map_errors``: every backend exception that reaches it leaves as a StreamCkptError.

Fed the exceptions the real clients raise (built as they build them, no server needed):
gcsfs's HttpError, botocore's ClientError and EndpointConnectionError, aiohttp's errors, the
OSErrors of local disk, and a plain RuntimeError. 401/403 become PermissionDeniedError, 404
CheckpointNotFoundError, the rest StorageError; the errno is kept; the original is the cause;
cancellation passes through untouched.
"""

from __future__ import annotations

import asyncio
import errno

import aiohttp
import botocore.exceptions
import gcsfs.retry
import pytest

from streamckpt.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    PermissionDeniedError,
    StorageError,
    StreamCkptError,
    TruncatedError,
)
from streamckpt.storage.base import map_errors

URI = "gs://bucket/ckpt.data-00000-of-00001"


def client_error(status: int, code: str) -> botocore.exceptions.ClientError:
    response = {
        "Error": {"Code": code, "Message": code},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return botocore.exceptions.ClientError(response, "PutObject")  # type: ignore[arg-type]


def response_error(status: int) -> aiohttp.ClientResponseError:
    return aiohttp.ClientResponseError(None, (), status=status, message="refused")  # type: ignore[arg-type]


def chained(outer: Exception, inner: Exception) -> Exception:
    try:
        try:
            raise inner
        except Exception as exc:
            raise outer from exc
    except Exception as exc:
        return exc


CASES: list[tuple[str, Exception, type[StreamCkptError], int | None]] = [
    (
        "gcs 403",
        gcsfs.retry.HttpError({"code": 403, "message": "Forbidden"}),
        PermissionDeniedError,
        None,
    ),
    (
        "gcs 401",
        gcsfs.retry.HttpError({"code": 401, "message": "Unauthorized"}),
        PermissionDeniedError,
        None,
    ),
    (
        "gcs 404",
        gcsfs.retry.HttpError({"code": 404, "message": "No such object"}),
        CheckpointNotFoundError,
        None,
    ),
    ("gcs 400", gcsfs.retry.HttpError({"code": 400, "message": "Bad request"}), StorageError, None),
    (
        "gcs 503, retries spent",
        gcsfs.retry.HttpError({"code": 503, "message": "Busy"}),
        StorageError,
        None,
    ),
    ("s3 403", client_error(403, "AccessDenied"), PermissionDeniedError, None),
    ("s3 500", client_error(500, "InternalError"), StorageError, None),
    ("s3 400", client_error(400, "InvalidArgument"), StorageError, None),
    (
        "s3 unreachable",
        botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
        StorageError,
        None,
    ),
    ("aiohttp payload", aiohttp.ClientPayloadError("body cut short"), StorageError, None),
    ("aiohttp 401", response_error(401), PermissionDeniedError, None),
    ("aiohttp 500", response_error(500), StorageError, None),
    ("a plain RuntimeError", RuntimeError("the client broke"), StorageError, None),
    ("a ValueError", ValueError("odd answer"), StorageError, None),
    ("ENOSPC", OSError(errno.ENOSPC, "No space left on device"), StorageError, errno.ENOSPC),
    ("EROFS", OSError(errno.EROFS, "Read-only file system"), StorageError, errno.EROFS),
    ("EDQUOT", OSError(errno.EDQUOT, "Disk quota exceeded"), StorageError, errno.EDQUOT),
    ("EIO", OSError(errno.EIO, "Input/output error"), StorageError, errno.EIO),
    ("EACCES", OSError(errno.EACCES, "Permission denied"), PermissionDeniedError, errno.EACCES),
    ("ENOENT", OSError(errno.ENOENT, "No such file"), CheckpointNotFoundError, errno.ENOENT),
    ("EEXIST", OSError(errno.EEXIST, "File exists"), CheckpointExistsError, errno.EEXIST),
    ("gcsfs Forbidden", OSError("Forbidden: bucket"), PermissionDeniedError, None),
    (
        "s3fs OSError over a ClientError",
        chained(OSError(errno.EIO, "upload failed"), client_error(500, "InternalError")),
        StorageError,
        errno.EIO,
    ),
    (
        "RuntimeError over an ENOSPC",
        chained(RuntimeError("wrapped"), OSError(errno.ENOSPC, "full")),
        StorageError,
        errno.ENOSPC,
    ),
]


@pytest.mark.parametrize(("name", "raised", "expected", "code"), CASES, ids=[c[0] for c in CASES])
def test_every_backend_exception_is_mapped(
    name: str, raised: Exception, expected: type[StreamCkptError], code: int | None
) -> None:
    with pytest.raises(StreamCkptError) as caught, map_errors(URI):
        raise raised
    error = caught.value
    assert type(error) is expected, (name, error)
    assert error.uri == URI
    assert error.__cause__ is raised
    assert isinstance(error, OSError)
    assert error.errno == code


def test_our_own_errors_keep_their_class_and_gain_the_uri() -> None:
    with pytest.raises(TruncatedError) as caught, map_errors(URI):
        raise TruncatedError("short", offset=12)
    assert caught.value.uri == URI and caught.value.offset == 12


@pytest.mark.parametrize("cancel", [asyncio.CancelledError, KeyboardInterrupt])
def test_cancellation_passes_through(cancel: type[BaseException]) -> None:
    with pytest.raises(cancel), map_errors(URI):
        raise cancel()
