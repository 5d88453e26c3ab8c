"""Exception types raised by the data layer.

Every message names the offending file (or folder / config key) and, where it applies, what was expected
and what was found, so that a failing run can be fixed without a debugger. Messages are one line; a
:class:`DataError` raised inside a DataLoader worker (which torch re-raises in the main process with the
worker's whole traceback in the message) still prints as that one line plus ``(in DataLoader worker N)``.
"""
from __future__ import annotations

import re

_WORKER_HEAD = re.compile(r"Caught \w+ in (DataLoader worker process \d+)")
_EXC_LINE = re.compile(r"^[\w.]*(?:Error|Exception)\w*: (.+)$")


def one_line(text: str) -> str:
    """The one-line form of a data error message (see the module docstring); other text is returned as is."""
    if "Original Traceback" not in text:
        return text
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    match = _EXC_LINE.match(lines[-1].strip())
    if not match:
        return text
    where = _WORKER_HEAD.search(lines[0])
    return match.group(1) + (f" (in {where.group(1)})" if where else "")


class DataError(RuntimeError):
    """A data file or folder exists but cannot be used (corrupt, empty, wrong band count, ...)."""

    def __str__(self) -> str:
        return one_line(super().__str__())


class MissingDataError(DataError, FileNotFoundError):
    """A file or folder the data configuration points to does not exist."""

    def __str__(self) -> str:
        return one_line(FileNotFoundError.__str__(self))
