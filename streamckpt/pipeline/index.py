"""What a reader knows of one index (:class:`IndexState`), and a bounded LRU of them.

The cache lets a service's repeated ``read_tensor`` calls on the same checkpoint cost one
request each (the tensor's bytes) instead of three.

Keys are the store's identity and the index URI. A committed checkpoint never changes (the
index is written create-only), so a cached index stays right; the exceptions are handled:
- local disk: the entry also records the index file's (inode, mtime, size), checked with a
  ``stat`` on every open, so a rewritten index is seen at once;
- object stores: an overwrite in place (``overwrite=True``) from this process drops the entry;
  from another process it is detected when a whole-tensor read fails its crc32c or finds a
  shard missing, and the read is retried once on a freshly opened index. Partial reads
  (``index=``) cannot be checked that way, so entries also expire after ``max_age`` seconds.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field

from streamckpt.format.bundle import BundleEntry, BundleHeader
from streamckpt.format.table import IndexBlock

DEFAULT_MAX_ENTRIES = 128
DEFAULT_MAX_BYTES = 256 << 20
DEFAULT_MAX_AGE = 600.0


@dataclass(slots=True)
class IndexState:
    """What a reader knows of one index.

    The decoded index block, the tail of the file read when it was opened, and whatever
    blocks, entries and lookups it has decoded since.

    Shared by every reader of the same checkpoint through the index cache, so that repeated
    reads cost only their data requests. Fields only ever go from unknown to known.
    """

    index: IndexBlock
    index_size: int
    tail: bytes
    version: object = None
    header: BundleHeader | None = None
    blocks: dict[int, bytes | memoryview] = field(default_factory=dict)
    entries: dict[bytes, BundleEntry] | None = None
    lookups: dict[bytes, BundleEntry | None] = field(default_factory=dict)
    shard_sizes: dict[int, int] = field(default_factory=dict)
    # blocks looked up in once (binary search), and those parsed after a second lookup
    searched_blocks: set[int] = field(default_factory=set)
    block_records: dict[int, dict[bytes, memoryview]] = field(default_factory=dict)

    @property
    def tail_start(self) -> int:
        return self.index_size - len(self.tail)


def state_bytes(state: IndexState) -> int:
    """A fair estimate of the memory an entry holds."""
    total = len(state.tail) + sum(len(b) for b in state.blocks.values())
    if state.entries is not None:
        total += 160 * len(state.entries)
    total += 160 * sum(len(records) for records in state.block_records.values())
    return total + 160 * len(state.lookups)


class IndexCache:
    """Opened indexes by (store identity, index URI), bounded in count, bytes and age."""

    def __init__(
        self,
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_age: float = DEFAULT_MAX_AGE,
    ) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_age = max_age
        self._items: OrderedDict[Hashable, tuple[float, IndexState]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable, *, version: object = None) -> IndexState | None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                stored_at, state = item
                fresh = time.monotonic() - stored_at <= self.max_age
                if fresh and (version is None or state.version == version):
                    self._items.move_to_end(key)
                    self.hits += 1
                    return state
                del self._items[key]
            self.misses += 1
            return None

    def put(self, key: Hashable, state: IndexState) -> None:
        if self.max_entries <= 0 or state_bytes(state) > self.max_bytes:
            return
        with self._lock:
            self._items[key] = (time.monotonic(), state)
            self._items.move_to_end(key)
            while len(self._items) > self.max_entries or self._total() > self.max_bytes:
                self._items.popitem(last=False)

    def _total(self) -> int:
        return sum(state_bytes(state) for _, state in self._items.values())

    def invalidate(self, key: Hashable) -> None:
        with self._lock:
            self._items.pop(key, None)

    def invalidate_uri(self, index_uri: str) -> None:
        with self._lock:
            for key in [k for k in self._items if isinstance(k, tuple) and index_uri in k]:
                del self._items[key]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


INDEX_CACHE = IndexCache()


def clear_index_cache() -> None:
    """Forget every cached index (e.g. after another process rewrote checkpoints in place)."""
    INDEX_CACHE.clear()
