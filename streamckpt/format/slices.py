"""Partitioned tensors: slice values, the spec text form and slice keys (spec 5.5 and 9).

A slice key is a run of "ordered code" items: the unsigned number 0, the full tensor name
with ``00`` escaped as ``00 ff`` and ``ff`` as ``ff 00`` and closed by ``00 01``, the rank as
an unsigned number, then ``start`` and ``length`` of every dimension as signed numbers (a
whole dimension is start 0, length -1).

Invariants this module keeps:

* An :class:`Extent` has ``0 <= start``, ``length is None or 0 <= length``, ``start + length``
  within int64, and a whole-dimension extent (``length is None``) starts at 0.
* :func:`decode_slice_key` accepts only the canonical bytes :func:`encode_slice_key` writes
  (shortest numbers, no trailing bytes), so a decoded key always re-encodes to itself, and it
  raises only :class:`CorruptCheckpointError`, whatever the input. It caps the rank by the
  bytes left before building anything per dimension.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

from streamckpt.errors import CorruptCheckpointError
from streamckpt.format.record import Record

if TYPE_CHECKING:  # protobuf loads only for the slices of partitioned tensors (issue 15.1)
    from streamckpt.proto.tensor_slice_pb2 import TensorSliceProto

__all__ = [
    "Extent",
    "TensorSlice",
    "decode_slice_key",
    "encode_slice_key",
    "encode_slice_key_tail",
    "format_slice_spec",
    "is_slice_key",
    "parse_slice_spec",
    "slice_key_head",
]

_INT64_MAX = (1 << 63) - 1
_MAX_UNSIGNED_BYTES = 8
_MAX_SIGNED_BYTES = 10
# Every dimension takes at least two bytes in a key: a one-byte start and a one-byte length.
_MIN_DIMENSION_BYTES = 2
_NAME_ESCAPES = {b"\x00\xff": b"\x00", b"\xff\x00": b"\xff"}
_NAME_TERMINATOR = b"\x00\x01"
_set = object.__setattr__


def _extent_problem(start: int, length: int | None) -> str | None:
    """Why ``(start, length)`` is not a valid extent, or None; shared by all entry points."""
    if start < 0 or start > _INT64_MAX:
        return f"extent start {start} is outside 0..2**63-1"
    if length is None:
        return None if start == 0 else f"a whole-dimension extent must start at 0, not {start}"
    if length < 0:
        return f"extent length {length} is negative"
    if start + length > _INT64_MAX:
        return f"extent end {start} + {length} overflows int64"
    return None


class Extent(Record):
    """One dimension of a slice; ``length=None`` takes the whole dimension, as the proto does."""

    __slots__ = ("length", "start")
    start: int
    length: int | None

    def __init__(self, start: int, length: int | None) -> None:
        problem = _extent_problem(start, length)
        if problem is not None:
            raise ValueError(problem)
        _set(self, "start", start)
        _set(self, "length", length)


class TensorSlice(Record):
    """A rectangular piece of a tensor: one :class:`Extent` per dimension of the full tensor."""

    __slots__ = ("extents",)
    extents: tuple[Extent, ...]

    def __init__(self, extents: tuple[Extent, ...]) -> None:
        _set(self, "extents", extents)

    def _problem_within(self, full_shape: Sequence[int]) -> str | None:
        if len(full_shape) != len(self.extents):
            return f"slice of rank {len(self.extents)} for a tensor of rank {len(full_shape)}"
        for dim, (size, extent) in enumerate(zip(full_shape, self.extents, strict=True)):
            if size < 0:
                return f"dimension {dim} of the full shape is negative ({size})"
            if extent.length is not None and extent.start + extent.length > size:
                return (
                    f"extent {extent.start},{extent.length} of dimension {dim}"
                    f" exceeds its size {size}"
                )
        return None

    def check_within(self, full_shape: Sequence[int]) -> None:
        """Refuse a slice that a hostile index places outside its full tensor."""
        problem = self._problem_within(full_shape)
        if problem is not None:
            raise CorruptCheckpointError(problem)

    def shape_in(self, full_shape: Sequence[int]) -> tuple[int, ...]:
        """The piece's own shape: what its slice entry must declare."""
        self.check_within(full_shape)
        return tuple(
            size if extent.length is None else extent.length
            for size, extent in zip(full_shape, self.extents, strict=True)
        )

    def index_in(self, full_shape: Sequence[int]) -> tuple[slice, ...]:
        """Where the piece goes in a numpy array of ``full_shape`` (checked, never clipped)."""
        return tuple(
            slice(extent.start, extent.start + length)
            for extent, length in zip(self.extents, self.shape_in(full_shape), strict=True)
        )

    def is_full(self, full_shape: Sequence[int]) -> bool:
        """True when the piece is the whole tensor; TF then stores a plain entry instead."""
        self.check_within(full_shape)
        return all(
            extent.length is None or (extent.start == 0 and extent.length == size)
            for size, extent in zip(full_shape, self.extents, strict=True)
        )

    def to_proto(self) -> TensorSliceProto:
        """The proto TF writes: ``length`` left unset (not -1) for a whole dimension."""
        from streamckpt.proto.tensor_slice_pb2 import TensorSliceProto

        proto = TensorSliceProto()
        for extent in self.extents:
            item = proto.extent.add()
            item.start = extent.start
            if extent.length is not None:
                item.length = extent.length
        return proto

    @classmethod
    def from_proto(cls, proto: TensorSliceProto) -> TensorSlice:
        """Read a slice from an index entry; refuses negative or overflowing extents."""
        extents: list[Extent] = []
        for dim, item in enumerate(proto.extent):
            length = item.length if item.HasField("length") else None
            problem = _extent_problem(item.start, length)
            if problem is not None:
                raise CorruptCheckpointError(f"dimension {dim}: {problem}")
            extents.append(Extent(item.start, length))
        return cls(tuple(extents))


