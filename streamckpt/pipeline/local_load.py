"""A whole local checkpoint loaded without an event loop: planned reads, or read ahead.

Why its own module: :mod:`streamckpt.pipeline.local_read` serves a cold process's first read
of one tensor, and what it imports is what that process pays (issue 15.1); loading every
tensor is another call, made by ``streamckpt.sync.load``, which imports this module when it
runs. A checkpoint with a large index has its data files read while the entries decode
(:mod:`streamckpt.pipeline.read_ahead`, issue 15.2); any other is read as planned
(:func:`streamckpt.pipeline.local_read.load_planned`). Both check every tensor's crc32c and
fail as the async load does.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from streamckpt.errors import StreamCkptError
from streamckpt.fileio import refuse_past_end
from streamckpt.format.bundle import BundleEntry, data_filename, key_to_name, name_to_key
from streamckpt.pipeline.local_read import LocalIndex, decode_checked, load_planned

if TYPE_CHECKING:
    from streamckpt.pipeline.read_ahead import ReadAhead

# A whole load of a checkpoint whose index is this large (a thousand entries or more: its
# decoding takes milliseconds) reads the data files while the entries decode.
READ_AHEAD_INDEX_BYTES = 32 << 10
# ... and as many data files at most (a header may claim any number: the files are opened up
# front, and beyond this many the planned reads open only those that entries name).
READ_AHEAD_MAX_SHARDS = 64


def load_whole(
    prefix_path: str, names: Iterable[str | bytes] | None = None
) -> dict[str, np.ndarray[Any, Any]] | None:
    """Every tensor of a local checkpoint (or those in ``names``), each verified by its crc32c.

    ``None`` when one of them is partitioned. Neighbouring tensors are read in one merged
    read (its buffer shared by their arrays, as the async reader's), several reads at a time.
    The whole of a checkpoint with a large index is read while its entries decode
    (:func:`load_ahead`).
    """
    with LocalIndex(prefix_path) as index:
        if (
            names is None
            and index.size >= READ_AHEAD_INDEX_BYTES
            and index.header.num_shards <= READ_AHEAD_MAX_SHARDS
        ):
            return load_ahead(prefix_path, index)
        keys = None if names is None else [name_to_key(n) for n in names]
        if keys is None or len(keys) > len(index.index.handles):
            decoded = index.entries()  # one read of every block beats a lookup per tensor
            if keys is None:
                from streamckpt.format.partitioned import tensor_keys

                keys = tensor_keys(decoded)
            entries = {k: decoded[k] if k in decoded else index.entry(k) for k in keys}
        else:
            entries = {k: index.entry(k) for k in keys}
        header = index.header
    return load_planned(prefix_path, keys, entries, header.num_shards, header.big_endian)


def load_ahead(prefix_path: str, index: LocalIndex) -> dict[str, np.ndarray[Any, Any]] | None:
    """The whole checkpoint, its data files read whole while the index decodes.

    Each tensor is a view of its file's buffer, checked by its crc32c as soon as its bytes
    are in. The planned reads, which take only what the tensors need, load it instead when
    the files' buffers cannot be had (ENOMEM: a file larger than memory, or a sparse one),
    and when a file holds more than twice the bytes its tensors need (nothing TensorFlow or
    a save writes): its reads stop, so a file padded with holes costs no memory beyond what
    arrived meanwhile.
    """
    from streamckpt.format.partitioned import tensor_keys

    # threads and their pool: loaded by a whole load only, not by a read of one tensor
    from streamckpt.pipeline.read_ahead import ReadAhead

    header = index.header
    paths = [data_filename(prefix_path, i, header.num_shards) for i in range(header.num_shards)]
    ahead: ReadAhead | None
    try:
        ahead = ReadAhead(paths)
    except StreamCkptError as exc:
        if getattr(exc, "errno", None) != errno.ENOMEM:
            raise
        ahead = None
    with ahead if ahead is not None else contextlib.nullcontext():
        decoded = index.entries()
        keys = tensor_keys(decoded)
        entries = {k: decoded[k] for k in keys}
        if ahead is not None:
            arrays = _from_whole_files(ahead, entries, header.big_endian)
            if arrays is not None:
                return {key_to_name(k): arrays[k] for k in keys}
    del ahead  # what it read so far goes before the planned reads fill memory again
    return load_planned(prefix_path, keys, entries, header.num_shards, header.big_endian)


def _from_whole_files(
    ahead: ReadAhead, entries: dict[bytes, BundleEntry], big_endian: bool
) -> dict[bytes, np.ndarray[Any, Any]] | None:
    """Every entry decoded from the files being read.

    None for a partitioned one, or where a file holds more than twice what its tensors need.
    """
    from streamckpt.pipeline.read_ahead import CHUNK

    spans: list[list[tuple[int, int, bytes]]] = [[] for _ in ahead.files]
    for key, entry in entries.items():
        if entry.slices:
            return None
        spans[entry.shard_id].append((entry.offset, entry.offset + entry.size, key))
    ends = [max((end for _, end, _ in shard), default=0) for shard in spans]
    if any(f.size > 2 * end + CHUNK for f, end in zip(ahead.files, ends, strict=True)):
        return None
    arrays: dict[bytes, np.ndarray[Any, Any]] = {}
    for file, shard in zip(ahead.files, spans, strict=True):
        shard.sort()
        for start, end, key in shard:
            context = {"shard": file.shard_id, "tensor": key_to_name(key)}
            refuse_past_end(file.path, file.size, start, end, **context)
        for start, end, key in shard:
            payload = file.upto(end)[start:end]
            arrays[key] = decode_checked(file.path, key, entries[key], payload, big_endian)
    return arrays
