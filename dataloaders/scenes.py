"""Scene-classification image datasets: ImageFolder trees, split lists, decoding with clear errors.

Split lists ("ImageList" format of the original): a text file with one relative path per line,
``./<class>/<file>`` (deeper paths such as ``./<class>/<sub>/<file>`` are fine); the class is the first
path component after ``./``; the root is the list file's folder. Blank lines and lines starting with ``#``
are skipped. Absolute paths, backslashes and ``..`` components are rejected (a list must not reach outside
its root).

Class maps: classes are sorted names; train and val share one map built from the union of their classes
(:func:`make_class_map`), unlike the original, where each list built its own.
"""
from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

try:  # torchvision's libjpeg-turbo/libpng decoders: a little faster than PIL; deprecated since 0.29
    from torchvision.io import ImageReadMode, decode_image
except ImportError:  # pragma: no cover - removed in a future torchvision: PIL is used instead
    decode_image = None

from .errors import DataError, MissingDataError

PathLike = Union[str, os.PathLike]
Sample = Tuple[str, str]  # (absolute file path, class name)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
Image.MAX_IMAGE_PIXELS = 1_000_000_000  # as the original: FMoW has very large images

_TV_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"RIFF", b"GIF8")


def fmow_rgb_filter(path: str) -> bool:
    """FMoW-RGB file filter: keep only ``*_rgb.jpg`` (drops ``_rgb.json``, ``_msrgb`` and ``_ms`` files)."""
    return path.endswith("_rgb.jpg")


def has_image_extension(path: str) -> bool:
    """True when the file name ends with one of :data:`IMG_EXTENSIONS` (case-insensitive)."""
    return path.lower().endswith(IMG_EXTENSIONS)


# ----------------------------------------------------------------------------------------------------------
# decoding
def load_pil_rgb(path: PathLike) -> Image.Image:
    """Open an image as RGB PIL; a missing or undecodable file raises an error naming it."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise MissingDataError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot decode image (corrupt or truncated?): {exc}") from None


def load_tensor_rgb(path: PathLike) -> torch.Tensor:
    """Decode an image to a uint8 RGB CHW tensor (torchvision's libjpeg-turbo/libpng, PIL as fallback)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise MissingDataError(f"{path}: image file not found") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read image file: {exc}") from None
    if decode_image is not None and data.startswith(_TV_MAGIC):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
            if img.dtype == torch.uint8:
                return img
        except RuntimeError:
            pass  # let PIL decode it (CMYK, odd PNGs) or produce the error message
    pil = load_pil_rgb(path)
    return torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).contiguous()


# ----------------------------------------------------------------------------------------------------------
# listing samples
def scan_image_folder(root: PathLike, is_valid_file: Optional[Callable[[str], bool]] = None) -> List[Sample]:
    """List ``(path, class)`` of an ImageFolder tree ``root/<class>/**/<image>`` (recursive, sorted).

    Raises:
        MissingDataError: ``root`` does not exist or is not a folder.
        DataError: no class sub-folder, or no matching image at all.
    """
    root = Path(root)
    if not root.exists():
        raise MissingDataError(f"{root}: folder not found")
    if not root.is_dir():
        raise DataError(f"{root}: expected a folder (ImageFolder root <root>/<class>/<image>), got a file")
    valid = is_valid_file or has_image_extension
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no class sub-folders found (expected <root>/<class>/<image>)")
    samples: List[Sample] = []
    empty: List[str] = []
    for cls in classes:
        before = len(samples)
        for dirpath, dirnames, filenames in os.walk(root / cls, followlinks=True):
            dirnames.sort()
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                if valid(path):
                    samples.append((path, cls))
        if len(samples) == before:
            empty.append(cls)
    what = "files accepted by the filter" if is_valid_file else f"images ({', '.join(IMG_EXTENSIONS)})"
    if not samples:
        raise DataError(f"{root}: no {what} found in its {len(classes)} class folder(s)")
    if empty:
        shown = ", ".join(str(root / c) for c in empty[:5]) + (" ..." if len(empty) > 5 else "")
        print(f"WARNING: {len(empty)} of the {len(classes)} class folders of {root} hold no {what}, so "
              f"{'that class is' if len(empty) == 1 else 'those classes are'} left out: {shown}")
    return samples


def unseen_classes(train: Dataset, val: Dataset) -> List[str]:
    """Names of the classes that occur in ``val`` but never in ``train`` (datasets with ``targets`` (class ids)
    and ``classes``, as :class:`SceneDataset`; others give []): a classifier or kNN bank cannot predict them, so
    every such validation image counts as wrong."""
    train_t, val_t = getattr(train, "targets", None), getattr(val, "targets", None)
    if train_t is None or val_t is None:
        return []
    names = list(getattr(val, "classes", None) or getattr(train, "classes", None) or [])
    missing = sorted(set(int(t) for t in val_t) - set(int(t) for t in train_t))
    return [names[i] if 0 <= i < len(names) else str(i) for i in missing]


def warn_unseen_classes(train: Dataset, val: Dataset, train_name: str) -> List[str]:
    """One ``WARNING:`` line when validation holds classes that ``train`` (called ``train_name``) lacks; returns
    those class names (see :func:`unseen_classes`)."""
    missing = unseen_classes(train, val)
    if missing:
        shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        print(f"WARNING: {len(missing)} class(es) of the validation set never occur in {train_name}, so their "
              f"validation images can never be classified right: {shown}")
    return missing


