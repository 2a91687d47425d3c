"""Tensors in and out of other formats: safetensors files, Hugging Face directories, torch.

Rules:

- a source states every tensor's name, dtype and shape before any data is read, and then
  reads the tensors asked for (``read``, a batch) or one at a time from a worker thread
  (``fetch``, what a TF save's deferred values call), so a writer can lay out its file first
  and stream the data;
- safetensors is read and written here by its own short spec (8-byte little-endian header
  length, a JSON header of dtype / shape / data offsets, then the raw bytes), with ranged
  reads on any fsspec URL; the ``safetensors`` package is not needed;
- dtypes are kept exactly, bfloat16 and float8 included; torch files are loaded with
  ``weights_only=True`` (no pickled code runs);
- a safetensors tensor is one ranged read of its bytes, local files too: an array handed to
  a writer is freed once written (a memory map would keep every page it touched resident,
  the whole file by the end of a conversion).
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import anyio.from_thread
import anyio.to_thread
import ml_dtypes
import numpy as np

import streamckpt
from streamckpt.cli._output import hinted
from streamckpt.errors import CorruptCheckpointError, TruncatedError, UnsupportedError

HF_INDEX = "model.safetensors.index.json"

_ST_DTYPES: dict[str, np.dtype[Any]] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
    "C64": np.dtype(np.complex64),
}
_ST_NAMES = {dtype: name for name, dtype in _ST_DTYPES.items()}
# A header longer than this is not a safetensors header (the spec caps it at 100 MB).
_MAX_HEADER = 100_000_000


@dataclass(frozen=True, slots=True)
class Spec:
    """One tensor as a source describes it before reading it."""

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class Source(Protocol):
    specs: list[Spec]

    async def read(self, names: Sequence[str]) -> dict[str, np.ndarray[Any, Any]]: ...

    def fetch(self, name: str) -> np.ndarray[Any, Any]:
        """One tensor, from a worker thread of the event loop that opened the source."""
        ...

    async def read_rows(self, name: str, start: int, stop: int) -> np.ndarray[Any, Any]:
        """Rows ``start:stop`` of one tensor's first axis, reading only their bytes."""
        ...


def batches(specs: Sequence[Spec], budget: int) -> list[list[Spec]]:
    """Specs in order, grouped so that each group's bytes fit ``budget`` (one may exceed it)."""
    groups: list[list[Spec]] = []
    held = 0
    for spec in specs:
        if not groups or (groups[-1] and held + spec.nbytes > budget):
            groups.append([])
            held = 0
        groups[-1].append(spec)
        held += spec.nbytes
    return groups


class CheckpointSource:
    """A TF checkpoint, read through an open :class:`streamckpt.CheckpointReader`."""

    def __init__(self, reader: streamckpt.CheckpointReader) -> None:
        self.reader = reader
        self.specs = [
            Spec(e.name, e.dtype, e.shape)
            for e in sorted(reader.entries.values(), key=lambda e: (e.shard, e.offset, e.name))
        ]

    async def read(self, names: Sequence[str]) -> dict[str, np.ndarray[Any, Any]]:
        return await self.reader.read_many(list(names))

    def fetch(self, name: str) -> np.ndarray[Any, Any]:
        return anyio.from_thread.run(self.reader.read, name)

    async def read_rows(self, name: str, start: int, stop: int) -> np.ndarray[Any, Any]:
        return await self.reader.read(name, index=np.s_[start:stop])


class SafetensorsSource:
    """One or more safetensors files (a Hugging Face directory has several)."""

    def __init__(self, fs: Any, files: Sequence[str]) -> None:
        self.fs = fs
        self.specs: list[Spec] = []
        self.where: dict[str, tuple[str, int, int]] = {}  # name -> file, start, end
        for path in files:
            for spec, start, end in _read_header(fs, path):
                if spec.name in self.where:
                    raise CorruptCheckpointError(f"tensor {spec.name!r} appears twice (in {path})")
                self.specs.append(spec)
                self.where[spec.name] = (path, start, end)
        self.by_name = {spec.name: spec for spec in self.specs}

    def fetch(self, name: str) -> np.ndarray[Any, Any]:
        """One tensor: one ranged read of its bytes (blocking)."""
        spec = self.by_name[name]
        return self.span(name, 0, spec.nbytes).reshape(spec.shape)

    async def read_rows(self, name: str, start: int, stop: int) -> np.ndarray[Any, Any]:
        spec = self.by_name[name]
        row = math.prod(spec.shape[1:]) * spec.dtype.itemsize
        flat = await anyio.to_thread.run_sync(self.span, name, start * row, stop * row)
        return flat.reshape((stop - start, *spec.shape[1:]))

    def span(self, name: str, lo: int, hi: int) -> np.ndarray[Any, Any]:
        """Bytes ``lo..hi`` of one tensor's data as a flat array of its dtype (blocking)."""
        path, first, _ = self.where[name]
        start, end = first + lo, first + hi
        spec = self.by_name[name]
        data: Any = b""
        if end > start and is_local_filesystem(self.fs):
            data = _read_local(path, start, end)
        elif end > start:
            data = self.fs.cat_file(path, start=start, end=end)
        if len(data) != end - start:
            raise TruncatedError(
                f"tensor {name!r} wants bytes {start}..{end}, the file holds {len(data)} of them",
                uri=path,
                offset=start,
            )
        return np.frombuffer(data, dtype=spec.dtype)

    async def read(self, names: Sequence[str]) -> dict[str, np.ndarray[Any, Any]]:
        def work() -> dict[str, np.ndarray[Any, Any]]:
            return {name: self.fetch(name) for name in names}

        return await anyio.to_thread.run_sync(work)


