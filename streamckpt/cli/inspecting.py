"""``ls``, ``inspect`` and ``cat``: what is there, read without reading tensor data.

Rule: these commands read indexes and, for ``cat``, only the bytes of the part asked for; a
directory listing is one listing plus one index tail per checkpoint, read concurrently.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import anyio
import numpy as np

import streamckpt
import streamckpt.sync
from streamckpt.cli._output import Output, hinted, human
from streamckpt.cli._where import check_url, filesystem, protocol_of
from streamckpt.errors import CheckpointNotFoundError, NamingError

# TensorFlow's manager and ours name the state file "checkpoint" and our metrics sidecar so
_STATE_FILE = "checkpoint"
_METRICS_FILE = "checkpoint.metrics.json"
_SHARD = re.compile(r"^(?P<prefix>.*)\.data-\d{5}-of-\d{5}$")
_STEP = re.compile(r"-(\d+)$")
_CONCURRENT_INDEXES = 8


def prefix_arg(text: str) -> str:
    """A checkpoint prefix as given, forgiving a trailing ``.index``."""
    return text[: -len(".index")] if text.endswith(".index") else text


def cmd_ls(args: argparse.Namespace, out: Output) -> int:
    target = prefix_arg(args.target)
    check_url(target)
    if protocol_of(target) is None and os.path.isfile(target + ".index"):
        # a local prefix needs no fsspec (its import alone outweighs the rest of `ls`)
        return _ls_tensors(target, args, out)
    fs, path = filesystem(target)
    if fs.exists(path + ".index"):
        return _ls_tensors(target, args, out)
    if fs.isdir(path):
        return _ls_directory(target, fs, path, args, out)
    raise hinted(
        CheckpointNotFoundError(f"no checkpoint or directory at {target}"),
        "pass a directory of checkpoints, or a prefix such as run/ckpt-1000",
    )


def _ls_tensors(prefix: str, args: argparse.Namespace, out: Output) -> int:
    listed = streamckpt.sync.list_tensors(prefix)  # a local index: no event loop
    infos = [
        e
        for e in sorted(listed.values(), key=lambda e: e.name)
        if args.filter is None or fnmatch.fnmatchcase(e.name, args.filter)
    ]
    rows: list[dict[str, Any]] = [
        {
            "name": e.name,
            "dtype": e.tf_dtype.name,
            "shape": list(e.shape),
            "shard": e.shard,
            "offset": e.offset,
            "bytes": e.size,
            "partitioned": e.is_partitioned,
        }
        for e in infos
    ]
    out.document({"prefix": prefix, "tensors": rows})
    for row in rows:
        kind = "  partitioned" if row["partitioned"] else ""
        out.line(
            f"{row['name']}\t{row['dtype']}\t{row['shape']}\tshard={row['shard']}\t"
            f"{human(row['bytes'])}{kind}"
        )
    return 0


@dataclass
class _Listed:
    name: str  # as in the directory: ckpt-7
    index_bytes: int = 0
    data_bytes: int = 0
    mtime: float | None = None
    tensors: int | None = None
    in_state: bool = False
    metrics: dict[str, float] = field(default_factory=dict)


def _ls_directory(target: str, fs: Any, path: str, args: argparse.Namespace, out: Output) -> int:
    listed: dict[str, _Listed] = {}
    files: dict[str, dict[str, Any]] = {}
    for detail in fs.ls(path, detail=True):
        base = str(detail["name"]).rstrip("/").rsplit("/", 1)[-1]
        files[base] = detail
    for base, detail in files.items():
        shard = _SHARD.match(base)
        if base.endswith(".index"):
            entry = listed.setdefault(base[: -len(".index")], _Listed(base[: -len(".index")]))
            entry.index_bytes = int(detail.get("size") or 0)
            entry.mtime = _mtime(detail)
        elif shard:
            entry = listed.setdefault(shard["prefix"], _Listed(shard["prefix"]))
            entry.data_bytes += int(detail.get("size") or 0)
    listed = {name: e for name, e in listed.items() if e.index_bytes}  # half-written: skipped
    latest = _read_state(target, listed) if _STATE_FILE in files else None
    rule = None
    if _METRICS_FILE in files:
        rule = _read_metrics(fs, f"{path.rstrip('/')}/{_METRICS_FILE}", listed)
    anyio.run(_count_tensors, target, list(listed.values()))

    order = sorted(listed.values(), key=lambda e: (_step(e.name) is None, _step(e.name), e.name))
    if latest is None and order:
        latest = max(order, key=lambda e: (e.mtime or 0.0, _step(e.name) or -1)).name
    if args.best:
        best = _best_kept(order, args.best, args.mode, 1, required=True)
    elif rule is not None:  # the manager's own keep-best rule, from its sidecar
        best = _best_kept(order, *rule, required=False)
    else:
        best = set()
    rows: list[dict[str, Any]] = [
        {
            "prefix": _join(target, e.name),
            "step": _step(e.name),
            "tensors": e.tensors,
            "bytes": e.index_bytes + e.data_bytes,
            "time": _iso(e.mtime),
            "newest": e.name == latest,
            "best": e.name in best,
            "in_state_file": e.in_state,
            "metrics": e.metrics,
        }
        for e in order
    ]
    out.document({"directory": target, "checkpoints": rows})
    if not rows:
        out.line(f"no checkpoints in {target}")
    for row in rows:
        flags = [f for f in ("newest", "best") if row[f]]
        metrics = " ".join(f"{k}={v:g}" for k, v in sorted(row["metrics"].items()))
        out.line(
            f"{row['prefix']}\tstep={row['step'] if row['step'] is not None else '-'}\t"
            f"{row['tensors']} tensors\t{human(row['bytes'])}\t{row['time'] or '-'}\t"
            f"{','.join(flags) or '-'}" + (f"\t{metrics}" if metrics else "")
        )
    return 0


def _read_state(target: str, listed: dict[str, _Listed]) -> str | None:
    """The state file's newest checkpoint, marking the ones it lists (TF's manager's view)."""

    async def view() -> tuple[list[str], str | None]:
        manager = streamckpt.CheckpointManager(streamckpt.Checkpoint(), target, max_to_keep=None)
        await manager.reload()
        return manager.checkpoints, manager.latest_checkpoint

    listed_paths, latest = anyio.run(view)
    for listed_path in listed_paths:
        name = listed_path.replace("\\", "/").rsplit("/", 1)[-1]
        if name in listed:
            listed[name].in_state = True
    return None if latest is None else latest.replace("\\", "/").rsplit("/", 1)[-1]


