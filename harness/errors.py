"""Errors a user can fix: one line, rank 0 only, no traceback (``--debug`` / ``SCALEMAE_DEBUG=1`` shows it).

``UserError`` (a ``SystemExit`` subclass, so that ``main(args)`` called from Python still stops with the message)
and the data/config/checkpoint/output errors are *diagnoses*: :func:`run` prints them as ``error: <one line>`` on
rank 0 and exits with status 2 (1 for a non-finite loss, 130 for Ctrl-C). Anything else is a bug and keeps its
traceback. :class:`ArgumentParser` makes argparse's errors one line too, naming the closest flag of a typo.
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
import traceback
from typing import Any, Callable, Optional, Sequence

from util import dist as dist_util
from util.checkpoint import CheckpointError
from util.io import OutputWriteError
from harness.run_control import LATEST, LockRefused, release_output_lock

__all__ = ["UserError", "DEBUG_ENV", "ArgumentParser", "run", "report_error", "debug_enabled", "is_rank0",
           "cleanup_quietly", "require", "check_positive"]

DEBUG_ENV = "SCALEMAE_DEBUG"


class UserError(SystemExit):
    """A diagnosis for the user (bad flag, file, data or checkpoint): printed as one line, no traceback.

    A ``SystemExit`` so that ``main(args)`` called from Python or a test stops with the message too.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class Terminated(KeyboardInterrupt):
    """SIGTERM in a launcher run with ``run(..., interrupted=...)`` (one that stops at once, keeping what it
    finished: the inference launchers); training launchers stop at a step instead (``StopRequest``)."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated()


def _user_error_types() -> tuple:
    from dataloaders.config import ConfigError
    from dataloaders.errors import DataError

    return (UserError, ConfigError, DataError, CheckpointError, OutputWriteError, LockRefused, FileNotFoundError,
            NotADirectoryError, IsADirectoryError, PermissionError, ValueError)


def is_rank0() -> bool:
    """Rank 0 of the process group, else of the launcher's environment (``RANK``), else True."""
    if dist_util.is_dist_avail_and_initialized():
        return dist_util.is_main_process()
    return os.environ.get("RANK", "0") in ("0", "")


def _one_line(text: str) -> str:
    parts = [p.strip() for p in str(text).strip().splitlines() if p.strip()]
    return "; ".join(parts) if parts else "(no message)"


def report_error(message: str) -> None:
    """Print ``error: <message>`` as one line on stderr, on rank 0 only."""
    if is_rank0():
        sys.stdout.flush()
        dist_util.ORIGINAL_PRINT(f"error: {_one_line(message)}", file=sys.stderr, flush=True)


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line (rank 0 only), exit status 2 as argparse's: a mistyped
    flag names the closest flag instead of printing the whole usage. Every launcher and tool parses with it."""

    def error(self, message: str) -> None:  # type: ignore[override]
        import difflib

        prefix = "unrecognized arguments: "
        if message.startswith(prefix):
            flags = [t for t in message[len(prefix):].split() if t.startswith("-")]
            known = [s for s in self._option_string_actions if s.startswith("--")]
            hints = []
            for flag in flags or message[len(prefix):].split()[:1]:
                close = difflib.get_close_matches(flag.split("=")[0], known, n=1, cutoff=0.6)
                hints.append(f"{flag} (did you mean {close[0]}?)" if close else flag)
            message = f"unknown flag{'s' if len(hints) > 1 else ''} {', '.join(hints)}"
        report_error(f"{message} (--help lists every flag)")
        raise SystemExit(2)


def debug_enabled(args: Optional[argparse.Namespace] = None) -> bool:
    """``--debug`` or the environment variable ``SCALEMAE_DEBUG`` (not empty/0): show tracebacks."""
    env = os.environ.get(DEBUG_ENV, "")
    return bool(getattr(args, "debug", False)) or env not in ("", "0", "false", "False")


def run(main: Callable[[argparse.Namespace], Any], parser: argparse.ArgumentParser,
        argv: Optional[Sequence[str]] = None, interrupted: Optional[str] = None) -> Any:
    """Command-line entry point of a launcher: parse ``argv``, run ``main(args)``, report user errors.

    User errors (``UserError``, ``SystemExit("message")``, config/data/checkpoint errors, ``ValueError``, missing
    files) become one ``error: ...`` line on rank 0 and exit status 2; a non-finite loss exits with 1 (the
    launcher's ``training_run`` prints it). With ``--debug`` or ``SCALEMAE_DEBUG=1`` the traceback is printed
    before the line. ``interrupted``: what the Ctrl-C line says is kept and how to resume (default: the training
    launchers' checkpoint); given, SIGTERM also stops at once with that line (exit 143), for launchers whose
    finished work is kept as it goes (the inference launchers' blocks). Returns ``main``'s result.
    """
    args = parser.parse_args(argv)
    previous = None
    if interrupted is not None and threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate)  # SIGTERM stops at once too, with the same line
    try:
        return main(args)
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            raise
        _report(exc, str(exc.code), args)
        raise SystemExit(2) from None
    except KeyboardInterrupt as exc:
        how = "stopped by SIGTERM" if isinstance(exc, Terminated) else "interrupted (Ctrl-C)"
        _report(exc, f"{how}: stopped at once; " + (
            interrupted or f"{LATEST} in --output_dir holds the last complete save (saves are atomic), rerun the "
                           f"same command to resume from it"), args)
        raise SystemExit(128 + signal.SIGTERM if isinstance(exc, Terminated) else 130) from None
    except _user_error_types() as exc:
        _report(exc, str(exc) or type(exc).__name__, args)
        raise SystemExit(2) from None
    except Exception:
        if is_rank0() or dist_util.is_dist_avail_and_initialized():
            traceback.print_exc()
        cleanup_quietly()
        raise SystemExit(1) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        release_output_lock()


def _report(exc: BaseException, message: str, args: argparse.Namespace) -> None:
    """The one ``error:`` line (rank 0), preceded by the traceback with ``--debug`` / ``SCALEMAE_DEBUG=1``."""
    if debug_enabled(args) and is_rank0():
        traceback.print_exception(exc)
    report_error(message)
    cleanup_quietly()


def cleanup_quietly() -> None:
    """Tear the process group down, ignoring errors (the run is already failing or stopping)."""
    try:
        dist_util.cleanup(wait_for_all=False)
    except Exception:  # noqa: BLE001 - already failing; the first error is the one to report
        pass


def require(condition: bool, message: str) -> None:
    """Raise ``UserError(message)`` unless ``condition``."""
    if not condition:
        raise UserError(message)


def check_positive(args: argparse.Namespace, *names: str, allow_zero: Sequence[str] = ()) -> None:
    """Every flag of ``names`` (unset ``None`` skipped, lists checked element-wise) must be > 0 (>= 0 for
    ``allow_zero``)."""
    for name in names:
        value = getattr(args, name, None)
        if value is None:
            continue
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            ok = v >= 0 if name in allow_zero else v > 0
            if not ok or (isinstance(v, float) and not math.isfinite(v)):
                bound = ">= 0" if name in allow_zero else "> 0"
                raise UserError(f"--{name} {v}: must be {bound}")
