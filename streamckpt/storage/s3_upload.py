"""S3 multipart uploads with several parts in flight (see :mod:`streamckpt.storage.parts`).

An object smaller than one part goes up as a single PUT, with no multipart round trips.

Every body goes up with its CRC-32C (S3's "additional checksums"), computed here in the writer
thread by the hardware instruction:

- a store that checks it (S3, SeaweedFS) refuses a body damaged on the way, and the part is
  sent again;
- botocore, given the value, computes no checksum of its own (it would, with zlib's slower
  CRC-32, on fsspec's event-loop thread, where no other request moves meanwhile);
- the store answers with the object's checksum (for a multipart upload, the CRC-32C of its
  parts' CRC-32Cs), which the commit compares with ours: a part lost or swapped by the store
  fails the upload instead of leaving a wrong shard behind. A store that answers none (moto's
  completion) is taken at its word, as for any store that reports no checksum.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
from collections.abc import Coroutine
from typing import Any

from streamckpt.errors import ChecksumError
from streamckpt.format.crc import crc32c
from streamckpt.storage.parts import PartsWriter, Request


def _b64(crc: int) -> str:
    return base64.b64encode(crc.to_bytes(4, "big")).decode()


class S3MultipartWriter(PartsWriter):
    _upload_id: str | None = None

    def _call(self, method: str, **kwargs: Any) -> Coroutine[Any, Any, Any]:
        bucket, key, _ = self._fs.split_path(self._path)
        call: Coroutine[Any, Any, Any] = self._fs._call_s3(method, Bucket=bucket, Key=key, **kwargs)
        return call

    def _checked(self, method: str, data: bytes, **kwargs: Any) -> tuple[Request, int]:
        crc = crc32c(data)
        checksum = {"ChecksumAlgorithm": "CRC32C", "ChecksumCRC32C": _b64(crc)}
        return functools.partial(self._call, method, Body=data, **kwargs, **checksum), crc

    def _begin_parts(self) -> None:
        self._done: dict[int, dict[str, Any]] = {}
        self._part_crcs: dict[int, int] = {}
        create = functools.partial(
            self._call, "create_multipart_upload", ChecksumAlgorithm="CRC32C"
        )
        # not retried on its own: a lost answer would leave an upload nobody aborts
        self._upload_id = self._request(create, retry=False)["UploadId"]

    def _part_request(self, number: int, data: bytes) -> Request:
        request, self._part_crcs[number] = self._checked(
            "upload_part", data, PartNumber=number, UploadId=self._upload_id
        )
        return request

    def _part_sent(self, number: int, answer: Any) -> None:
        self._done[number] = {
            "PartNumber": number,
            "ETag": answer["ETag"],
            "ChecksumCRC32C": _b64(self._part_crcs[number]),
        }

    def _whole_request(self, data: bytes) -> Request:
        request, self._whole_crc = self._checked("put_object", data)
        return request

    def _whole_sent(self, answer: Any) -> None:
        self._check(answer, _b64(self._whole_crc))

    def _join_parts(self) -> None:
        parts = [self._done[n] for n in sorted(self._done)]
        complete = functools.partial(
            self._call,
            "complete_multipart_upload",
            UploadId=self._upload_id,
            MultipartUpload={"Parts": parts},
        )
        # not retried on its own: after a lost answer the upload is gone and a retry fails
        answer = self._request(complete, retry=False)
        self._upload_id = None
        of_parts = b"".join(self._part_crcs[n].to_bytes(4, "big") for n in sorted(self._done))
        self._check(answer, _b64(crc32c(of_parts)))

    def _check(self, answer: Any, expected: str) -> None:
        reported = answer.get("ChecksumCRC32C") if isinstance(answer, dict) else None
        if isinstance(reported, str) and reported.split("-")[0] != expected:
            raise ChecksumError(
                f"store reports crc32c {reported} for the upload, we sent {expected}",
                uri=self._uri,
            )

    def _discard_parts(self) -> None:
        if self._upload_id is not None:
            abort = self._call("abort_multipart_upload", UploadId=self._upload_id)
            self._stats.add(requests=1)
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(abort, self._fs.loop).result(timeout=30)
            self._upload_id = None
