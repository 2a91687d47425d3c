"""Bundle semantics of the index table: the header under key ``""`` and one entry per tensor.

Decoding validates everything a later step would trust: dtype numbers, shapes, sizes that must
agree with shapes, non-negative offsets, slices inside their tensor. After ``decode_entry`` a
caller may compute byte ranges from an entry without further checks, except that the ranges
lie inside the shard files, which only the storage layer can know.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, cast

from streamckpt.errors import CorruptCheckpointError, TruncatedError, UnsupportedError
from streamckpt.format.dtypes import DataType, is_fixed_size, itemsize, to_datatype
from streamckpt.format.entries import (
    entry_fields,
    entry_head,
    entry_tail,
    slice_field,
)
from streamckpt.format.record import Record
from streamckpt.format.table import (
    BlockHandle,
    IndexBlock,
    lookup_in_block,
)
from streamckpt.format.varint import decode_varint

if TYPE_CHECKING:  # loaded where a sliced entry is decoded
    from streamckpt.format.slices import TensorSlice

# protobuf loads only where it is needed: to encode a header, and to decode a header or an
# entry that the hand-written walks below leave to it (slices, unusual encodings). A cold
# process that reads a plain tensor never imports it (issue 15.1).
READER_VERSION = 1
HEADER_KEY = b""
# An entry value is a small proto; TF's are < 100 bytes without slices. Anything past this is
# hostile and would only make protobuf allocate.
_MAX_ENTRY_BYTES = 64 << 20
_MAX_INT64 = (1 << 63) - 1
_MAX_RANK = 64
_set = object.__setattr__


class BundleHeader(Record):
    """Value of key ``""``: how many shards, the byte order of payloads, the version."""

    __slots__ = ("bad_consumers", "big_endian", "min_consumer", "num_shards", "producer")
    num_shards: int
    big_endian: bool
    producer: int
    min_consumer: int
    bad_consumers: tuple[int, ...]

    def __init__(
        self,
        num_shards: int,
        big_endian: bool = False,
        producer: int = 1,
        min_consumer: int = 0,
        bad_consumers: tuple[int, ...] = (),
    ) -> None:
        _set(self, "num_shards", num_shards)
        _set(self, "big_endian", big_endian)
        _set(self, "producer", producer)
        _set(self, "min_consumer", min_consumer)
        _set(self, "bad_consumers", bad_consumers)

    def encode(self) -> bytes:
        from streamckpt.proto import tensor_bundle_pb2

        proto = tensor_bundle_pb2.BundleHeaderProto(
            num_shards=self.num_shards,
            endianness=(
                tensor_bundle_pb2.BundleHeaderProto.BIG
                if self.big_endian
                else tensor_bundle_pb2.BundleHeaderProto.LITTLE
            ),
        )
        proto.version.producer = self.producer
        proto.version.min_consumer = self.min_consumer
        proto.version.bad_consumers.extend(self.bad_consumers)
        return proto.SerializeToString()


def decode_header(value: bytes | memoryview) -> BundleHeader:
    raw = bytes(value)
    fields = _fast_header_fields(raw)
    if fields is not None:
        num_shards, big_endian, producer, min_consumer = fields
        if min_consumer > READER_VERSION:
            raise UnsupportedError(
                f"checkpoint needs reader version {min_consumer}, this one is {READER_VERSION}"
            )
        return BundleHeader(
            num_shards=num_shards,
            big_endian=big_endian,
            producer=producer,
            min_consumer=min_consumer,
        )
    from google.protobuf.message import DecodeError

    from streamckpt.proto import tensor_bundle_pb2

    proto = tensor_bundle_pb2.BundleHeaderProto()
    try:
        proto.ParseFromString(raw)
    except DecodeError as exc:
        raise CorruptCheckpointError(f"bad bundle header: {exc}") from None
    if proto.num_shards < 0:
        raise CorruptCheckpointError(f"bundle header claims {proto.num_shards} shards")
    if proto.endianness not in (0, 1):
        raise CorruptCheckpointError(f"unknown endianness {proto.endianness}")
    version = proto.version
    if version.min_consumer > READER_VERSION:
        raise UnsupportedError(
            f"checkpoint needs reader version {version.min_consumer}, this one is {READER_VERSION}"
        )
    if READER_VERSION in version.bad_consumers:
        raise UnsupportedError(f"checkpoint refuses reader version {READER_VERSION}")
    return BundleHeader(
        num_shards=proto.num_shards,
        big_endian=proto.endianness == 1,
        producer=version.producer,
        min_consumer=version.min_consumer,
        bad_consumers=tuple(version.bad_consumers),
    )


def _fast_header_fields(raw: bytes) -> tuple[int, bool, int, int] | None:
    """``(num_shards, big_endian, producer, min_consumer)`` of the headers TF and we write.

    Each field at most once, values protobuf reads as non-negative, endianness 0 or 1, no
    ``bad_consumers``; anything else returns None and goes through protobuf, so that the two
    paths never disagree and protobuf alone judges what is malformed or refused.
    """
    try:
        return _walk_header(raw)
    except CorruptCheckpointError:  # a varint running past the bytes: protobuf decides
        return None


def _walk_header(raw: bytes) -> tuple[int, bool, int, int] | None:
    values: dict[int, int] = {}
    pos, end = 0, len(raw)
    while pos < end:
        tag = raw[pos]
        if tag in values:
            return None  # a repeated field: protobuf's merge rules decide
        if tag in (0x08, 0x10):  # num_shards, endianness
            values[tag], pos = decode_varint(raw, pos + 1)
        elif tag == 0x1A:  # version
            length, pos = decode_varint(raw, pos + 1)
            stop = pos + length
            if stop > end:
                return None
            values[tag] = 0
            while pos < stop:
                sub = raw[pos]
                if sub not in (0x08, 0x10) or (sub << 8) in values:
                    return None  # bad_consumers, unknown or repeated fields
                values[sub << 8], pos = decode_varint(raw, pos + 1)
            if pos != stop:
                return None
        else:
            return None
    if any(value >= 1 << 31 for value in values.values()) or values.get(0x10, 0) > 1:
        return None  # negative int32s and unknown endianness: protobuf and the checks say so
    return (
        values.get(0x08, 0),
        values.get(0x10, 0) == 1,
        values.get(0x800, 0),
        values.get(0x1000, 0),
    )


def header_block(index: IndexBlock) -> BlockHandle:
    """The data block that holds the bundle header: the first one."""
    if not index.handles:
        raise CorruptCheckpointError("index has no data blocks, so no bundle header")
    return index.handles[0]


def header_in_block(block: bytes | memoryview, *, offset: int) -> BundleHeader:
    """The bundle header, from the (verified) first data block at ``offset``."""
    value = lookup_in_block(block, HEADER_KEY, offset=offset)
    if value is None:
        raise CorruptCheckpointError("index has no bundle header", offset=offset)
    return decode_header(value)


class BundleEntry(Record):
    """Where one tensor's bytes are and what they mean.

    ``crc32c`` is the *masked* CRC as stored. A partitioned tensor's full entry has ``slices``
    and owns no bytes (its shard, offset, size and crc are meaningless).
    """

    __slots__ = ("crc32c", "dtype", "offset", "shape", "shard_id", "size", "slices")
    dtype: DataType
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: int
    slices: tuple[TensorSlice, ...]

    def __init__(
        self,
        dtype: DataType,
        shape: tuple[int, ...],
        shard_id: int = 0,
        offset: int = 0,
        size: int = 0,
        crc32c: int = 0,
        slices: tuple[TensorSlice, ...] = (),
    ) -> None:
        _set(self, "dtype", dtype)
        _set(self, "shape", shape)
        _set(self, "shard_id", shard_id)
        _set(self, "offset", offset)
        _set(self, "size", size)
        _set(self, "crc32c", crc32c)
        _set(self, "slices", slices)

    @property
    def num_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def is_partitioned(self) -> bool:
        return bool(self.slices)

    def encode(self) -> bytes:
        """The BundleEntryProto bytes, spelled by hand (:mod:`streamckpt.format.entries`)."""
        if min(self.shape, default=0) < 0:
            return self.encode_proto()  # not a saved tensor's shape; protobuf spells it
        pieces = b"".join(
            slice_field([(extent.start, extent.length) for extent in piece.extents])
            for piece in self.slices
        )
        return (
            entry_head(int(self.dtype), self.shape)
            + entry_tail(self.shard_id, self.offset, self.size, self.crc32c)
            + pieces
        )

    def encode_proto(self) -> bytes:
        """The same bytes through protobuf: the reference the hand-spelled form is held to."""
        from streamckpt.proto import tensor_bundle_pb2

        proto = tensor_bundle_pb2.BundleEntryProto(
            dtype=cast(Any, int(self.dtype)),
            shard_id=self.shard_id,
            offset=self.offset,
            size=self.size,
            crc32c=self.crc32c,
        )
        proto.shape.SetInParent()  # TF always writes the shape, even a scalar's empty one
        for dim in self.shape:
            proto.shape.dim.add(size=dim)
        for piece in self.slices:
            proto.slices.append(piece.to_proto())
        return proto.SerializeToString()


def decode_entry(value: bytes | memoryview, *, num_shards: int | None = None) -> BundleEntry:
    """Parse and validate one entry; the caller adds the tensor name to any error."""
    if len(value) > _MAX_ENTRY_BYTES:
        raise CorruptCheckpointError(f"entry of {len(value)} bytes is implausibly large")
    raw = bytes(value)
    fields = entry_fields(raw)
    if fields is not None:
        dtype_number, shape, shard_id, offset, size, crc = fields
        return _validated(
            to_datatype(dtype_number), shape, shard_id, offset, size, crc, (), num_shards
        )
    from google.protobuf.message import DecodeError

    from streamckpt.proto import tensor_bundle_pb2

    proto = tensor_bundle_pb2.BundleEntryProto()
    try:
        proto.ParseFromString(raw)
    except DecodeError as exc:
        raise CorruptCheckpointError(f"bad bundle entry: {exc}") from None
    dtype = to_datatype(proto.dtype)
    if proto.shape.unknown_rank:
        raise CorruptCheckpointError("entry shape has unknown rank")
    shape = tuple(dim.size for dim in proto.shape.dim)
    from streamckpt.format.slices import TensorSlice

    slices = tuple(TensorSlice.from_proto(p) for p in proto.slices)
    return _validated(
        dtype, shape, proto.shard_id, proto.offset, proto.size, proto.crc32c, slices, num_shards
    )


def _validated(
    dtype: DataType,
    shape: tuple[int, ...],
    shard_id: int,
    offset: int,
    size: int,
    crc: int,
    slices: tuple[TensorSlice, ...],
    num_shards: int | None,
) -> BundleEntry:
    _check_shape(dtype, shape)
    entry = BundleEntry(
        dtype=dtype,
        shape=shape,
        shard_id=shard_id,
        offset=offset,
        size=size,
        crc32c=crc,
        slices=slices,
    )
    if slices:
        for piece in slices:
            piece.check_within(shape)
        return entry
    _check_extent(entry, num_shards)
    return entry


def _check_shape(dtype: DataType, shape: tuple[int, ...]) -> None:
    if any(d < 0 for d in shape):
        raise CorruptCheckpointError(f"entry shape {list(shape)} has a negative dimension")
    # numpy holds at most 64 dimensions, and refuses a shape whose non-zero extents multiply
    # past its address space even when another extent is 0 (and so the tensor is empty)
    if len(shape) > _MAX_RANK:
        raise UnsupportedError(
            f"entry shape has rank {len(shape)}; numpy holds at most {_MAX_RANK}"
        )
    if math.prod(d for d in shape if d) * (itemsize(dtype) or 8) > _MAX_INT64:
        raise UnsupportedError(f"entry shape {list(shape)} is too large for numpy")


def _check_extent(entry: BundleEntry, num_shards: int | None) -> None:
    if entry.offset < 0 or entry.size < 0 or entry.offset > _MAX_INT64 - entry.size:
        raise CorruptCheckpointError(
            f"entry has impossible extent offset={entry.offset} size={entry.size}"
        )
    if entry.shard_id < 0 or (num_shards is not None and entry.shard_id >= num_shards):
        raise CorruptCheckpointError(
            f"entry names shard {entry.shard_id} of a {num_shards}-shard bundle",
            shard=entry.shard_id,
        )
    count = entry.num_elements
    if is_fixed_size(entry.dtype):
        expected = count * itemsize(entry.dtype)
        if entry.size != expected:
            raise CorruptCheckpointError(
                f"entry size {entry.size} disagrees with shape {list(entry.shape)} of "
                f"{entry.dtype.name} ({expected} bytes)",
                shard=entry.shard_id,
                offset=entry.offset,
            )
    elif entry.size < min_payload_size(entry.dtype, count):
        raise CorruptCheckpointError(
            f"entry size {entry.size} is too small for {count} {entry.dtype.name} elements",
            shard=entry.shard_id,
            offset=entry.offset,
        )


def check_within_shard(*, shard_id: int, offset: int, size: int, shard_size: int) -> None:
    """Refuse an extent that runs past the end of its shard file.

    The caller gets ``shard_size`` from the store and checks before it allocates a buffer of
    ``size`` bytes: an index must not make us allocate what it merely claims.
    """
    if offset + size > shard_size:
        raise TruncatedError(
            f"tensor needs bytes up to {offset + size} but the shard has {shard_size}",
            shard=shard_id,
            offset=offset,
        )


def min_payload_size(dtype: DataType, count: int) -> int:
    """The fewest bytes a DT_STRING or DT_VARIANT payload of ``count`` elements can take."""
    # the string and variant codecs load only for their dtypes (issue 15.1: a plain read's
    # start pays for every module it imports)
    if dtype == DataType.DT_VARIANT:
        from streamckpt.format.variant import min_variant_payload_size

        return min_variant_payload_size(count)
    from streamckpt.format.strings import min_string_payload_size

    return min_string_payload_size(count)


def key_to_name(key: bytes) -> str:
    """Tensor names are bytes on disk; non-UTF-8 bytes survive the trip through ``str``."""
    return key.decode("utf-8", "surrogateescape")


def name_to_key(name: str | bytes) -> bytes:
    return name if isinstance(name, bytes) else name.encode("utf-8", "surrogateescape")


def data_filename(prefix: str, shard_id: int, num_shards: int) -> str:
    return f"{prefix}.data-{shard_id:05d}-of-{num_shards:05d}"


def index_filename(prefix: str) -> str:
    return f"{prefix}.index"