def _read_local(path: str, start: int, end: int) -> memoryview:
    """Bytes ``start..end`` of a local file, in memory of their own (an anonymous map).

    A map goes back to the system when its last array is freed. Bytes from ``malloc`` stay
    with the freeing thread's arena, and every shard thread kept a tensor's worth: 128 MiB of
    16 MiB tensors to TF with ``--shards 8 --budget-mib 16`` peaked 141 MiB above a tiny
    conversion that way, 50 MiB this way (the rest: the disk writers' staging buffers).
    """
    buffer = mmap.mmap(-1, end - start)
    with open(path, "rb") as stream:
        stream.seek(start)
        count = stream.readinto(buffer)
    return memoryview(buffer)[:count]


def is_local_filesystem(fs: Any) -> bool:
    protocol = fs.protocol
    return "file" in (protocol if isinstance(protocol, tuple | list) else (protocol,))


def _read_header(fs: Any, path: str) -> list[tuple[Spec, int, int]]:
    size = fs.size(path)
    head = fs.cat_file(path, start=0, end=8)
    if len(head) < 8:
        raise CorruptCheckpointError(f"{path} is not a safetensors file: shorter than 8 bytes")
    (length,) = struct.unpack("<Q", head)
    if length > min(_MAX_HEADER, size - 8):
        raise CorruptCheckpointError(f"{path} is not a safetensors file: bad header length")
    try:
        header = json.loads(fs.cat_file(path, start=8, end=8 + length))
        entries = []
        for name, item in header.items():
            if name == "__metadata__":
                continue
            dtype = _ST_DTYPES[item["dtype"]]
            shape = tuple(int(d) for d in item["shape"])
            start, end = (int(x) + 8 + length for x in item["data_offsets"])
            spec = Spec(name, dtype, shape)
            if end - start != spec.nbytes or end > size or start > end:
                raise ValueError(f"offsets of {name!r} do not fit its dtype and shape")
            entries.append((spec, start, end))
    except KeyError as exc:
        raise CorruptCheckpointError(
            f"{path}: unsupported or missing safetensors field {exc}"
        ) from None
    except (ValueError, TypeError, AttributeError) as exc:
        raise CorruptCheckpointError(f"{path} is not a valid safetensors file: {exc}") from None
    return entries


