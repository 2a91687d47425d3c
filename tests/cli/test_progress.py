"""Progress bars: on stderr, only for a terminal, only for work big enough, never with -q."""

from __future__ import annotations

import io

import pytest

from streamckpt.cli._output import PROGRESS_MIN_BYTES, Output


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("terminal", "quiet", "total", "drawn"),
    [
        (True, False, PROGRESS_MIN_BYTES, True),
        (True, True, PROGRESS_MIN_BYTES, False),
        (False, False, PROGRESS_MIN_BYTES, False),
        (True, False, PROGRESS_MIN_BYTES - 1, False),
    ],
)
def test_bar_only_when_it_helps(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    terminal: bool,
    quiet: bool,
    total: int,
    drawn: bool,
) -> None:
    stderr = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr("sys.stderr", stderr)
    with Output(quiet=quiet).progress("copying", total) as advance:
        for _ in range(4):
            advance(total // 4)
    assert ("copying" in stderr.getvalue()) == drawn
    assert capsys.readouterr().out == ""  # never on stdout
