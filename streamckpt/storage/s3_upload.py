"""S3 multipart uploads with several parts in flight (see :mod:`streamckpt.storage.parts`).

An object smaller than one part goes up as a single PUT, with no multipart round trips.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
from typing import Any

from streamckpt.storage.parts import PartsWriter


class S3MultipartWriter(PartsWriter):
    _upload_id: str | None = None

    def _run(self, method: str, **kwargs: Any) -> concurrent.futures.Future[Any]:
        bucket, key, _ = self._fs.split_path(self._path)
        return self._submit(self._fs._call_s3(method, Bucket=bucket, Key=key, **kwargs))

    def _send_part(self, number: int, data: bytes) -> concurrent.futures.Future[Any]:
        if self._upload_id is None:
            self._done: list[dict[str, Any]] = []
            self._upload_id = self._run("create_multipart_upload").result()["UploadId"]
        return self._run("upload_part", PartNumber=number, UploadId=self._upload_id, Body=data)

    def _part_sent(self, number: int, answer: Any) -> None:
        self._done.append({"PartNumber": number, "ETag": answer["ETag"]})

    def _put_whole(self, data: bytes) -> None:
        self._run("put_object", Body=data).result()

    def _join_parts(self) -> None:
        parts = {"Parts": self._done}
        self._run(
            "complete_multipart_upload", UploadId=self._upload_id, MultipartUpload=parts
        ).result()
        self._upload_id = None

    def _discard_parts(self) -> None:
        if self._upload_id is not None:
            with contextlib.suppress(Exception):
                self._run("abort_multipart_upload", UploadId=self._upload_id).result(timeout=30)
            self._upload_id = None
