"""The project's one routine for writing a file so that readers only ever see the old or the new content.

``atomic_write(path, write)`` writes into a temporary file in the same folder (``.<name>.<random>.tmp``), flushes
and fsyncs it, moves it over ``path`` with ``os.replace`` and fsyncs the folder. Whatever happens meanwhile (an
exception, Ctrl-C, SIGKILL, a full disk, power loss after the rename), ``path`` holds either its previous complete
content or the new complete content; an exception removes the temporary file. ``link_atomic(src, dst)`` gives an
existing file a second name the same way (a hard link, or a copy where the file system has none).

Output-folder failures (``ENOSPC``/``EDQUOT`` disk full, ``EROFS`` read-only, ``ENOENT``/``ENOTDIR`` the folder
vanished, ``EACCES``/``EPERM`` not writable) become an :class:`OutputWriteError`: one line naming the folder and,
for a full disk, the free space and the space the file needs.

Test hook (fault injection, never set in normal use): the environment variable ``SCALEMAE_FAULT=<stage>:<n>``
makes the process SIGKILL itself at ``<stage>`` of its ``n``-th write (1-based) of a ``*checkpoint-*.pth`` file, or
of files matching ``<glob>`` with ``SCALEMAE_FAULT=<stage>:<n>:<glob>``. The stages, in order: ``before_temp``
(nothing created yet), ``mid_write`` (the temporary file is partly written), ``before_rename`` (written and
fsynced, not renamed), ``after_rename`` (renamed, folder not yet fsynced); ``link`` is the one stage of
``link_atomic`` (the keeper's verified-state bookkeeping). In-process tests replace :func:`fault_point` instead
(e.g. to raise an exception there).
"""
from __future__ import annotations

import errno
import fnmatch
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Optional

__all__ = ["atomic_write", "atomic_write_text", "link_atomic", "fsync_dir", "OutputWriteError", "fault_point",
           "FAULT_ENV", "STAGES", "human_size", "TEMP_SUFFIX"]

FAULT_ENV = "SCALEMAE_FAULT"
STAGES = ("before_temp", "mid_write", "before_rename", "after_rename", "link")
TEMP_SUFFIX = ".tmp"
# errors of the output folder rather than of the program: reported as one line
_FOLDER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENOENT, errno.ENOTDIR, errno.EACCES, errno.EPERM}
_writes: dict[str, int] = {}  # fault hook: writes per stage seen so far in this process


class OutputWriteError(RuntimeError):
    """A file could not be written because of its folder (full, read-only, gone, not writable); one line."""


