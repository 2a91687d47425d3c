"""``convert``: between a TF checkpoint, safetensors, a Hugging Face directory and torch.

Rules:

- the formats come from the names (``.safetensors``, ``.pt``/``.pth``/``.bin``, a directory
  with ``model.safetensors.index.json`` or a DST ending in ``/``, else a TF prefix), or from
  ``--from`` / ``--to``;
- names and dtypes are kept (bfloat16 included); ``--name-map`` renames (``null`` drops);
  TensorFlow's object graph (``_CHECKPOINTABLE_OBJECT_GRAPH``) is not a weight and is
  dropped when writing a format that holds numbers only;
- safetensors, Hugging Face and TF outputs are streamed under ``--budget-mib`` (a single
  larger tensor is held whole); a TF output gets each tensor as a ``streamckpt.Deferred``,
  read from SRC when the save writes it; a torch output is written in one call of
  ``torch.save``, which takes every tensor at once.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from typing import Any

import anyio

import streamckpt
import streamckpt.cli._formats as formats
from streamckpt.cli._output import Output, hinted, human
from streamckpt.cli._where import check_url, filesystem, must_exist, writing_to
from streamckpt.cli.inspecting import prefix_arg
from streamckpt.errors import CheckpointExistsError, CheckpointNotFoundError, NamingError

MiB = 1 << 20
_OBJECT_GRAPH = "_CHECKPOINTABLE_OBJECT_GRAPH"
_TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def source_format(src: str, given: str | None) -> str:
    if given:
        return given
    fs, path = filesystem(src)
    if src.endswith((".safetensors", *_TORCH_SUFFIXES)):
        must_exist(src)
        return "safetensors" if src.endswith(".safetensors") else "torch"
    if fs.exists(f"{path.rstrip('/')}/{formats.HF_INDEX}"):
        return "hf"
    if fs.exists(prefix_arg(path) + ".index"):
        return "tf"
    raise hinted(
        CheckpointNotFoundError(
            f"no checkpoint, safetensors, torch file or Hugging Face directory at {src}"
        ),
        "pass an existing SRC, or name its format with --from",
    )


def destination_format(dst: str, given: str | None) -> str:
    if given:
        return given
    if dst.endswith(".safetensors"):
        return "safetensors"
    if dst.endswith(_TORCH_SUFFIXES):
        return "torch"
    if dst.endswith("/"):
        return "hf"
    return "tf"


def read_name_map(path: str | None) -> dict[str, str | None]:
    if path is None:
        return {}
    fs, inner = filesystem(path)
    try:
        document = json.loads(fs.cat_file(inner))
    except FileNotFoundError:
        raise hinted(
            CheckpointNotFoundError(f"no such name map: {path}"),
            'give --name-map a JSON file such as {"old/name": "new/name"}',
        ) from None
    except ValueError as exc:
        raise NamingError(f"name map {path} is not JSON: {exc}") from None
    if not isinstance(document, dict) or not all(
        isinstance(v, str | None) for v in document.values()
    ):
        raise NamingError(
            f"name map {path} must be a JSON object of names to new names (or null to drop)"
        )
    return {str(k): v for k, v in document.items()}


def renamed(
    specs: list[formats.Spec], name_map: dict[str, str | None], out: Output
) -> list[tuple[formats.Spec, str]]:
    """(spec as read, name to write) for every tensor kept."""
    unknown = sorted(set(name_map) - {spec.name for spec in specs})
    if unknown:
        out.note(f"the name map names {len(unknown)} tensor(s) SRC does not hold: {unknown[:3]}")
    kept = []
    seen: dict[str, str] = {}
    for spec in specs:
        new = name_map.get(spec.name, spec.name)
        if new is None:
            continue
        if new in seen:
            raise NamingError(f"{spec.name!r} and {seen[new]!r} would both be named {new!r}")
        seen[new] = spec.name
        kept.append((spec, new))
    return kept


class _Renamed:
    """A source whose tensors are read under their old names and handed out under new ones."""

    def __init__(self, source: formats.Source, pairs: list[tuple[formats.Spec, str]]) -> None:
        self.source = source
        self.old_of = {new: spec.name for spec, new in pairs}
        self.specs = [formats.Spec(new, spec.dtype, spec.shape) for spec, new in pairs]

    async def read(self, names: Any) -> dict[str, Any]:
        values = await self.source.read([self.old_of[name] for name in names])
        return {name: values[self.old_of[name]] for name in names}

    def fetch(self, name: str) -> Any:
        return self.source.fetch(self.old_of[name])

    async def read_rows(self, name: str, start: int, stop: int) -> Any:
        return await self.source.read_rows(self.old_of[name], start, stop)

    def deferred(self) -> dict[str, streamckpt.Deferred]:
        """Every tensor as a value the save fetches when it writes it, one at a time."""
        return {
            spec.name: streamckpt.Deferred(spec.shape, spec.dtype, partial(self.fetch, spec.name))
            for spec in self.specs
        }


def cmd_convert(args: argparse.Namespace, out: Output) -> int:
    src = args.src if args.src.endswith("/") else prefix_arg(args.src)
    check_url(src)
    check_url(args.dst, writing=True)
    kind_in = source_format(src, args.src_format)
    kind_out = destination_format(args.dst, args.dst_format)
    name_map = read_name_map(args.name_map)
    started = time.perf_counter()
    report = anyio.run(_convert, src, args.dst, kind_in, kind_out, name_map, args, out)
    report.update(src=src, src_format=kind_in, seconds=time.perf_counter() - started)
    out.document(report)
    out.line(
        f"converted {report['tensors']} tensors ({human(report['bytes'])}) from {kind_in} "
        f"{src} to {kind_out} {report['dst']} in {report['seconds']:.2f} s"
    )
    return 0


async def _convert(
    src: str,
    dst: str,
    kind_in: str,
    kind_out: str,
    name_map: dict[str, str | None],
    args: argparse.Namespace,
    out: Output,
) -> dict[str, Any]:
    fs_in, path_in = filesystem(src)
    if kind_in == "tf":
        async with streamckpt.open(src) as reader:
            return await _write(
                formats.CheckpointSource(reader), dst, kind_out, name_map, args, out
            )
    if kind_in == "safetensors":
        source: formats.Source = formats.SafetensorsSource(fs_in, [path_in])
    elif kind_in == "hf":
        source = formats.SafetensorsSource(fs_in, formats.hf_files(fs_in, path_in))
    else:
        source = formats.load_torch(fs_in, path_in)
    return await _write(source, dst, kind_out, name_map, args, out)


async def _write(
    source: formats.Source,
    dst: str,
    kind_out: str,
    name_map: dict[str, str | None],
    args: argparse.Namespace,
    out: Output,
) -> dict[str, Any]:
    specs = source.specs
    if kind_out != "tf" and _OBJECT_GRAPH in {s.name for s in specs}:
        name_map = {_OBJECT_GRAPH: None, **name_map}
    renamed_source = _Renamed(source, renamed(specs, name_map, out))
    specs = renamed_source.specs
    total = sum(spec.nbytes for spec in specs)
    budget = args.budget_mib * MiB
    fs, path = filesystem(dst)
    if (
        kind_out != "tf"
        and not args.overwrite
        and fs.exists(path.rstrip("/") + (f"/{formats.HF_INDEX}" if kind_out == "hf" else ""))
    ):
        raise CheckpointExistsError(f"{dst} already exists (add --overwrite to replace it)")
    with out.progress("converting", total) as advance, writing_to(dst):
        if kind_out == "tf":
            # the save holds at most about the budget of fetched tensors at once
            info = await streamckpt.save(
                dst,
                renamed_source.deferred(),
                num_shards=args.shards,
                overwrite=args.overwrite,
                max_inflight_bytes=budget,
                progress=advance,
            )
            files = list(info.files)
            dst = info.prefix
        elif kind_out == "safetensors":
            formats.check_safetensors_dtypes(specs)
            _make_parent(fs, path)
            await formats.write_safetensors(fs, path, specs, renamed_source, budget, advance)
            files = [dst]
        elif kind_out == "hf":
            formats.check_safetensors_dtypes(specs)
            files = await _write_hf(fs, path, specs, renamed_source, budget, args, advance)
        else:
            _make_parent(fs, path)
            await formats.write_torch(fs, path, renamed_source, advance)
            files = [dst]
    return {
        "src_format": "",
        "dst": dst,
        "dst_format": kind_out,
        "tensors": len(specs),
        "bytes": total,
        "files": files,
    }


def _make_parent(fs: Any, path: str) -> None:
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)


async def _write_hf(
    fs: Any,
    directory: str,
    specs: list[formats.Spec],
    source: formats.Source,
    budget: int,
    args: argparse.Namespace,
    advance: Any,
) -> list[str]:
    """``model-0000i-of-0000N.safetensors`` files of at most --max-shard-mib, and the index."""
    directory = directory.rstrip("/")
    fs.makedirs(directory, exist_ok=True)
    limit = args.max_shard_mib * MiB
    groups: list[list[formats.Spec]] = []
    held = 0
    for spec in specs:
        if not groups or (groups[-1] and held + spec.nbytes > limit):
            groups.append([])
            held = 0
        groups[-1].append(spec)
        held += spec.nbytes
    groups = groups or [[]]
    weight_map: dict[str, str] = {}
    files = []
    for number, group in enumerate(groups, start=1):
        name = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        await formats.write_safetensors(fs, f"{directory}/{name}", group, source, budget, advance)
        weight_map.update({spec.name: name for spec in group})
        files.append(f"{directory}/{name}")
    index = {
        "metadata": {"total_size": sum(spec.nbytes for spec in specs)},
        "weight_map": weight_map,
    }
    fs.pipe_file(f"{directory}/{formats.HF_INDEX}", json.dumps(index, indent=2).encode())
    files.append(f"{directory}/{formats.HF_INDEX}")
    return files
