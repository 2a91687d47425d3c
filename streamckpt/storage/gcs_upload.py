"""GCS uploads as parts sent at once and composed into one object.

gcsfs's file object sends a resumable upload one chunk after another, so a shard uses one
connection at a time (and each chunk is a round trip). Here each full part goes up as a
temporary object of its own, by a media upload (one request), several at once as coroutines
on gcsfs's event loop; the commit composes the parts into the shard and deletes them. GCS
composes at most 32 sources per request, so larger shards compose in levels. The composed
object's crc32c is GCS's own combination of its parts', which ``verify_upload`` then compares
with the crc32c we computed while streaming, as for any upload: the compose answers with the
object's metadata, so that check costs no request of its own. An object smaller than one part
is a single media upload, with no temporary objects at all.

Temporary parts are named ``<shard>.part-<token>.<n>``: never taken for a checkpoint file.
After the compose they are deleted in the background (the shard is complete; the save goes on
to its index meanwhile and waits for the deletes before it returns, see ``Store.drain``); an
abort deletes them before it returns. A killed process leaves them behind, as it leaves an
unfinished S3 multipart upload.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import secrets
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from streamckpt.storage.parts import PartsWriter, Request

logger = logging.getLogger(__name__)

#: GCS's limit on the sources of one compose request.
MAX_COMPOSE_SOURCES = 32
#: Deletes of temporary parts in flight at once, after a compose.
BACKGROUND_DELETES = 8


class GcsComposeWriter(PartsWriter):
    def __init__(
        self,
        *args: Any,
        in_background: Callable[[concurrent.futures.Future[None]], None],
        **kwargs: Any,
    ) -> None:
        """``in_background`` takes the deletes a commit leaves running (``Store.drain``)."""
        super().__init__(*args, **kwargs)
        self._token = secrets.token_hex(6)
        self._composed: list[str] = []  # inner composes of a two-level tree
        self._discarded = False
        self._in_background = in_background
        #: GCS's metadata of the finished object (``size``, ``crc32c``), as its last request
        #: answered it
        self.landed: dict[str, Any] | None = None

    def _name(self, label: str) -> str:
        return f"{self._path}.part-{self._token}.{label}"

    def _part_name(self, number: int) -> str:
        return self._name(f"{number:05d}")

    async def _upload(self, path: str, data: bytes) -> dict[str, Any]:
        """One media upload: the object's name is in the URL, and the body is our bytes.

        (gcsfs's simple upload wraps the bytes in a multipart body, a copy of each part.)
        """
        bucket, key, _ = self._fs.split_path(path)
        answer: dict[str, Any] = await self._fs._call(
            "POST",
            f"{self._fs._location}/upload/storage/v1/b/{quote(bucket, safe='')}/o",
            uploadType="media",
            name=key,
            data=data,
            headers={"Content-Type": "application/octet-stream"},
            json_out=True,
        )
        return answer

    async def _compose(self, path: str, sources: list[str]) -> dict[str, Any]:
        """One compose request; its answer is the new object's metadata."""
        bucket, key, _ = self._fs.split_path(path)
        answer: dict[str, Any] = await self._fs._call(
            "POST",
            "b/{}/o/{}/compose",
            bucket,
            key,
            json={
                "sourceObjects": [{"name": self._fs.split_path(p)[1]} for p in sources],
                "kind": "storage#composeRequest",
                "destination": {"name": key, "bucket": bucket},
            },
            headers={"Content-Type": "application/json"},
            json_out=True,
        )
        return answer

    def _part_request(self, number: int, data: bytes) -> Request:
        return functools.partial(self._upload, self._part_name(number), data)

    def _whole_request(self, data: bytes) -> Request:
        return functools.partial(self._upload, self._path, data)

    def _whole_sent(self, answer: Any) -> None:
        self.landed = answer

    def _join_parts(self) -> None:
        """Compose the parts (a compose is safe to repeat while its sources exist)."""
        sources, level = [self._part_name(n) for n in range(1, self._parts_sent + 1)], 0
        while len(sources) > MAX_COMPOSE_SOURCES:
            level += 1
            groups = [
                sources[i : i + MAX_COMPOSE_SOURCES]
                for i in range(0, len(sources), MAX_COMPOSE_SOURCES)
            ]
            names = [self._name(f"c{level}-{i:05d}") for i in range(len(groups))]
            self._composed += names
            self._requests(
                [functools.partial(self._compose, n, g) for n, g in zip(names, groups, strict=True)]
            )
            sources = names
        self.landed = self._request(functools.partial(self._compose, self._path, sources))
        self._discarded = True  # from here on the deletes below own the temporary objects
        self._in_background(
            asyncio.run_coroutine_threadsafe(self._delete_all(self._temporary()), self._fs.loop)
        )

    def _temporary(self) -> list[str]:
        return [self._part_name(n) for n in range(1, self._parts_sent + 1)] + self._composed

    def _discard_parts(self) -> None:
        """An abort's clean-up: delete the temporary objects; only logged if it fails."""
        temporary = self._temporary()
        if not temporary or self._discarded:
            return
        try:
            # one request per object (an abort's requests take no slots of the limit)
            self._requests([functools.partial(self._delete, name) for name in temporary])
        except Exception as exc:
            logger.warning("could not delete temporary parts of %s: %r", self._uri, exc)
        self._discarded = True

    async def _delete_all(self, paths: list[str]) -> None:
        """The deletes after a compose, on fsspec's loop: the save waits for them last.

        They take no slots of the store's limit (the save's own requests go on meanwhile, and
        an abort's clean-up takes none either) but are at most ``BACKGROUND_DELETES`` at once,
        each retried under the store's policy; a failure is only logged, as above.
        """
        at_once = asyncio.Semaphore(BACKGROUND_DELETES)

        async def delete(path: str) -> None:
            async with at_once:
                self._stats.add(requests=1)
                await self._attempts(functools.partial(self._delete, path), True)

        answers = await asyncio.gather(*(delete(p) for p in paths), return_exceptions=True)
        if failed := [a for a in answers if isinstance(a, BaseException)]:
            logger.warning("could not delete temporary parts of %s: %r", self._uri, failed[0])

    async def _delete(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):  # a part an abort stopped short
            await self._fs._rm_file(path)
