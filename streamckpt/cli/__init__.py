"""The ``streamckpt`` command line: ls, inspect, cat, verify, diff, cp, convert, demo.

Rules:

- only the public API (``streamckpt``, ``streamckpt.sync``, ``streamckpt.errors``) is used;
- startup stays fast: this module imports argparse and nothing heavy; each command's module
  (and numpy, anyio, fsspec with it) is imported only once that command runs;
- every failure ends as one or two lines on stderr and an exit code (see ``--help``); a
  traceback only with ``--debug``. Printing rules are in :mod:`streamckpt.cli._output`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from streamckpt.cli._args import add_commands
from streamckpt.cli._output import (
    CORRUPT,
    EXIT_CODES_HELP,
    INTERNAL,
    INTERRUPTED,
    STORAGE,
    USAGE,
    Output,
)

__all__ = ["build_parser", "main"]

_DESCRIPTION = """\
Inspect, check, copy and convert TensorFlow v2 checkpoints (PREFIX.index +
PREFIX.data-NNNNN-of-NNNNN) on local disk or any fsspec URL (gs://, s3://, ...).
"""


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as two lines instead of the whole usage text."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message}\n  see: {self.prog} --help\n")
        sys.exit(USAGE)


def build_parser() -> argparse.ArgumentParser:
    import streamckpt

    parser = _Parser(
        prog="streamckpt",
        description=_DESCRIPTION,
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"streamckpt {streamckpt.__version__}",
        help="print version",
    )
    add_commands(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns its exit code (``streamckpt --help`` lists them)."""
    args = build_parser().parse_args(argv)
    out = Output(json=args.json, quiet=args.quiet, debug=args.debug)
    _route_logging(debug=args.debug)
    try:
        _check_urls(args)
        module = importlib.import_module(f"streamckpt.cli.{args.module}")
        code: int = getattr(module, args.function)(args, out)
        sys.stdout.flush()
    except BrokenPipeError:
        # the reader (``| head``) has all it wanted; stop quietly, with no flush error at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        if out.debug:
            raise
        print("streamckpt: interrupted", file=sys.stderr)
        return INTERRUPTED
    except Exception as exc:
        if out.debug:
            raise
        return _report(exc, out, args)
    return code


def _check_urls(args: argparse.Namespace) -> None:
    """Refuse unusable URLs before the command's module (numpy, the pipeline) is imported."""
    from streamckpt.cli._where import check_url

    for name in args.reads:
        check_url(getattr(args, name))
    if args.writes:
        check_url(getattr(args, args.writes), writing=True)


class _OneLine(logging.Formatter):
    """A log record as one line: no traceback (``--debug`` shows those)."""

    def format(self, record: logging.LogRecord) -> str:
        return f"streamckpt: {record.levelname.lower()}: {record.getMessage()}"


def _route_logging(*, debug: bool) -> None:
    """Warnings of streamckpt as one line each; backends' log noise only with ``--debug``."""
    handler = logging.StreamHandler(sys.stderr)
    if debug:
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(_OneLine())
        handler.addFilter(lambda record: record.name.startswith("streamckpt"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.WARNING)


def _report(exc: Exception, out: Output, args: argparse.Namespace) -> int:
    """Print ``exc`` as one or two lines (and as JSON with ``--json``); its exit code."""
    message, hint, code = explain(exc, command=args.command)
    print(f"streamckpt: {message}", file=sys.stderr)
    if hint:
        print(f"  {hint}", file=sys.stderr)
    if out.json:
        error: dict[str, Any] = {"type": type(exc).__name__, "message": message, "code": code}
        if hint:
            error["hint"] = hint
        out.document({"error": error})
    return code


def explain(exc: BaseException, *, command: str) -> tuple[str, str | None, int]:
    """(message, hint, exit code) for any failure of a command.

    The hint is the error's first note (the command line adds them where it knows what to
    do), else what is usually the way out of an error of that class.
    """
    from streamckpt import errors

    notes = getattr(exc, "__notes__", None) or []
    name = type(exc).__name__
    if isinstance(exc, errors.StreamCkptError):
        message = f"{str(exc).replace('(pass overwrite=True)', '(add --overwrite)')} [{name}]"
        hint, code = _ways_out(exc)
        return message, notes[0] if notes else hint, code
    note = notes[0] if notes else None
    if isinstance(exc, IndexError):  # numpy's words for an index that does not fit
        return f"{exc}" + (f" ({note})" if note else ""), None, USAGE
    if isinstance(exc, FileNotFoundError | IsADirectoryError | NotADirectoryError):
        return f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), note, USAGE
    if isinstance(exc, PermissionError):
        return f"permission denied: {exc.filename or exc}", note, STORAGE
    if isinstance(exc, OSError):
        return f"storage error: {exc}", note, STORAGE
    return (
        f"unexpected {name}: {exc}",
        "this is a bug in streamckpt: rerun with --debug and report the traceback",
        INTERNAL,
    )


def _ways_out(exc: BaseException) -> tuple[str | None, int]:
    from streamckpt import errors

    if isinstance(exc, errors.CheckpointNotFoundError):
        return "a checkpoint is PREFIX.index + PREFIX.data-*: pass PREFIX", USAGE
    if isinstance(exc, errors.CheckpointExistsError):
        return "add --overwrite to replace it, or choose another destination", USAGE
    if isinstance(exc, errors.TensorNotFoundError):
        return "streamckpt ls PREFIX lists the tensors", USAGE
    if isinstance(exc, errors.CorruptCheckpointError):
        return "streamckpt verify PREFIX lists every damaged tensor", CORRUPT
    if isinstance(exc, errors.PermissionDeniedError):
        return "check the credentials or file permissions", STORAGE
    if isinstance(exc, errors.StorageError):
        return None, STORAGE
    return None, USAGE  # UnsupportedError, NamingError: what was asked cannot be done


if __name__ == "__main__":
    sys.exit(main())