def _read_metrics(fs: Any, path: str, listed: dict[str, _Listed]) -> tuple[str, str, int] | None:
    """Fill in each checkpoint's metrics; return the manager's keep-best rule if written."""
    try:
        document = json.loads(fs.cat_file(path))
        by_path = document["checkpoints"]
        for name, metrics in by_path.items():
            entry = listed.get(str(name).replace("\\", "/").rsplit("/", 1)[-1])
            if entry is not None:
                entry.metrics = {str(k): float(v) for k, v in metrics.items()}
        best = document.get("best")
        if isinstance(best, dict) and best.get("mode") in ("min", "max"):
            return str(best["metric"]), str(best["mode"]), max(1, int(best.get("keep", 1)))
    except (ValueError, KeyError, TypeError, AttributeError):
        pass  # metrics are a bonus: a sidecar we cannot read only leaves the column empty
    return None


async def _count_tensors(target: str, entries: list[_Listed]) -> None:
    limiter = anyio.CapacityLimiter(_CONCURRENT_INDEXES)

    async def count(entry: _Listed) -> None:
        async with limiter:
            try:
                async with streamckpt.open(_join(target, entry.name)) as reader:
                    entry.tensors = len(reader.entries)
            except streamckpt.StreamCkptError:
                entry.tensors = None  # listed with "None tensors"; verify says why

    async with anyio.create_task_group() as tg:
        for entry in entries:
            tg.start_soon(count, entry)


