"""Checkpoint saving and loading.

* ``save_checkpoint`` writes atomically (``util.io.atomic_write``): a crash, a signal, a full disk or an exception
  while serialising never leaves a half-written file in place of an older good one.
* ``load_checkpoint`` always uses ``torch.load(weights_only=True)``. Checkpoints written by the original
  Scale-MAE/MAE scripts pickle the whole ``argparse.Namespace`` (sometimes with ``pathlib`` paths inside);
  those few classes are allow-listed, and the loaded ``args`` is converted to a plain dict. Any other
  non-tensor global is refused with an error naming the file and the global; there is no fallback to
  ``weights_only=False``.
* New checkpoints store ``args`` as a plain dict (``args_to_plain``), so they load without any allow-list.

File layout written by the training scripts: ``{'model', 'optimizer', 'epoch', 'scaler', 'args'}`` in
``checkpoint-{epoch}.pth`` and ``checkpoint-latest.pth`` inside the output directory.
"""
from __future__ import annotations

import argparse
import enum
import os
import pathlib
import pickle
import re
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "tensor_bytes",
    "args_to_plain",
    "load_checkpoint",
    "find_latest_checkpoint",
    "url_cache_path",
    "describe_state_dict_mismatch",
    "strip_module_prefix",
]

LATEST_NAME = "checkpoint-latest.pth"
_EPOCH_RE = re.compile(r"^checkpoint-(\d+)\.pth$")

# Classes that checkpoints of the original scripts may contain besides tensors and builtins.
_PATH_CLASSES = (pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath, pathlib.PureWindowsPath, pathlib.Path,
                 pathlib.PurePath)
_SAFE_GLOBALS: list[Any] = [argparse.Namespace, *_PATH_CLASSES]
# Python >= 3.13 pickles paths as ``pathlib._local.X``; map those names onto this interpreter's classes.
_SAFE_GLOBALS += [(cls, f"pathlib._local.{cls.__name__}") for cls in _PATH_CLASSES
                  if cls.__module__ != "pathlib._local"]


class CheckpointError(RuntimeError):
    """A checkpoint could not be read or does not have the expected content."""


