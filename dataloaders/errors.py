"""Exception types raised by the data layer.

Every message names the offending file (or folder / config key) and, where it applies, what was expected
and what was found, so that a failing run can be fixed without a debugger.
"""
from __future__ import annotations


class DataError(RuntimeError):
    """A data file or folder exists but cannot be used (corrupt, empty, wrong band count, ...)."""


class MissingDataError(DataError, FileNotFoundError):
    """A file or folder the data configuration points to does not exist."""
