"""Every command's arguments, each with help text; argparse only, so ``--help`` is instant.

Rule: arguments are checked here as far as their text allows (positive counts, a well-formed
``--index``), so that a command starts only with values it can use.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

_INT = r"[+-]?\d+"
_SLICE = re.compile(rf"^({_INT})?:({_INT})?(?::({_INT})?)?$")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def parse_index(text: str) -> tuple[Any, ...]:
    """A numpy-style index from text: ``"0:10,...,3"``, ``"5"``, ``"[::2, -1]"``."""
    body = text.strip()
    if body.startswith("[") and body.endswith("]"):
        body = body[1:-1]
    if not body.strip():
        raise argparse.ArgumentTypeError(f"empty index {text!r}")
    parts: list[Any] = []
    for raw in body.split(","):
        item = raw.strip()
        match = _SLICE.match(item)
        if item == "...":
            parts.append(Ellipsis)
        elif re.fullmatch(_INT, item):
            parts.append(int(item))
        elif match:
            start, stop, step = (None if g is None else int(g) for g in match.groups())
            if step == 0:
                raise argparse.ArgumentTypeError(f"slice step cannot be zero in {text!r}")
            parts.append(slice(start, stop, step))
        else:
            raise argparse.ArgumentTypeError(
                f"cannot read {item!r} in {text!r}: use integers, slices start:stop:step and "
                '"...", separated by commas, e.g. "0:10,...,3"'
            )
    if parts.count(Ellipsis) > 1:
        raise argparse.ArgumentTypeError(f'at most one "..." in an index, got {text!r}')
    return tuple(parts)


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--json", action="store_true", help="print one JSON document on stdout and nothing else"
    )
    common.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bars and no notes on stderr"
    )
    common.add_argument(
        "--debug", action="store_true", help="show the Python traceback of a failure"
    )
    return common


def _budget(parser: argparse.ArgumentParser, *, larger: str = "read in chunks") -> None:
    parser.add_argument(
        "--budget-mib",
        type=positive_int,
        default=256,
        metavar="MIB",
        help=f"bytes of tensor data held in memory at once, in MiB (default: 256; a single "
        f"larger tensor is {larger})",
    )


def add_commands(parser: argparse.ArgumentParser) -> None:
    """The subcommands, each pointing at the module and function that runs it."""
    common = [_common()]
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, module: str, text: str, *, reads: tuple[str, ...] = (), writes: str = ""
    ) -> argparse.ArgumentParser:
        # reads / writes: the arguments holding URLs, checked before the command's imports
        p = sub.add_parser(name, help=text, description=text, parents=common)
        p.set_defaults(module=module, function=f"cmd_{name}", reads=reads, writes=writes)
        return p

    ls = command(
        "ls",
        "inspecting",
        "list the checkpoints of a directory (step, tensors, bytes, time, newest, best), "
        "or the tensors of one checkpoint",
        reads=("target",),
    )
    ls.add_argument("target", metavar="DIR|PREFIX", help="a directory, or a checkpoint prefix")
    ls.add_argument(
        "--filter", metavar="GLOB", help='only tensors whose name matches, e.g. "layers/*/kernel"'
    )
    ls.add_argument(
        "--best",
        metavar="METRIC",
        help="in a managed directory: mark the checkpoint with the best value of this metric",
    )
    ls.add_argument(
        "--mode",
        choices=("min", "max"),
        default="min",
        help="whether the best --best value is the smallest (default) or the largest",
    )

    inspect = command(
        "inspect", "inspecting", "header, tensor count and bytes per shard", reads=("prefix",)
    )
    inspect.add_argument("prefix", metavar="PREFIX", help="checkpoint prefix (path or URL)")

    cat = command(
        "cat",
        "inspecting",
        "print one tensor, or part of it, as numpy prints it",
        reads=("prefix",),
    )
    cat.add_argument("prefix", metavar="PREFIX", help="checkpoint prefix (path or URL)")
    cat.add_argument("name", metavar="NAME", help="tensor name, as streamckpt ls prints it")
    cat.add_argument(
        "--index",
        type=parse_index,
        metavar="INDEX",
        help='numpy-style index, e.g. "0:10,...,3"; only those bytes are read',
    )
    cat.add_argument(
        "--max-items",
        type=positive_int,
        default=1000,
        metavar="N",
        help="summarise arrays with more elements than this (default: 1000)",
    )

    verify = command(
        "verify",
        "checking",
        "read every tensor, check every crc32c, report every failure",
        reads=("prefix",),
    )
    verify.add_argument("prefix", metavar="PREFIX", help="checkpoint prefix (path or URL)")
    _budget(verify)

    diff = command(
        "diff",
        "checking",
        "compare two checkpoints tensor by tensor: max abs and rel difference, count differing",
        reads=("a", "b"),
    )
    diff.add_argument("a", metavar="A", help="first checkpoint prefix")
    diff.add_argument("b", metavar="B", help="second checkpoint prefix")
    diff.add_argument(
        "--atol",
        type=non_negative_float,
        default=0.0,
        help="absolute tolerance: elements within atol + rtol*|b| are equal (default: 0)",
    )
    diff.add_argument(
        "--rtol", type=non_negative_float, default=0.0, help="relative tolerance (default: 0)"
    )
    _budget(diff)

    cp = command(
        "cp",
        "copying",
        "copy a checkpoint, e.g. from local disk to gs://",
        reads=("src",),
        writes="dst",
    )
    cp.add_argument("src", metavar="SRC", help="source checkpoint prefix")
    cp.add_argument("dst", metavar="DST", help="destination prefix (not memory://)")
    _shards_and_overwrite(cp, default="as many as SRC has, laid out as in SRC")
    _budget(cp)

    convert = command(
        "convert",
        "converting",
        "convert between a TF checkpoint, a .safetensors file, a Hugging Face sharded "
        "safetensors directory and a torch state dict (.pt/.bin)",
        reads=("src",),
        writes="dst",
    )
    convert.add_argument("src", metavar="SRC", help="what to read (format from its name)")
    convert.add_argument("dst", metavar="DST", help="what to write (format from its name)")
    formats = ("tf", "safetensors", "hf", "torch")
    convert.add_argument(
        "--from", dest="src_format", choices=formats, help="format of SRC, when its name is unclear"
    )
    convert.add_argument(
        "--to", dest="dst_format", choices=formats, help="format of DST, when its name is unclear"
    )
    convert.add_argument(
        "--name-map",
        metavar="FILE.json",
        help='rename tensors: a JSON object {"old name": "new name"}; names not in it stay',
    )
    convert.add_argument(
        "--max-shard-mib",
        type=positive_int,
        default=5120,
        metavar="MIB",
        help="largest file of a Hugging Face directory, in MiB (default: 5120)",
    )
    _shards_and_overwrite(convert)
    _budget(
        convert,
        larger="written in blocks of rows to safetensors, fetched alone for TF; a torch output "
        "is written from memory at once",
    )

    demo = command("demo", "copying", "save a sample model, load it back, read part of a tensor")
    demo.add_argument("--dir", help="directory to write to (default: a temporary one, removed)")
    demo.add_argument(
        "--size-mib", type=positive_int, default=256, help="model size in MiB (default: 256)"
    )
    demo.add_argument(
        "--shards", type=positive_int, default=4, help="data files to write (default: 4)"
    )
    demo.add_argument("--keep", action="store_true", help="keep the files written")


def _shards_and_overwrite(
    parser: argparse.ArgumentParser,
    *,
    default: str = "about 64 MiB each on S3 and GCS, one elsewhere",
) -> None:
    parser.add_argument(
        "--shards",
        type=positive_int,
        default=None,
        metavar="N",
        help=f"data files to write (default: {default})",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a checkpoint already at DST"
    )