def hf_files(fs: Any, directory: str) -> list[str]:
    """The safetensors files a Hugging Face directory's index names, in order."""
    index_path = f"{directory.rstrip('/')}/{HF_INDEX}"
    try:
        weight_map = json.loads(fs.cat_file(index_path))["weight_map"]
        files = list(dict.fromkeys(str(f) for f in weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptCheckpointError(f"{index_path} is not a Hugging Face index: {exc}") from None
    return [f"{directory.rstrip('/')}/{name}" for name in files]


class ArraySource:
    """Tensors already in memory (a torch state dict)."""

    def __init__(self, arrays: dict[str, np.ndarray[Any, Any]]) -> None:
        self.arrays = arrays
        self.specs = [Spec(name, a.dtype, tuple(a.shape)) for name, a in arrays.items()]

    async def read(self, names: Sequence[str]) -> dict[str, np.ndarray[Any, Any]]:
        return {name: self.arrays[name] for name in names}

    def fetch(self, name: str) -> np.ndarray[Any, Any]:
        return self.arrays[name]

    async def read_rows(self, name: str, start: int, stop: int) -> np.ndarray[Any, Any]:
        return self.arrays[name][start:stop]


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise hinted(
            UnsupportedError("reading or writing torch files needs torch, not installed"),
            "pip install torch",
        ) from None
    return torch


def load_torch(fs: Any, path: str) -> ArraySource:
    """A torch state dict, loaded with ``weights_only=True``; every value must be a tensor."""
    torch = _torch()
    try:
        if is_local_filesystem(fs):  # mapped: tensors stay in the page cache
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        else:
            with fs.open(path, "rb") as stream:
                loaded = torch.load(stream, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a bad file
        raise CorruptCheckpointError(f"cannot load {path} as a torch state dict: {exc}") from None
    if isinstance(loaded, dict) and set(loaded) <= {"state_dict", "model"} and len(loaded) == 1:
        loaded = next(iter(loaded.values()))
    if not isinstance(loaded, dict):
        raise CorruptCheckpointError(f"{path} holds a {type(loaded).__name__}, not a state dict")
    arrays = {}
    for name, value in loaded.items():
        if not isinstance(value, torch.Tensor):
            raise CorruptCheckpointError(
                f"{path}: {name!r} is a {type(value).__name__}, not a tensor"
            )
        arrays[str(name)] = _from_torch(torch, value)
    return ArraySource(arrays)


_TORCH_VIEWS = {"bfloat16": "int16", "float8_e4m3fn": "uint8", "float8_e5m2": "uint8"}


def _from_torch(torch: Any, tensor: Any) -> np.ndarray[Any, Any]:
    tensor = tensor.detach().cpu().contiguous()
    name = str(tensor.dtype).removeprefix("torch.")
    if name in _TORCH_VIEWS:
        raw = tensor.view(getattr(torch, _TORCH_VIEWS[name])).numpy()
        viewed: np.ndarray[Any, Any] = raw.view(np.dtype(getattr(ml_dtypes, name)))
        return viewed
    array: np.ndarray[Any, Any] = tensor.numpy()
    return array


def _to_torch(torch: Any, array: np.ndarray[Any, Any]) -> Any:
    name = array.dtype.name
    if name in _TORCH_VIEWS:
        raw = np.ascontiguousarray(array).view(np.dtype(_TORCH_VIEWS[name]))
        return torch.from_numpy(raw.copy()).view(getattr(torch, name))
    return torch.from_numpy(np.array(array, copy=True))


async def write_torch(fs: Any, path: str, source: Source, advance: Callable[[int], None]) -> None:
    """One ``torch.save`` of the whole state dict (torch writes it in one go)."""
    torch = _torch()
    values = await source.read([spec.name for spec in source.specs])
    state = {name: _to_torch(torch, value) for name, value in values.items()}

    def work() -> None:
        with fs.open(path, "wb") as stream:
            torch.save(state, stream)

    await anyio.to_thread.run_sync(work)
    advance(sum(spec.nbytes for spec in source.specs))


def check_safetensors_dtypes(specs: Sequence[Spec]) -> None:
    unsupported = [f"{s.name} ({s.dtype})" for s in specs if s.dtype not in _ST_NAMES]
    if unsupported:
        raise hinted(
            UnsupportedError(
                f"safetensors cannot hold {', '.join(unsupported[:5])}"
                + (f" and {len(unsupported) - 5} more" if len(unsupported) > 5 else "")
            ),
            'drop them with --name-map (a JSON object {"name": null}), or convert to tf',
        )


async def write_safetensors(
    fs: Any,
    path: str,
    specs: Sequence[Spec],
    source: Source,
    budget: int,
    advance: Callable[[int], None],
) -> int:
    """Stream ``specs`` into one safetensors file: header first, then data batch by batch."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": _ST_NAMES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    stream = await anyio.to_thread.run_sync(fs.open, path, "wb")
    try:
        await anyio.to_thread.run_sync(stream.write, struct.pack("<Q", len(text)) + text)
        for group in batches(specs, budget):
            if len(group) == 1 and group[0].nbytes > budget and group[0].shape:
                await _write_in_rows(stream, group[0], source, budget, advance)
                continue
            values = await source.read([spec.name for spec in group])
            for spec in group:
                data = np.ascontiguousarray(values.pop(spec.name), dtype=spec.dtype)
                await _write_array(stream, data)
                advance(spec.nbytes)
    finally:
        await anyio.to_thread.run_sync(stream.close)
    return 8 + len(text) + offset


async def _write_array(stream: Any, data: np.ndarray[Any, Any]) -> None:
    await anyio.to_thread.run_sync(
        stream.write, memoryview(cast(Any, data.reshape(-1).view(np.uint8)))
    )


async def _write_in_rows(
    stream: Any, spec: Spec, source: Source, budget: int, advance: Callable[[int], None]
) -> None:
    """A tensor larger than the budget, a block of rows at a time (one row at least)."""
    rows = spec.shape[0]
    row_bytes = math.prod(spec.shape[1:]) * spec.dtype.itemsize
    step = max(1, budget // max(1, row_bytes))
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        block = await source.read_rows(spec.name, start, stop)
        data = np.ascontiguousarray(block, dtype=spec.dtype)
        if data.shape != (stop - start, *spec.shape[1:]):
            raise CorruptCheckpointError(
                f"tensor {spec.name!r}: rows {start}:{stop} came back as {data.shape}"
            )
        await _write_array(stream, data)
        advance((stop - start) * row_bytes)
