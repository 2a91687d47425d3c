"""The whole .index file: every entry encoded into a table, or every entry decoded from one.

The per-record codecs (the header, one entry) are :mod:`streamckpt.format.bundle`'s; here
they run over a whole index. Decoding in bulk reads a block's entries a chunk at a time, as
columns (:func:`~streamckpt.format.entries.entry_columns`), at a few µs an entry; a record
spelled in any other way, or failing any check there, goes through
:func:`~streamckpt.format.bundle.decode_entry`, so both give the same entries and errors.
Its own module: a read of one tensor looks up one record and never loads this.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from streamckpt.errors import CorruptCheckpointError, UnsupportedError
from streamckpt.format.bundle import (
    HEADER_KEY,
    BundleEntry,
    BundleHeader,
    decode_entry,
    decode_header,
    key_to_name,
)
from streamckpt.format.dtypes import DataType, is_fixed_size, itemsize
from streamckpt.format.entries import entry_columns
from streamckpt.format.record import Record
from streamckpt.format.table import (
    FOOTER_SIZE,
    data_block_chunks,
    decode_block,
    decode_footer,
    decode_index_block,
)

_set = object.__setattr__
_MAX_INT64 = (1 << 63) - 1


def encode_index(header: BundleHeader, entries: Iterable[tuple[bytes, BundleEntry]]) -> bytes:
    """The whole .index file for ``entries``, which must be sorted by key bytes."""
    keys: list[bytes] = []
    values: list[bytes] = []
    for key, entry in entries:
        keys.append(key)
        values.append(entry.encode())
    return encode_index_records(header, keys, values)


def encode_index_records(
    header: BundleHeader, keys: Sequence[bytes], values: Sequence[bytes]
) -> bytes:
    """The whole .index file for entries already spelled, sorted by key.

    ``values[i]`` is the entry of ``keys[i]``: two lists, as the merge of a multi-process
    save makes them, so that a million entries are never a million tuples.
    """
    if keys and not keys[0]:
        raise ValueError("the empty tensor name is reserved for the bundle header")
    # here: a listing or a load decodes with this module and never loads the writer
    from streamckpt.format.table_write import TableWriter

    writer = TableWriter()
    writer.add(HEADER_KEY, header.encode())
    writer.add_many(keys, values)
    return writer.finish()


class DecodedIndex(Record):
    __slots__ = ("entries", "header")
    header: BundleHeader
    entries: dict[bytes, BundleEntry]

    def __init__(self, header: BundleHeader, entries: dict[bytes, BundleEntry]) -> None:
        _set(self, "header", header)
        _set(self, "entries", entries)


def decode_index(index_file: bytes | memoryview) -> DecodedIndex:
    """Parse a whole .index file: every block verified, keys sorted, header first."""
    view = memoryview(index_file)
    size = len(view)
    if size < FOOTER_SIZE:
        raise CorruptCheckpointError(f"index of {size} bytes is shorter than its footer")
    footer = decode_footer(view[size - FOOTER_SIZE :], file_size=size)
    handle = footer.index
    index_block = decode_block(view[handle.offset : handle.end_with_trailer], offset=handle.offset)
    index = decode_index_block(index_block, index_offset=handle.offset, limit=size - FOOTER_SIZE)
    return decode_records((view[h.offset : h.end_with_trailer], h.offset) for h in index.handles)


def decode_records(blocks: Iterable[tuple[bytes | memoryview, int]]) -> DecodedIndex:
    """Header and entries from the data blocks of a table, given in order with their offsets.

    The same entries and errors as :func:`decode_entry` of each record, at a few µs an entry:
    a block's entries are read a chunk at a time, as columns (:func:`_usual_entries`); the records
    spelled in any other way, or failing any check there, go through :func:`decode_entry`.
    """
    header: BundleHeader | None = None
    entries: dict[bytes, BundleEntry] = {}
    previous: bytes | None = None
    for stored, offset in blocks:
        block = bytes(decode_block(stored, offset=offset))
        for keys, bounds in data_block_chunks(block, offset=offset):
            usual: list[BundleEntry | None] | None = None
            for i, key in enumerate(keys):
                if previous is not None and key <= previous:
                    raise CorruptCheckpointError(
                        f"index keys are not sorted: {key[:64]!r} after {previous[:64]!r}",
                        offset=offset,
                    )
                previous = key
                if not key:  # HEADER_KEY
                    header = decode_header(block[bounds[2 * i] : bounds[2 * i + 1]])
                    continue
                if header is None:
                    raise CorruptCheckpointError("index has no bundle header", offset=offset)
                if usual is None:
                    usual = (
                        _usual_entries(block, bounds, header.num_shards)
                        if len(keys) >= _MIN_COLUMN_ROWS
                        else [None] * len(keys)
                    )
                entry = usual[i]
                if entry is None:
                    value = block[bounds[2 * i] : bounds[2 * i + 1]]
                    try:
                        entry = decode_entry(value, num_shards=header.num_shards)
                    except (CorruptCheckpointError, UnsupportedError) as exc:
                        raise exc.with_context(tensor=key_to_name(key), offset=offset) from None
                entries[key] = entry
    if header is None:
        raise CorruptCheckpointError("index has no bundle header")
    return DecodedIndex(header, entries)


# Columns cost a quarter of a millisecond, what ~30 entries cost one at a time: fewer records
# (a small checkpoint's index, a block's last few) are decoded one at a time.
_MIN_COLUMN_ROWS = 32
# By one-byte dtype number: the fixed-size types ``to_datatype`` accepts, and their bytes
# per element (0 for any other number)
_DATATYPES: list[DataType | None] = [None] * 128
for _dtype in DataType:
    if is_fixed_size(_dtype) and _dtype not in (DataType.DT_INVALID, DataType.DT_RESOURCE):
        _DATATYPES[_dtype] = _dtype
_FIXED_ITEMSIZE = np.array([itemsize(d) if d else 0 for d in _DATATYPES], dtype=np.uint64)
_NEW = object.__new__
# an entry is built slot by slot below, as its __init__ does, without the call's cost
_SLOT_SETTERS = tuple(
    getattr(BundleEntry, name).__set__
    for name in ("dtype", "shape", "shard_id", "offset", "size", "crc32c", "slices")
)


def _usual_entries(block: bytes, bounds: list[int], num_shards: int) -> list[BundleEntry | None]:
    """The entries at ``bounds`` as :func:`decode_entry` returns them, or None, from columns.

    The columns are :func:`~streamckpt.format.entries.entry_columns`'; taken from them are
    entries of fixed-size types whose shape needs under 2**62 bytes, whose size is that, and
    whose shard and extent lie within bounds: rows that :func:`decode_entry` reads with
    ``entry_fields`` and validates without raising.
    """
    columns = entry_columns(block, bounds[::2], bounds[1::2])
    item = _FIXED_ITEMSIZE[columns.dtype]
    width = int(columns.rank.max(initial=0))
    dims = columns.dims[:, :width]
    nonzero = np.where(dims > 0, dims, 1).astype(np.float64).prod(axis=1)
    usual = columns.usual & (item > 0) & (nonzero * item < 2.0**62)  # so these are exact:
    usual &= columns.size == dims.prod(axis=1) * item
    usual &= (columns.shard_id < num_shards) & (columns.offset + columns.size <= _MAX_INT64)
    found: list[BundleEntry | None] = []
    set_dtype, set_shape, set_shard, set_offset, set_size, set_crc, set_slices = _SLOT_SETTERS
    for ok, number, rank, row, shard, offset, size, crc in zip(
        usual.tolist(),
        columns.dtype.tolist(),
        columns.rank.tolist(),
        dims.tolist(),
        columns.shard_id.tolist(),
        columns.offset.tolist(),
        columns.size.tolist(),
        columns.crc32c.tolist(),
        strict=True,
    ):
        if not ok:
            found.append(None)
            continue
        entry = _NEW(BundleEntry)
        set_dtype(entry, _DATATYPES[number])
        set_shape(entry, tuple(row[:rank]))
        set_shard(entry, shard)
        set_offset(entry, offset)
        set_size(entry, size)
        set_crc(entry, crc)
        set_slices(entry, ())
        found.append(entry)
    return found