# --- the text form "4 3 2,2:-" ------------------------------------------------------------


def _parse_spec_int(text: str, spec: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"not a non-negative integer: {text!r} in slice spec {spec!r}")
    return int(text)


def parse_slice_spec(spec: str) -> tuple[tuple[int, ...], TensorSlice]:
    """Parse ``"<d0> <d1> ... <start0>,<len0>:-..."`` into the full shape and the slice.

    These strings come from callers (SaveV2's ``shape_and_slices``), so errors are plain
    ``ValueError``. An empty spec means "not sliced" and has no slice to return.
    """
    parts = spec.split(" ")
    if len(parts) < 2:
        raise ValueError(f"slice spec {spec!r} needs the full shape and a slice")
    full_shape = tuple(_parse_spec_int(part, spec) for part in parts[:-1])
    extents: list[Extent] = []
    for text in parts[-1].split(":"):
        if text == "-":
            extents.append(Extent(0, None))
            continue
        start_text, comma, length_text = text.partition(",")
        if not comma:
            raise ValueError(f"extent {text!r} is neither '-' nor 'start,length' in {spec!r}")
        extents.append(
            Extent(_parse_spec_int(start_text, spec), _parse_spec_int(length_text, spec))
        )
    piece = TensorSlice(tuple(extents))
    problem = piece._problem_within(full_shape)
    if problem is not None:
        raise ValueError(f"{problem} in slice spec {spec!r}")
    return full_shape, piece


def format_slice_spec(full_shape: Sequence[int], piece: TensorSlice) -> str:
    """The text form TF accepts as ``shape_and_slices``; a rank-0 tensor has none."""
    if not full_shape:
        raise ValueError("a scalar cannot be sliced")
    problem = piece._problem_within(full_shape)
    if problem is not None:
        raise ValueError(problem)
    extents = ":".join(
        "-" if extent.length is None else f"{extent.start},{extent.length}"
        for extent in piece.extents
    )
    return " ".join(str(size) for size in full_shape) + " " + extents


# --- ordered-code numbers ------------------------------------------------------------------


def _encode_unsigned(value: int) -> bytes:
    """A byte count (0-8), then the value's significant bytes big-endian."""
    width = (value.bit_length() + 7) // 8
    if value < 0 or width > _MAX_UNSIGNED_BYTES:
        raise ValueError(f"unsigned ordered-code number out of range: {value}")
    return bytes((width,)) + value.to_bytes(width, "big")


def _decode_unsigned(buf: bytes, pos: int) -> tuple[int, int]:
    if pos >= len(buf):
        raise CorruptCheckpointError("slice key ends inside a number", offset=pos)
    width = buf[pos]
    if width > _MAX_UNSIGNED_BYTES:
        raise CorruptCheckpointError(f"unsigned number of {width} bytes", offset=pos)
    end = pos + 1 + width
    if end > len(buf):
        raise CorruptCheckpointError("slice key ends inside a number", offset=pos)
    if width and buf[pos + 1] == 0:
        raise CorruptCheckpointError("unsigned number with a leading zero byte", offset=pos)
    return int.from_bytes(buf[pos + 1 : end], "big"), end


def _signed_width(value: int) -> int:
    """Smallest n with -2**(7n-1) <= value < 2**(7n-1)."""
    magnitude = ~value if value < 0 else value
    return (magnitude.bit_length() + 7) // 7


def _header_bits(width: int) -> int:
    """The n leading ones that are XORed onto an n-byte two's-complement value."""
    return ((1 << width) - 1) << (7 * width)


def _encode_signed(value: int) -> bytes:
    """``value``'s n-byte two's complement, XOR n leading ones; sorts like the numbers do."""
    width = _signed_width(value)
    if width > _MAX_SIGNED_BYTES:
        raise ValueError(f"signed ordered-code number out of range: {value}")
    bits = 8 * width
    return ((value & ((1 << bits) - 1)) ^ _header_bits(width)).to_bytes(width, "big")


def _leading_ones(byte: int) -> int:
    return 8 - (byte ^ 0xFF).bit_length()


