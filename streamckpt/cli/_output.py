"""What the command line prints, and where.

Rules:

- stdout carries the result only: text for people, or with ``--json`` exactly one JSON
  document (also on failure: ``{"error": {...}}``), never progress and never warnings;
- stderr carries errors (one or two lines: what is wrong, and what to do), and progress bars,
  which show only when stderr is a terminal, ``--quiet`` is off and the work is big enough;
- every failure ends in one of the exit codes below, and a traceback only with ``--debug``;
- every error raised on purpose is one of :mod:`streamckpt.errors`; what to do about it rides
  along as the exception's note (:func:`hinted`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

OK = 0
DIFFERENT = 1  # diff found differences, verify found failures
USAGE = 2  # bad arguments, no such checkpoint / tensor / file, what cannot be done (a URL ...)
CORRUPT = 3  # a checkpoint or file that breaks its format
STORAGE = 4  # the storage failed: permission, network, disk full
INTERNAL = 70  # a bug: an error nobody raised on purpose
INTERRUPTED = 130

EXIT_CODES_HELP = """\
exit codes:
  0    success
  1    differences found (diff) or verification failures (verify)
  2    usage error, no such checkpoint, tensor or file, or what cannot be done
       (an unknown URL protocol, a missing extra, memory:// as a destination, a dtype
       the destination format cannot hold)
  3    corrupt checkpoint or file
  4    storage error (permission denied, cannot write there, network, disk full)
  70   a bug in streamckpt (rerun with --debug and report it)
  130  interrupted
"""

E = TypeVar("E", bound=BaseException)

# Below this many bytes of work, no progress bar: it would only flicker.
PROGRESS_MIN_BYTES = 32 << 20


def hinted(error: E, hint: str) -> E:
    """``error`` with a line that says what to do: an exception note, printed under it."""
    error.add_note(hint)
    return error


def human(nbytes: float) -> str:
    """Bytes as people read them: ``812 B``, ``1.5 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{int(nbytes)} B" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


@dataclass
class Output:
    """The options every command shares, and the printing they govern."""

    json: bool = False
    quiet: bool = False
    debug: bool = False

    def line(self, text: str = "") -> None:
        """One line of the human-readable result (nothing in ``--json`` mode)."""
        if not self.json:
            print(text)

    def document(self, value: Any) -> None:
        """The one JSON document of ``--json`` mode."""
        if self.json:
            print(json.dumps(value, indent=2, default=_jsonable))

    def note(self, text: str) -> None:
        """A side remark for people, on stderr (silenced by ``--quiet``)."""
        if not self.quiet:
            print(f"streamckpt: {text}", file=sys.stderr)

    @contextmanager
    def progress(self, description: str, total: int | None) -> Iterator[Callable[[int], None]]:
        """A callback taking byte counts, drawn as a bar on stderr when that helps.

        The library calls it from worker threads; rich's progress is thread-safe.
        """
        wanted = (
            not self.quiet
            and sys.stderr.isatty()
            and (total is None or total >= PROGRESS_MIN_BYTES)
        )
        if not wanted:
            yield _ignore
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        bar = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        task = bar.add_task(description, total=total)

        def advance(nbytes: int) -> None:
            bar.advance(task, nbytes)  # takes rich's own lock

        with bar:
            yield advance


def _ignore(nbytes: int) -> None:
    del nbytes


def _jsonable(value: Any) -> Any:
    """JSON for numpy scalars and the like."""
    item = getattr(value, "item", None)
    if callable(item):
        return item()
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return str(value)