def _best_kept(
    entries: list[_Listed], metric: str, mode: str, keep: int, *, required: bool
) -> set[str]:
    """The ``keep`` best by ``metric``, as the manager ranks them.

    Ties go to the newer (later in ``entries``); NaN never ranks.
    """
    scored = [
        (value if mode == "min" else -value, -order, e.name)
        for order, e in enumerate(entries)
        if (value := e.metrics.get(metric)) is not None and not math.isnan(value)
    ]
    if not scored and required:
        raise NamingError(f"no checkpoint in this directory has a metric named {metric!r}")
    return {name for _, _, name in sorted(scored)[:keep]}


def _join(directory: str, name: str) -> str:
    return f"{directory.rstrip('/')}/{name}"


def _step(name: str) -> int | None:
    match = _STEP.search(name)
    return int(match.group(1)) if match else None


def _mtime(detail: dict[str, Any]) -> float | None:
    for key in ("mtime", "updated", "LastModified", "last_modified", "created"):
        value = detail.get(key)
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, datetime.datetime):
            return value.timestamp()
        if isinstance(value, str):
            try:
                return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return None


def _iso(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return datetime.datetime.fromtimestamp(seconds).astimezone().isoformat(timespec="seconds")


def cmd_inspect(args: argparse.Namespace, out: Output) -> int:
    prefix = prefix_arg(args.prefix)
    check_url(prefix)

    async def report() -> dict[str, Any]:
        async with streamckpt.open(prefix) as reader:
            header = reader.header
            per_shard: dict[int, int] = {}
            for entry in reader.entries.values():
                per_shard[entry.shard] = per_shard.get(entry.shard, 0) + entry.size
            return {
                "uri": reader.uri,
                "num_shards": header.num_shards,
                "endianness": "big" if header.big_endian else "little",
                "version": {"producer": header.producer, "min_consumer": header.min_consumer},
                "num_tensors": len(reader.entries),
                "tensor_bytes": sum(per_shard.values()),
                "bytes_per_shard": {str(k): v for k, v in sorted(per_shard.items())},
            }

    document = anyio.run(report)
    # inspect's result is a JSON document either way
    print(json.dumps(document, indent=2))
    return 0


def cmd_cat(args: argparse.Namespace, out: Output) -> int:
    prefix = prefix_arg(args.prefix)
    check_url(prefix)

    async def read() -> tuple[streamckpt.TensorInfo, np.ndarray[Any, Any]]:
        async with streamckpt.open(prefix, load_index=False) as reader:
            info = await reader.info(args.name)
            if args.index is not None:
                _check_index(args.index, info.shape, args.name)
            return info, await reader.read(args.name, index=args.index)

    info, value = anyio.run(read)
    printable = printable_array(value)
    if out.json:
        out.document(
            {
                "name": args.name,
                "dtype": info.tf_dtype.name,
                "shape": list(value.shape),
                "values": printable.tolist(),
            }
        )
        return 0
    with np.printoptions(threshold=args.max_items, edgeitems=3):
        print(printable if printable.ndim else printable[()])
    return 0


def _check_index(index: tuple[Any, ...], shape: tuple[int, ...], name: str) -> None:
    """Refuse an index that does not fit ``shape``, as numpy would, without allocating."""
    probe = np.lib.stride_tricks.as_strided(np.zeros(1, np.int8), shape, (0,) * len(shape))
    try:
        probe[index]
    except IndexError as exc:  # numpy's own words, and which tensor
        exc.add_note(f"tensor {name!r} has shape {list(shape)}")
        raise


def printable_array(value: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Values as people read them: strings decoded, bfloat16 and float8 as floats."""
    if value.dtype == object:
        flat = [_text(x) for x in value.reshape(-1)]
        texts = np.empty(len(flat), dtype=object)
        texts[:] = flat
        if all(isinstance(t, str) for t in flat):
            return np.array(flat, dtype=str).reshape(value.shape)
        return texts.reshape(value.shape)
    if value.dtype.kind == "V":  # ml_dtypes: bfloat16, float8 print as floats, int4 as ints
        if "int" in value.dtype.name:
            return value.astype(np.uint8 if value.dtype.name.startswith("u") else np.int8)
        return value.astype(np.float32)
    return value


def _text(element: Any) -> Any:
    if isinstance(element, bytes | np.bytes_):
        try:
            return bytes(element).decode("utf-8")
        except UnicodeDecodeError:
            return bytes(element)
    return element
