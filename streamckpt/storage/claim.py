"""One writer per checkpoint prefix: the claim a save takes before it writes any shard.

Why a claim, and not shards staged under unique names that only the winner publishes: the
format fixes a checkpoint's file names (``PREFIX.data-NNNNN-of-NNNNN``), so every save of a
prefix ends under the same names. Publishing a staged object on S3 or GCS is a copy (seconds
per GiB), and two publishers could still interleave their copies into a mix. A claim makes
the second save fail fast, before it writes a byte, so it never touches the first one's files;
it costs one small create-only request.

The rules this module keeps:

- A claim is the object ``PREFIX.claim``, created create-only. A save that finds it held fails
  with ``SaveInProgressError`` naming the holder; ``overwrite=True`` does not break a live claim
  (two overwriting saves would then mix their shards).
- Local disk: the claim file is also locked (``flock``), and the lock *is* the claim; the kernel
  drops it when its process dies, so a crashed save never blocks the prefix, and the file it
  leaves is simply locked by the next save.
- Object stores: the holder renews its claim every ``lease_s / 4`` while it saves. A claim not
  renewed for ``lease_s`` (``CLAIM_LEASE_S``, two minutes) is a crashed save's: the next save
  deletes it and claims again. Clocks of different hosts must agree to well within the lease.
- Before it commits, a save confirms the claim is still its own, and a save that lost its claim
  deletes nothing (the files under those names are the new holder's). The one gap left: a
  holder frozen for longer than the lease (SIGSTOP, a paused VM) may write after a new holder
  took over; a lease cannot close that on stores without conditional deletes.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import time
from typing import TYPE_CHECKING, Any

import anyio

from streamckpt.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    SaveInProgressError,
    StreamCkptError,
)

if TYPE_CHECKING:
    from streamckpt.storage.base import Store

logger = logging.getLogger(__name__)

#: How long an object-store claim stays valid without a renewal.
CLAIM_LEASE_S = 120.0


def claim_filename(prefix: str) -> str:
    """The claim of a checkpoint prefix: beside its files, and never one of them."""
    return f"{prefix}.claim"


def claim_record(token: str, *, lease_s: float) -> bytes:
    """What a claim holds: who took it (for messages) and until when it is valid."""
    now = time.time()
    record = {
        "token": token,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "renewed_at": now,
        "lease_s": lease_s,
    }
    return json.dumps(record, sort_keys=True).encode()


def parse_claim(data: bytes) -> dict[str, Any]:
    """A claim's record; an unreadable one counts as expired (it cannot be renewed either)."""
    try:
        record = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def describe_holder(record: dict[str, Any]) -> str:
    age = time.time() - float(record.get("renewed_at", 0.0))
    return (
        f"held by pid {record.get('pid')} on {record.get('host')!r}, "
        f"renewed {max(0.0, age):.0f} s ago"
    )


class Claim:
    """A held claim: renew it while saving, confirm it before the commit, release it after.

    ``lost`` turns true once the save knows another save holds the prefix now; from then on
    the save must delete nothing under the prefix.
    """

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.lost = False

    async def keep_alive(self) -> None:
        """Runs beside the save, until cancelled; raises SaveInProgressError if taken over."""
        await anyio.sleep_forever()

    async def confirm(self) -> None:
        """Raise SaveInProgressError unless the claim is still this save's."""

    async def release(self) -> None:
        """Give the claim up; never raises (a claim left behind expires or is re-locked)."""


class StoreClaim(Claim):
    """A claim on a store without locks: a create-only object with a renewed lease."""

    def __init__(self, store: Store, path: str, *, lease_s: float = CLAIM_LEASE_S) -> None:
        super().__init__(store.uri(path))
        self._store = store
        self._path = path
        self._lease_s = lease_s
        self._token = secrets.token_hex(16)

    async def take(self) -> None:
        """Create the claim; break an expired one; SaveInProgressError if it is held."""
        record = claim_record(self._token, lease_s=self._lease_s)
        for _ in range(3):
            try:
                await self._store.write_atomic(self._path, record, exclusive=True)
                return
            except CheckpointExistsError:
                pass
            try:
                held = parse_claim(await self._store.read_all(self._path))
            except CheckpointNotFoundError:
                continue  # released meanwhile: try again
            renewed_at = float(held.get("renewed_at", 0.0))
            lease_s = float(held.get("lease_s", self._lease_s))
            if time.time() < renewed_at + lease_s:
                raise SaveInProgressError(
                    f"another save of this prefix is running ({describe_holder(held)})",
                    uri=self.uri,
                )
            logger.warning(
                "breaking the expired claim of a crashed save (%s): %s",
                describe_holder(held),
                self.uri,
            )
            await self._store.delete([self._path])
        raise SaveInProgressError("other saves keep taking this prefix's claim", uri=self.uri)

    async def _holder(self) -> dict[str, Any]:
        try:
            return parse_claim(await self._store.read_all(self._path))
        except CheckpointNotFoundError:
            return {}

    async def confirm(self) -> None:
        held = await self._holder()
        if held.get("token") != self._token:
            self.lost = True
            what = describe_holder(held) if held else "it is gone"
            raise SaveInProgressError(
                f"this save's claim on the prefix was taken over ({what}): it stops, and "
                "deletes nothing (the names under the prefix are the new holder's)",
                uri=self.uri,
            )

    async def keep_alive(self) -> None:
        while True:
            await anyio.sleep(self._lease_s / 4)
            await self.confirm()
            record = claim_record(self._token, lease_s=self._lease_s)
            await self._store.write_atomic(self._path, record, exclusive=False)

    async def release(self) -> None:
        with anyio.CancelScope(shield=True):
            try:
                if (await self._holder()).get("token") == self._token:
                    await self._store.delete([self._path])
            except StreamCkptError as exc:
                logger.warning("could not release the claim %s (it expires): %s", self.uri, exc)
