"""Running a launcher as its ``__main__`` does, for the tests of what a user sees."""
from __future__ import annotations

import argparse
from typing import Any, Callable

import pytest

import harness


def one_error_line(capsys: Any, main: Callable[[argparse.Namespace], Any], parser: argparse.ArgumentParser,
                   argv: list[str]) -> str:
    """``harness.run(main, parser, argv)`` must end with exit status 2 and print exactly one ``error:`` line and no
    traceback; returns that line."""
    with pytest.raises(SystemExit) as exc:
        harness.run(main, parser, argv)
    captured = capsys.readouterr()
    text = (captured.out + captured.err).strip()
    lines = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert exc.value.code == 2 and "Traceback" not in text and len(lines) == 1, text
    return lines[0]
