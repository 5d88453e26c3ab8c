"""What keeps a training run's output folder its own and lets a cluster stop it cleanly.

* :class:`OutputLock` -- one training run per output folder: ``<output_dir>/run.lock`` holds the host, PID, boot id,
  start time and command line of the run that owns the folder. A second run refuses before it touches anything;
  the lock of a dead process on this host (or of an earlier boot, or of an earlier start of the same requeued SLURM
  job) is taken over with a warning; a lock of another host is refused (remove the file if that run is dead).
  Released when the run ends.
  :func:`take_output_lock` / :func:`release_output_lock` hold this process's one lock (released at exit).
* :class:`StopRequest` -- SIGTERM and SIGUSR1 (SLURM ``--signal=USR1@90`` before preemption or the time limit,
  torchrun's elastic stop) set a flag instead of killing the process. The engine reads it at its existing sync
  points (every rank agrees on the same step), the launcher saves a resumable checkpoint and exits with
  :data:`EXIT_PREEMPTED` (75, ``EX_TEMPFAIL``): rerunning the same command continues at that step. Ctrl-C is not
  caught: it stops at once, and ``checkpoint-latest.pth`` keeps the last complete save (every save is atomic).
"""
from __future__ import annotations

import atexit
import datetime
import json
import os
import shlex
import signal
import socket
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any, Optional

from util import dist as dist_util

__all__ = ["EXIT_PREEMPTED", "LATEST", "LOCK_NAME", "OutputLock", "LockRefused", "StopRequest", "take_output_lock",
           "release_output_lock"]

LATEST = "checkpoint-latest.pth"  # the file a training run resumes from
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by a signal after a resumable save; rerun the same command
LOCK_NAME = "run.lock"
STOP_SIGNALS = ("SIGTERM", "SIGUSR1")


class LockRefused(RuntimeError):
    """Another run owns the output folder (one line)."""


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _slurm_start() -> Optional[str]:
    """``<job id>.<restart count>`` under SLURM: a requeued job keeps its ID and counts its restarts."""
    job = os.environ.get("SLURM_JOB_ID")
    return f"{job}.{os.environ.get('SLURM_RESTART_COUNT', '0')}" if job else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


class OutputLock:
    """``<folder>/run.lock`` owned by this process (see the module docstring). ``acquire()`` prints one warning line
    when it takes over a stale lock and raises :class:`LockRefused` when another live run holds the folder."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / LOCK_NAME
        self.held = False

    def _record(self) -> dict[str, Any]:
        return {"host": socket.gethostname(), "pid": os.getpid(), "boot_id": _boot_id(),
                "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]), "slurm": _slurm_start()}

    def _read(self) -> Optional[dict]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def acquire(self) -> None:
        from util.io import atomic_write_text

        record = json.dumps(self._record(), indent=1) + "\n"
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                owner = self._read()
                if owner is None:
                    print(f"WARNING: {self.path} is unreadable (a run killed while creating it?): taking it over")
                    self.path.unlink(missing_ok=True)
                    continue
                self._check_owner(owner)  # raises when the owner may still run
                atomic_write_text(self.path, record)  # stale: take it over
                if (self._read() or {}).get("pid") != os.getpid():
                    continue  # another starter took it over at the same moment: look again
                self.held = True
                return
            with os.fdopen(fd, "w") as fh:
                fh.write(record)
            self.held = True
            return
        raise LockRefused(f"--output_dir {self.path.parent}: could not take {self.path} (several runs start at once "
                          f"in this folder?)")

    def _check_owner(self, owner: dict) -> None:
        host, pid = str(owner.get("host", "?")), owner.get("pid")
        command = str(owner.get("command", "?"))
        who = (f"PID {pid} on host {host}, started {owner.get('started', '?')}: "
               f"{command if len(command) <= 160 else command[:157] + '...'}")
        earlier, now = str(owner.get("slurm") or ""), _slurm_start()
        if now and earlier and earlier != now and earlier.split(".")[0] == now.split(".")[0]:
            print(f"WARNING: taking over {self.path}: it was held by an earlier start of this SLURM job ({who})")
            return
        if host != socket.gethostname():
            raise LockRefused(f"--output_dir {self.path.parent} is used by a run on another host ({who}); if that "
                              f"run is dead, delete {self.path} and rerun, else choose another --output_dir")
        same_boot = not owner.get("boot_id") or owner.get("boot_id") == _boot_id()
        if isinstance(pid, int) and pid == os.getpid():
            return  # an earlier run in this same process (main() called twice from Python)
        if isinstance(pid, int) and same_boot and _alive(pid):
            raise LockRefused(f"--output_dir {self.path.parent} is used by another run ({who}); wait for it to "
                              f"end or choose another --output_dir")
        why = "has ended" if same_boot else "ran before this machine restarted"
        print(f"WARNING: taking over {self.path}: the run that held it ({who}) {why}")

    def release(self) -> None:
        """Remove the lock file if this process still owns it."""
        if self.held and (self._read() or {}).get("pid") == os.getpid():
            try:
                self.path.unlink()
            except OSError:
                pass
        self.held = False


class StopRequest:
    """A flag set by SIGTERM/SIGUSR1 (the handlers are installed by ``install()``, main thread only, and restored by
    ``restore()``). ``signal_name`` is the local request (this rank); ``agreed`` is set by the engine once the
    ranks' collective verdict says some rank was asked to stop (the same step on every rank)."""

    def __init__(self) -> None:
        self.signal_name: Optional[str] = None
        self.agreed = False
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def flag(self) -> float:
        """1.0 when this rank was asked to stop, for a collective verdict (a max or a sum over ranks)."""
        return 1.0 if self.requested else 0.0

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            sys.stderr.write(f"{self.signal_name} received: stopping at the end of this step\n")
            sys.stderr.flush()

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for name in STOP_SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            try:
                signal.signal(sig, handler)
            except (ValueError, OSError):
                pass
        self._previous.clear()


_LOCK: Optional[OutputLock] = None


def release_output_lock() -> None:
    """Give up this process's lock of its output folder (at exit; ``harness.run`` calls it, and ``atexit``)."""
    global _LOCK
    if _LOCK is not None:
        _LOCK.release()
        _LOCK = None


atexit.register(release_output_lock)


def take_output_lock(out_dir: Path) -> None:
    """Rank 0 takes ``out_dir/run.lock``; every rank learns whether it was refused (one collective under DDP), so
    that all stop together with rank 0's one line (:class:`LockRefused`, a user error)."""
    global _LOCK
    refused: Optional[LockRefused] = None
    if dist_util.is_main_process():
        release_output_lock()
        lock = OutputLock(out_dir)
        try:
            lock.acquire()
            _LOCK = lock
        except LockRefused as err:
            refused = err
    if dist_util.get_world_size() > 1:
        if dist_util.all_reduce_means([1.0 if refused else 0.0])[0] > 0 and refused is None:
            raise LockRefused(f"--output_dir {out_dir} is used by another run (rank 0 says which)")
    if refused is not None:
        raise refused