def human_size(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def fault_point(stage: str, path: Path) -> None:
    """Test hook (see the module docstring): SIGKILL this process at ``stage`` of the chosen write."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    want, _, rest = spec.partition(":")
    count, _, pattern = rest.partition(":")
    if want != stage or not fnmatch.fnmatch(path.name, pattern or "*checkpoint-*.pth"):
        return
    _writes[stage] = _writes.get(stage, 0) + 1
    if str(_writes[stage]) == count.strip():
        os.kill(os.getpid(), signal.SIGKILL)


def fsync_dir(directory: Path) -> None:
    """fsync a folder (its entries: a rename survives power loss). No-op where folders cannot be opened."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _folder_error(err: OSError, path: Path, size: Optional[int]) -> OutputWriteError:
    """The one-line diagnosis of an output-folder ``OSError`` while writing ``path``."""
    folder = path.parent
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = human_size(shutil.disk_usage(folder).free)
        except OSError:
            free = "unknown"
        need = f"; the file needs about {human_size(size)}" if size else ""
        what = "no space left on device" if err.errno == errno.ENOSPC else "disk quota exceeded"
        kept = f"; {path.name} keeps its previous content" if path.is_file() else ""
        return OutputWriteError(f"cannot write {path.name} in {folder}: {what} ({free} free{need}){kept}; free "
                                f"space there or choose another output folder")
    if err.errno == errno.EROFS:
        return OutputWriteError(f"cannot write {path.name} in {folder}: the file system is read-only; choose "
                                f"another output folder")
    if err.errno in (errno.ENOENT, errno.ENOTDIR):
        return OutputWriteError(f"cannot write {path.name} in {folder}: the folder no longer exists (removed or "
                                f"unmounted while the run was writing)")
    return OutputWriteError(f"cannot write {path.name} in {folder}: permission denied ({err.strerror})")


class _Tracked:
    """A binary file proxy that counts bytes and reaches the ``mid_write`` fault point after the first write."""

    def __init__(self, fh: IO[bytes], path: Path) -> None:
        self._fh, self._path, self.written = fh, path, 0
        self.error: Optional[OSError] = None  # a serialiser may swallow it (torch's zip writer does)

    def write(self, data: Any) -> int:
        try:
            n = self._fh.write(data)
        except OSError as err:
            self.error = err
            raise
        first = self.written == 0
        self.written += n
        if first and n:
            self._fh.flush()
            fault_point("mid_write", self._path)
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], *, by_name: bool = False,
                 size_hint: Optional[int] = None) -> Path:
    """Atomically (re)write ``path`` with ``write`` and return the path (see the module docstring).

    ``write(fh)`` gets a binary file object; with ``by_name=True`` it gets the temporary file's name instead (for
    libraries that open files themselves: rasterio, safetensors, GeoPandas). The file gets the permissions of a
    plain ``open()`` (0666 minus the umask). ``size_hint`` (bytes) is what a disk-full error says the file needs
    (default: the bytes written when it failed, or the previous file's size). Raises :class:`OutputWriteError`
    for output-folder errors; anything ``write`` raises propagates. The temporary file never survives an error.
    """
    path = Path(path)
    fault_point("before_temp", path)
    tmp: Optional[str] = None
    written = 0
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # by name: keep the extension last (``.x.gpkg.abc.tmp.gpkg``), libraries pick the format from it
        suffix = TEMP_SUFFIX + (path.suffix if by_name else "")
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name.lstrip('.')}.", suffix=suffix)
        if by_name:  # a fresh name for the library to create (some refuse an existing empty file)
            os.close(fd)
            os.unlink(tmp)
            write(tmp)
            os.chmod(tmp, 0o666 & ~_umask())
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            fault_point("mid_write", path)
        else:
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; as a plain open()
            with os.fdopen(fd, "wb") as fh:
                tracked = _Tracked(fh, path)
                try:
                    write(tracked)
                except BaseException:
                    if tracked.error is not None:  # the real cause, e.g. ENOSPC, not the serialiser's follow-up
                        written = tracked.written
                        raise tracked.error from None
                    raise
                written = tracked.written
                fh.flush()
                os.fsync(fh.fileno())
        fault_point("before_rename", path)
        os.replace(tmp, path)
        tmp = None
        fault_point("after_rename", path)
        fsync_dir(path.parent)
    except OSError as err:
        _remove_quietly(tmp)
        if err.errno in _FOLDER_ERRNOS and _is_folder_error(err, path):
            if size_hint is None:
                size_hint = written or (path.stat().st_size if path.is_file() else None)
            raise _folder_error(err, path, size_hint) from None
        raise
    except BaseException:
        _remove_quietly(tmp)
        raise
    return path


def _is_folder_error(err: OSError, path: Path) -> bool:
    """An errno of the folder family that concerns the output (not, say, a missing input file read by ``write``)."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        return True
    names = {os.fspath(n) for n in (err.filename, err.filename2) if n is not None}
    return not names or any(os.path.dirname(os.path.abspath(n)) == os.path.abspath(path.parent) or
                            os.path.abspath(n) == os.path.abspath(path.parent) for n in names)


def _remove_quietly(name: Optional[str]) -> None:
    if name is None:
        return
    try:
        os.unlink(name)
    except OSError:
        pass


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """``atomic_write`` of a UTF-8 text file."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda fh: fh.write(data), size_hint=len(data))


def link_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Give the file ``src`` the (new or replaced) name ``dst`` atomically: a hard link under a temporary name moved
    over ``dst``; a copy (``atomic_write``) where hard links are not supported. ``src`` is left as it is."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name.lstrip('.')}.{os.getpid()}.link{TEMP_SUFFIX}")
    try:
        _remove_quietly(str(tmp))
        try:
            os.link(src, tmp)
        except OSError as err:
            if err.errno not in (errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            with open(src, "rb") as fh_src:
                return atomic_write(dst, lambda fh: shutil.copyfileobj(fh_src, fh, 1 << 22),
                                    size_hint=src.stat().st_size)
        fault_point("link", dst)
        os.replace(tmp, dst)
        fsync_dir(dst.parent)
    except OSError as err:
        _remove_quietly(str(tmp))
        if err.errno in _FOLDER_ERRNOS and _is_folder_error(err, dst):
            raise _folder_error(err, dst, src.stat().st_size if src.is_file() else None) from None
        raise
    except BaseException:
        _remove_quietly(str(tmp))
        raise
    return dst