# --------------------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------------------
def tensor_bytes(obj: Any) -> int:
    """Bytes of all tensors in a (nested) checkpoint: about the size ``torch.save`` writes."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def save_checkpoint(obj: Any, path: str | os.PathLike) -> Path:
    """Atomically ``torch.save`` ``obj`` to ``path`` (``util.io.atomic_write``: temporary file, fsync,
    ``os.replace``, folder fsync) and return the path. On any failure the temporary file is removed and a previous
    file at ``path`` is left untouched; a full, read-only or vanished folder is a one-line
    ``util.io.OutputWriteError`` that names the folder and the checkpoint's size. A top-level ``'args'`` entry that
    is an ``argparse.Namespace`` is stored as a plain dict so the file loads with ``weights_only=True``.
    """
    from util.io import atomic_write

    if isinstance(obj, Mapping) and isinstance(obj.get("args"), argparse.Namespace):
        obj = {**obj, "args": args_to_plain(obj["args"])}
    return atomic_write(path, lambda fh: torch.save(obj, fh), size_hint=tensor_bytes(obj) or None)


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, argparse.Namespace):
        return {str(k): _plain(v) for k, v in vars(value).items()}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return [_plain(v) for v in items]
    if isinstance(value, (torch.device, torch.dtype)):
        return str(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():  # numpy scalar
        return value.item()
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy / torch arrays
        return value.tolist()
    return repr(value)


def args_to_plain(args: argparse.Namespace | Mapping[str, Any] | None) -> dict[str, Any]:
    """Convert parsed arguments to a dict of plain data (str/int/float/bool/None, lists, dicts).

    Paths become strings, tuples and sets become lists, devices/dtypes become strings, numpy/torch scalars
    become Python numbers; anything else is stored as its ``repr``. The result loads with ``weights_only=True``.
    """
    if args is None:
        return {}
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    if not isinstance(args, Mapping):
        raise TypeError(f"args_to_plain expects an argparse.Namespace or a mapping, got {type(args).__name__}")
    return {str(k): _plain(v) for k, v in args.items()}


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------
def _url_checks(fragment: str) -> dict[str, str]:
    """``sha256=<hex>`` and ``size=<bytes>`` entries of a URL fragment (``...ckpt.pth#sha256=ab12...&size=123``)."""
    checks = {}
    for key, values in urllib.parse.parse_qs(fragment).items():
        if key in ("sha256", "size") and values:
            checks[key] = values[-1].strip().lower()
    return checks


def _verify_download(path: Path, checks: Mapping[str, str], url: str) -> None:
    if "size" in checks and str(path.stat().st_size) != checks["size"]:
        raise CheckpointError(f"{url}: the file has {path.stat().st_size} bytes, the URL says size={checks['size']}")
    if "sha256" in checks:
        import hashlib

        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        if not digest.hexdigest().startswith(checks["sha256"]):
            raise CheckpointError(f"{url}: SHA-256 {digest.hexdigest()} does not match sha256={checks['sha256']}")


def url_cache_path(url: str) -> Path:
    """Where an http(s) checkpoint is cached: ``$TORCH_HOME/hub/checkpoints/<hash of the full URL>-<file name>``
    (the whole URL, query included, so two URLs with the same file name never share a cache entry)."""
    parsed = urllib.parse.urlparse(url)
    key = hashlib_sha256(urllib.parse.urlunparse(parsed._replace(fragment="")))[:16]
    name = os.path.basename(urllib.parse.unquote(parsed.path)) or "checkpoint.pth"
    return Path(torch.hub.get_dir()) / "checkpoints" / f"{key}-{name}"


def hashlib_sha256(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _check_checkpoint_bytes(path: Path, url: str) -> None:
    """``CheckpointError`` unless the file starts like a checkpoint (a torch zip archive, a legacy pickle, or a
    safetensors header): a URL that serves an HTML page or text (a login page, a "file not found" page, a Git LFS
    pointer) is named as such."""
    with open(path, "rb") as fh:
        head = fh.read(512)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80") or head[8:9] == b"{":
        return
    text = head.decode("utf-8", "replace").strip()
    kind = "an HTML page" if text[:200].lower().lstrip("\ufeff").startswith(("<!doctype html", "<html")) else "text"
    first = " ".join(text.split())[:60]
    raise CheckpointError(f"{url} serves {kind} ({first!r}...), not a checkpoint; nothing was cached (check the "
                          f"URL: a release-asset or 'resolve' download link, not the page that shows it)")


def _resolve_source(path_or_url: str | os.PathLike, progress: bool) -> Path:
    """Turn a path, ``file://`` URL or ``http(s)://`` URL (downloaded to the torch hub cache, keyed by the full URL
    and verified against ``#sha256=...``/``#size=...`` when the URL carries them) into a local path."""
    text = os.fspath(path_or_url)
    parsed = urllib.parse.urlparse(text)
    scheme = parsed.scheme.lower()
    if scheme in ("http", "https"):
        checks = _url_checks(parsed.fragment)
        cached = url_cache_path(text)
        cached.parent.mkdir(parents=True, exist_ok=True)
        if cached.exists():
            try:
                _verify_download(cached, checks, text)
                _check_checkpoint_bytes(cached, text)
            except CheckpointError:
                cached.unlink()  # a stale or tampered cache entry (or a page an older version cached): download again
        if not cached.exists():
            try:
                torch.hub.download_url_to_file(urllib.parse.urlunparse(parsed._replace(fragment="")), str(cached),
                                               progress=progress)
            except Exception as e:
                raise CheckpointError(f"could not download checkpoint {text}: {type(e).__name__}: {e}") from e
            try:
                _verify_download(cached, checks, text)
                _check_checkpoint_bytes(cached, text)
            except CheckpointError:
                cached.unlink()  # never cached: the next run downloads again
                raise
        return cached
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise CheckpointError(f"file URL {text} names a remote host {parsed.netloc!r}; only local files work")
        return Path(urllib.request.url2pathname(parsed.path))
    return Path(text)


# modules whose globals a weights_only checkpoint may legitimately name (tensor rebuilding, containers, the
# original's pickled Namespace/paths); anything else is reported as the reason for refusing the file
_EXPECTED_MODULES = ("torch", "collections", "argparse", "pathlib", "builtins", "_codecs", "numpy")
_HARMLESS_BUILTINS = {"set", "frozenset", "bytearray", "bytes", "dict", "list", "tuple", "int", "float", "complex",
                      "bool", "str", "slice", "range", "object"}


def _pickle_globals(path: Path) -> list[str]:
    """``module.name`` of every GLOBAL / STACK_GLOBAL in a checkpoint's pickle(s), read without unpickling
    (zip format: ``*/data.pkl``; legacy format: the leading pickles of the stream)."""
    import io
    import pickletools
    import zipfile

    streams: list[bytes] = []
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                streams = [zf.read(n) for n in zf.namelist() if n.endswith("data.pkl")]
        else:
            streams = [path.read_bytes()]
    except (OSError, zipfile.BadZipFile):
        return []
    found: list[str] = []
    for raw in streams:
        buf = io.BytesIO(raw)
        for _ in range(4):  # legacy: magic number, protocol, sys info, then the object
            strings: list[str] = []
            try:
                for op, arg, _pos in pickletools.genops(buf):
                    if op.name == "GLOBAL":
                        found.append(str(arg).replace(" ", "."))
                    elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                        found.append(f"{strings[-2]}.{strings[-1]}")
                    elif isinstance(arg, str) and "UNICODE" in op.name:
                        strings.append(arg)
            except Exception:  # noqa: BLE001 - a damaged stream: report what was found so far
                break
            if buf.tell() >= len(raw):
                break
    return found


def _python3_name(name: str) -> str:
    """``module.name`` as Python 3 spells it (``torch.save`` pickles with protocol 2, i.e. Python 2 names such as
    ``__builtin__.exec`` or ``commands.Popen``); ``posix.system`` is shown as ``posix.system (os.system)``."""
    import _compat_pickle

    module, _, attr = name.rpartition(".")
    if (module, attr) in _compat_pickle.NAME_MAPPING:
        module, attr = _compat_pickle.NAME_MAPPING[(module, attr)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    if module in ("posix", "nt"):
        return f"{module}.{attr} (os.{attr})"
    return f"{module}.{attr}"


def _unexpected_globals(path: Path, message: str) -> list[str]:
    names = []
    for name in map(_python3_name, _pickle_globals(path)):
        module, _, attr = name.split(" ")[0].rpartition(".")
        root = module.split(".")[0]
        if root == "builtins" and attr in _HARMLESS_BUILTINS:
            continue
        if root in _EXPECTED_MODULES and root != "builtins":
            continue
        if name not in names:
            names.append(name)
    if not names:  # fall back on torch's own wording, whatever it is
        # only a real ``module.name``: torch also names the bytes of a damaged stream (a text file: "orrupt.")
        names = list(dict.fromkeys(re.findall(r"GLOBAL ([A-Za-z_][\w.]*\.[A-Za-z_]\w*)\b", message)))
    return names


def load_checkpoint(path_or_url: str | os.PathLike, map_location: Any = "cpu", progress: bool = True) -> dict:
    """Load a checkpoint dict with ``weights_only=True`` from a path, ``file://`` or ``http(s)://`` URL.

    HTTP(S) files are cached under ``$TORCH_HOME/hub/checkpoints`` keyed by the full URL (reused when present;
    checked against ``#sha256=<hex>`` / ``#size=<bytes>`` in the URL when given). ``argparse.Namespace`` and
    ``pathlib`` paths written by the original scripts are allowed; a top-level ``args`` entry (Namespace or dict)
    is returned as a plain dict (``args_to_plain``). Raises ``FileNotFoundError`` for a missing file and
    ``CheckpointError`` (naming the file) for a truncated/corrupt file, content that is not plain data (naming the
    offending global, e.g. ``posix.system``; nothing of it is executed), or content that is not a dict.
    """
    path = _resolve_source(path_or_url, progress)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}" +
                                (f" (from {os.fspath(path_or_url)})" if os.fspath(path_or_url) != str(path) else ""))
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        text = str(e)
        if isinstance(e, pickle.UnpicklingError) and ("GLOBAL" in text or "Weights only load failed" in text):
            offending = _unexpected_globals(path, text)
            if offending:  # else no real global anywhere: a damaged stream or not a pickle at all
                raise CheckpointError(
                    f"refusing to load checkpoint {path}: its pickle calls {', '.join(offending)}, which is not "
                    f"tensor data and could run code on this machine (nothing of it was executed). Use weights from a "
                    f"trusted source, or re-save them as plain state dicts or .safetensors."
                ) from None
            text = "not a PyTorch pickle"
        first = text.strip().splitlines()[0] if text.strip() else ""
        raise CheckpointError(
            f"could not read checkpoint {path} ({path.stat().st_size} bytes): the file is truncated, corrupt or not "
            f"a PyTorch checkpoint ({type(e).__name__}: {first})"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict "
                              f"(e.g. {{'model': state_dict, ...}})")
    if isinstance(obj.get("args"), (argparse.Namespace, Mapping)):
        obj["args"] = args_to_plain(obj["args"])
    return obj


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """Checkpoint to resume from in ``output_dir``: ``checkpoint-latest.pth`` if present, else the
    ``checkpoint-{epoch}.pth`` with the highest epoch, else ``None`` (also when the directory does not exist)."""
    directory = Path(output_dir)
    if not directory.is_dir():
        return None
    latest = directory / LATEST_NAME
    if latest.is_file():
        return latest
    best: tuple[int, Path] | None = None
    for entry in directory.iterdir():
        match = _EPOCH_RE.match(entry.name)
        if match and entry.is_file():
            epoch = int(match.group(1))
            if best is None or epoch > best[0]:
                best = (epoch, entry)
    return best[1] if best else None


def strip_module_prefix(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """``state_dict`` without the ``module.`` prefix that saving a DDP-wrapped model adds to every key (returned
    as is unless every key has it)."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


# --------------------------------------------------------------------------------------------------------------
# Diagnostics
# --------------------------------------------------------------------------------------------------------------
def _shape(value: Any) -> tuple[int, ...] | None:
    shape = getattr(value, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def _listing(keys: list[str], limit: int) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... and {len(keys) - limit} more" if len(keys) > limit else "")


def describe_state_dict_mismatch(model_sd: Mapping[str, Any], ckpt_sd: Mapping[str, Any], limit: int = 20) -> str:
    """Human-readable differences between a model's state dict and a checkpoint's.

    Lists missing keys (in the model, not the checkpoint), unexpected keys (in the checkpoint, not the model) and
    shape mismatches as ``key: checkpoint (a, b) vs model (c, d)``; at most ``limit`` entries per category.
    Returns an empty string when keys and shapes agree.
    """
    missing = [k for k in model_sd if k not in ckpt_sd]
    unexpected = [k for k in ckpt_sd if k not in model_sd]
    mismatched = []
    for key, value in model_sd.items():
        if key in ckpt_sd:
            m, c = _shape(value), _shape(ckpt_sd[key])
            if m is not None and c is not None and m != c:
                mismatched.append(f"{key}: checkpoint {_fmt_shape(c)} vs model {_fmt_shape(m)}")
    parts = []
    if missing:
        parts.append(f"missing keys ({len(missing)}): {_listing(missing, limit)}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected, limit)}")
    if mismatched:
        parts.append(f"shape mismatches ({len(mismatched)}): {_listing(mismatched, limit)}")
    return "\n".join(parts)
