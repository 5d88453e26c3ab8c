"""Writing and checking split lists (``./<class>/<file>`` lines) and their SHA256SUMS files."""
from __future__ import annotations

import hashlib
import math
import os
import random
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from util.io import atomic_write_text

from .errors import DataError, MissingDataError
from .scenes import scan_image_folder

PathLike = Union[str, os.PathLike]


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def write_sha256sums(folder: PathLike, names: Sequence[str], out_name: str = "SHA256SUMS") -> Path:
    """Write ``<sha256>  <name>`` lines (``sha256sum`` format) for ``names`` inside ``folder``."""
    folder = Path(folder)
    lines = [f"{sha256_file(folder / n)}  {n}\n" for n in sorted(names)]
    out = folder / out_name
    return atomic_write_text(out, "".join(lines))


def verify_sha256sums(sums_file: PathLike) -> Dict[str, Tuple[str, str]]:
    """Check every entry of a ``sha256sum``-format file; return ``{name: (expected, got)}`` of mismatches.

    Raises:
        MissingDataError: the sums file or a listed file is missing.
        DataError: a malformed line.
    """
    sums_file = Path(sums_file)
    if not sums_file.is_file():
        raise MissingDataError(f"{sums_file}: checksum file not found")
    bad: Dict[str, Tuple[str, str]] = {}
    for lineno, line in enumerate(sums_file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(None, 1)
        if len(parts) != 2 or len(parts[0]) != 64:
            raise DataError(f"{sums_file}:{lineno}: expected '<sha256>  <file>', got {line!r}")
        expected, name = parts[0].lower(), parts[1].strip().lstrip("*")
        target = sums_file.parent / name
        if not target.is_file():
            raise MissingDataError(f"{sums_file}:{lineno}: listed file {target} not found")
        got = sha256_file(target)
        if got != expected:
            bad[name] = (expected, got)
    return bad


def split_samples(root: PathLike, val_fraction: float = 0.2, seed: int = 0,
                  is_valid_file: Optional[Callable[[str], bool]] = None) -> Tuple[List[str], List[str]]:
    """Stratified seeded split of an ImageFolder tree into (train lines, val lines), ``./<class>/<file>``.

    Each class contributes ``round(n_class * val_fraction)`` files to val (at least one if it has two or
    more files). Lines are sorted within each list.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    root = Path(root)
    samples = scan_image_folder(root, is_valid_file)
    by_class: Dict[str, List[str]] = {}
    for path, cls in samples:
        rel = Path(path).relative_to(root).as_posix()
        if any(ch in rel for ch in "\n\r"):
            raise DataError(f"{path}: file names with line breaks cannot be written to a split list")
        by_class.setdefault(cls, []).append("./" + rel)
    rng = random.Random(seed)
    train: List[str] = []
    val: List[str] = []
    for cls in sorted(by_class):
        files = sorted(by_class[cls])
        rng.shuffle(files)
        n_val = int(math.floor(len(files) * val_fraction + 0.5))
        if len(files) >= 2:
            n_val = min(max(n_val, 1), len(files) - 1)
        val.extend(files[:n_val])
        train.extend(files[n_val:])
    return sorted(train), sorted(val)


def write_split_lists(root: PathLike, val_fraction: float = 0.2, seed: int = 0,
                      train_name: str = "train.txt", val_name: str = "val.txt", checksums: bool = True,
                      is_valid_file: Optional[Callable[[str], bool]] = None) -> Tuple[Path, Path]:
    """Write ``train.txt``/``val.txt`` split lists (and ``SHA256SUMS``) into an ImageFolder root.

    Returns the paths of the two list files. The lists use ``./<class>/<file>`` lines (LF-terminated), the
    format of ``splits/`` and of the original ImageList; their root is the folder they are written to.
    """
    root = Path(root)
    train, val = split_samples(root, val_fraction, seed, is_valid_file)
    paths = []
    for name, lines in ((train_name, train), (val_name, val)):
        out = root / name
        paths.append(atomic_write_text(out, "".join(line + "\n" for line in lines)))
    if checksums:
        write_sha256sums(root, [train_name, val_name])
    return paths[0], paths[1]
