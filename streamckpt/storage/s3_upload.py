"""S3 multipart uploads with several parts in flight (see :mod:`streamckpt.storage.parts`).

An object smaller than one part goes up as a single PUT, with no multipart round trips.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Coroutine
from typing import Any

from streamckpt.storage.parts import PartsWriter


class S3MultipartWriter(PartsWriter):
    _upload_id: str | None = None

    def _call(self, method: str, **kwargs: Any) -> Coroutine[Any, Any, Any]:
        bucket, key, _ = self._fs.split_path(self._path)
        call: Coroutine[Any, Any, Any] = self._fs._call_s3(method, Bucket=bucket, Key=key, **kwargs)
        return call

    def _begin_parts(self) -> None:
        self._done: list[dict[str, Any]] = []
        # not retried on its own: a lost answer would leave an upload nobody aborts
        created = self._request(
            functools.partial(self._call, "create_multipart_upload"), retry=False
        )
        self._upload_id = created["UploadId"]

    def _part_request(self, number: int, data: bytes) -> Awaitable[Any]:
        return self._call("upload_part", PartNumber=number, UploadId=self._upload_id, Body=data)

    def _part_sent(self, number: int, answer: Any) -> None:
        self._done.append({"PartNumber": number, "ETag": answer["ETag"]})

    def _whole_request(self, data: bytes) -> Awaitable[Any]:
        return self._call("put_object", Body=data)

    def _join_parts(self) -> None:
        parts = {"Parts": sorted(self._done, key=lambda p: p["PartNumber"])}
        complete = functools.partial(
            self._call, "complete_multipart_upload", UploadId=self._upload_id, MultipartUpload=parts
        )
        # not retried on its own: after a lost answer the upload is gone and a retry fails
        self._request(complete, retry=False)
        self._upload_id = None

    def _discard_parts(self) -> None:
        if self._upload_id is not None:
            abort = self._call("abort_multipart_upload", UploadId=self._upload_id)
            self._stats.add(requests=1)
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(abort, self._fs.loop).result(timeout=30)
            self._upload_id = None