def parse_split_line(line: str, list_file: PathLike, lineno: int) -> Tuple[List[str], str]:
    """Validate one split-list line; return (path components, class). Errors name the file and line."""
    rel = line.strip()
    where = f"{list_file}:{lineno}"
    if "\\" in rel:
        raise DataError(f"{where}: expected a './<class>/<file>' path with '/' separators, got '{rel}'")
    if rel.startswith("/") or (len(rel) > 1 and rel[1] == ":"):
        raise DataError(f"{where}: absolute path '{rel}' not allowed; expected './<class>/<file>' relative "
                        f"to the list file's folder")
    parts = [x for x in rel.split("/") if x not in ("", ".")]
    if ".." in parts:
        raise DataError(f"{where}: path '{rel}' escapes the list's root folder ('..' not allowed); expected "
                        f"'./<class>/<file>'")
    if len(parts) < 2:
        raise DataError(f"{where}: expected './<class>/<file>', got '{rel}' (no class folder)")
    return parts, parts[0]


def read_split_list(list_file: PathLike, check_files: bool = True) -> List[Sample]:
    """Parse a split list (``./<class>/<file>`` per line, root = the list file's folder).

    Args:
        list_file: the text file.
        check_files: verify that every listed file exists (one error listing the first few missing ones).

    Raises:
        MissingDataError: the list file (or, with ``check_files``, a listed image) does not exist.
        DataError: an invalid line (absolute, ``..``, no class), or an empty list.
    """
    list_file = Path(list_file)
    if not list_file.exists():
        raise MissingDataError(f"{list_file}: split list not found")
    if list_file.is_dir():
        raise DataError(f"{list_file}: expected a split-list text file, got a folder")
    root = list_file.resolve().parent
    root_str = str(root)
    samples: List[Sample] = []
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{list_file}: expected a UTF-8 text file of './<class>/<file>' lines ({exc})") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts, cls = parse_split_line(line, list_file, lineno)
        samples.append((os.path.join(root_str, *parts), cls))
    if not samples:
        raise DataError(f"{list_file}: split list is empty (expected './<class>/<file>' lines)")
    if check_files:
        missing = [p for p, _ in samples if not os.path.isfile(p)]
        if missing:
            shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
            raise MissingDataError(f"{list_file}: {len(missing)} of {len(samples)} listed files not found "
                                   f"under {root}: {shown}")
    return samples


def collect_samples(source: PathLike, is_valid_file: Optional[Callable[[str], bool]] = None,
                    check_files: bool = True) -> List[Sample]:
    """Samples of an ImageFolder root (a folder; ``is_valid_file`` filters it) or a split list (a file;
    taken verbatim, as the original's ImageList)."""
    source = Path(source)
    if source.is_file():
        return read_split_list(source, check_files=check_files)
    if not source.exists():
        raise MissingDataError(f"{source}: not found (expected an ImageFolder root or a split-list file)")
    return scan_image_folder(source, is_valid_file)


def make_class_map(*sample_lists: Iterable[Sample]) -> dict:
    """One ``{class name: index}`` map (sorted names) over the union of the given sample lists."""
    names = set()
    for samples in sample_lists:
        names.update(cls for _, cls in samples)
    return {name: i for i, name in enumerate(sorted(names))}


def random_split_indices(n: int, val_fraction: float = 0.1, seed: int = 0) -> Tuple[List[int], List[int]]:
    """Seeded random split of ``range(n)`` into (train, val); val gets ``ceil(n * val_fraction)`` items
    (at least one when n >= 2), so 90/10 of 100 items is 90/10."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_val = min(max(1 if n >= 2 else 0, math.ceil(n * val_fraction - 1e-9)), max(n - 1, 0))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).tolist()
    return sorted(perm[n_val:]), sorted(perm[:n_val])


# ----------------------------------------------------------------------------------------------------------
class SceneDataset(Dataset):
    """Map-style dataset over ``(path, class)`` samples with a fixed class map.

    Items: ``transform(image)`` followed by the integer label (when ``with_label``); a tuple returned by the
    transform is flattened, e.g. ``(img, input_res, label)``. ``decode="pil"`` gives the transform an RGB
    PIL image, ``decode="tensor"`` a uint8 CHW tensor (faster, used by pretraining).
    Attributes ``samples``, ``targets``, ``classes`` and ``class_to_idx`` mirror torchvision's ImageFolder.
    """

    def __init__(self, samples: Sequence[Sample], class_to_idx: dict, transform: Optional[Callable] = None,
                 with_label: bool = True, decode: str = "pil") -> None:
        if decode not in ("pil", "tensor"):
            raise ValueError(f"decode must be 'pil' or 'tensor', got {decode!r}")
        unknown = sorted({c for _, c in samples} - set(class_to_idx))
        if unknown:
            raise ValueError(f"classes {unknown[:5]} are missing from the class map")
        self.samples = [(p, class_to_idx[c]) for p, c in samples]
        self.targets = [t for _, t in self.samples]
        self.class_to_idx = dict(class_to_idx)
        self.classes = sorted(class_to_idx, key=class_to_idx.get)
        self.transform = transform
        self.with_label = with_label
        self.decode = decode

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        img = load_tensor_rgb(path) if self.decode == "tensor" else load_pil_rgb(path)
        try:
            out = self.transform(img) if self.transform is not None else img
        except DataError:
            raise
        except (ValueError, RuntimeError) as exc:
            raise DataError(f"{path}: transform failed: {exc}") from exc
        if not self.with_label:
            return out
        return (*out, label) if isinstance(out, tuple) else (out, label)
