"""The fsspec filesystems streamckpt creates itself, for a URL given without a filesystem.

Rules: one instance per protocol and options, shared by every store made from them, and kept
out of fsspec's instance cache (its settings are changed here, which must not reach other
users of fsspec in the process); the clients' own retry loops are switched off, so that one
policy, the store's (:func:`streamckpt.storage.retry.call_with_retries`), decides; a
filesystem a caller passes in is never changed.
"""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["owned_filesystem"]

_OWNED: dict[tuple[str, str], Any] = {}
_OWNED_LOCK = threading.Lock()


def owned_filesystem(protocol: str, storage_options: dict[str, Any]) -> Any:
    """A filesystem streamckpt made itself (cached per options), with client retries off."""
    import fsspec

    key = (protocol, repr(sorted(storage_options.items())))
    with _OWNED_LOCK:
        fs = _OWNED.get(key)
        if fs is None:
            options = dict(storage_options)
            if protocol in ("s3", "s3a"):
                config = dict(options.get("config_kwargs") or {})
                config.setdefault("retries", {"total_max_attempts": 1})
                config.setdefault("max_pool_connections", 64)
                # Over plain http (a local MinIO, moto, SeaweedFS) botocore signs every body with
                # SHA-256, on fsspec's one event-loop thread, where no other request moves
                # meanwhile: measured 0.5 s of CPU per GiB saved. The checksum header it sends
                # already guards the body (and over https botocore skips the hash anyway).
                s3_config = dict(config.get("s3") or {})
                s3_config.setdefault("payload_signing_enabled", False)
                config["s3"] = s3_config
                options["config_kwargs"] = config
            fs = fsspec.filesystem(protocol, skip_instance_cache=True, **options)
            _disable_client_retries(fs)
            _OWNED[key] = fs
    return fs


def _disable_client_retries(fs: Any) -> None:
    kind = type(fs).__name__
    if kind == "S3FileSystem":
        fs.retries = 1
    elif "GCSFileSystem" in kind:
        try:
            import gcsfs.retry

            wrapped = type(fs)._request.__wrapped__
            once = gcsfs.retry.retry_request(retries=1)(wrapped)
            fs._request = once.__get__(fs)
        except (ImportError, AttributeError):  # another gcsfs version: keep its retries
            pass