def _decode_signed(buf: bytes, pos: int) -> tuple[int, int]:
    if pos >= len(buf):
        raise CorruptCheckpointError("slice key ends inside a number", offset=pos)
    # The width is the run of leading bits equal to the first bit; flip negatives to count ones.
    flip = 0 if buf[pos] & 0x80 else 0xFF
    width = _leading_ones(buf[pos] ^ flip)
    if width == 8:
        if pos + 1 >= len(buf):
            raise CorruptCheckpointError("slice key ends inside a number", offset=pos)
        width += _leading_ones(buf[pos + 1] ^ flip)
        if width > _MAX_SIGNED_BYTES:
            raise CorruptCheckpointError("signed number longer than 10 bytes", offset=pos)
    end = pos + width
    if end > len(buf):
        raise CorruptCheckpointError("slice key ends inside a number", offset=pos)
    bits = 8 * width
    twos = int.from_bytes(buf[pos:end], "big") ^ _header_bits(width)
    value = twos - (1 << bits) if twos >> (bits - 1) else twos
    if _signed_width(value) != width:
        raise CorruptCheckpointError("signed number not in its shortest form", offset=pos)
    if not -(1 << 63) <= value <= _INT64_MAX:
        raise CorruptCheckpointError(f"signed number {value} outside int64", offset=pos)
    return value, end


# --- slice keys ----------------------------------------------------------------------------


def _escape_name(name: bytes) -> bytes:
    # One pass per byte value: escaping 00 first would otherwise re-escape the ff it adds.
    return b"\x00\xff".join(part.replace(b"\xff", b"\xff\x00") for part in name.split(b"\x00"))


def _decode_name(key: bytes, pos: int) -> tuple[bytes, int]:
    pieces: list[bytes] = []
    while True:
        zero, high = key.find(b"\x00", pos), key.find(b"\xff", pos)
        at = high if zero < 0 else zero if high < 0 else min(zero, high)
        if at < 0:
            raise CorruptCheckpointError("slice key name has no terminator", offset=pos)
        pieces.append(key[pos:at])
        pair = key[at : at + 2]
        if pair == _NAME_TERMINATOR:
            return b"".join(pieces), at + 2
        unescaped = _NAME_ESCAPES.get(pair)
        if unescaped is None:
            raise CorruptCheckpointError(f"bad escape {pair.hex()} in slice key name", offset=at)
        pieces.append(unescaped)
        pos = at + 2


def encode_slice_key(name: bytes, piece: TensorSlice) -> bytes:
    """The index key of one stored piece of tensor ``name``."""
    return slice_key_head(name) + encode_slice_key_tail(piece)


def slice_key_head(name: bytes) -> bytes:
    """What the slice keys of all pieces of tensor ``name`` begin with: escape it once."""
    return b"\x00" + _escape_name(name) + _NAME_TERMINATOR


def encode_slice_key_tail(piece: TensorSlice) -> bytes:
    """The rest of a slice key after :func:`slice_key_head`: the rank and the extents."""
    parts = [_encode_unsigned(len(piece.extents))]
    for extent in piece.extents:
        parts.append(_encode_signed_cached(extent.start))
        parts.append(_encode_signed_cached(-1 if extent.length is None else extent.length))
    return b"".join(parts)


@functools.lru_cache(maxsize=4096)
def _encode_signed_cached(value: int) -> bytes:
    """Pieces mostly share a few starts and lengths: each is encoded once."""
    return _encode_signed(value)


def decode_slice_key(key: bytes) -> tuple[bytes, TensorSlice]:
    """Split a slice key into the full tensor's name and the piece; offsets are into ``key``."""
    if key[:1] != b"\x00":
        raise CorruptCheckpointError("a slice key starts with byte 00", offset=0)
    name, pos = _decode_name(key, 1)
    rank_at = pos
    rank, pos = _decode_unsigned(key, pos)
    if rank * _MIN_DIMENSION_BYTES > len(key) - pos:
        raise CorruptCheckpointError(
            f"slice key claims rank {rank} but only {len(key) - pos} bytes follow",
            offset=rank_at,
        )
    extents: list[Extent] = []
    for dim in range(rank):
        extent_at = pos
        start, pos = _decode_signed(key, pos)
        length, pos = _decode_signed(key, pos)
        if length == -1:
            length_or_none: int | None = None
        elif length < 0:
            raise CorruptCheckpointError(
                f"dimension {dim}: extent length {length} is negative", offset=extent_at
            )
        else:
            length_or_none = length
        problem = _extent_problem(start, length_or_none)
        if problem is not None:
            raise CorruptCheckpointError(f"dimension {dim}: {problem}", offset=extent_at)
        extents.append(Extent(start, length_or_none))
    if pos != len(key):
        raise CorruptCheckpointError(f"{len(key) - pos} bytes after the slice key", offset=pos)
    return name, TensorSlice(tuple(extents))


def is_slice_key(key: bytes) -> bool:
    """Whether ``key`` parses as a slice key.

    Only a syntactic test: a tensor name may itself begin with a NUL byte, and the authority
    on which keys are pieces is the ``slices`` list of each full entry (spec 9.1).
    """
    if key[:1] != b"\x00":
        return False
    try:
        decode_slice_key(key)
    except CorruptCheckpointError:
        return False
    return True
