"""kNN / linear-probe evaluation datasets: the nine dataset ids, their statistics and transforms.

Ids: resisc, mlrsnet, airound, cvbrct, eurosat, optimal-31, whu-rs19, ucmerced, fmow (plus ``demo``, the
built-in synthetic scenes). Each source is an ImageFolder root or a split-list file; ``fmow`` folders keep
only ``*_rgb.jpg`` files. kNN transform: ToTensor + Normalize(dataset stats), with ``Resize((256, 256))``
first for ucmerced and ``Resize(512) + CenterCrop(512)`` for fmow. The kNN engine then area-resizes each
batch to every ``--eval_scale``.
"""
from __future__ import annotations

import os
from typing import Callable, List, Optional, Tuple, Union

from torch.utils.data import Dataset
from torchvision import transforms as T

from .errors import DataError
from .scenes import (SceneDataset, collect_samples, fmow_rgb_filter, make_class_map, random_split_indices)
from .stats import DEMO_MEAN, DEMO_STD, EVAL_STATS, Stats
from .synthetic import DemoScenes

PathLike = Union[str, os.PathLike]

DEMO_ID = "demo"
DEMO_EVAL_PER_CLASS = (32, 8)  # (train, val) images per class of the built-in demo evaluation set


def eval_stats(eval_dataset: str) -> Stats:
    """(mean, std) of an eval dataset id (the nine of :data:`EVAL_STATS` or ``demo``)."""
    key = eval_dataset.lower()
    if key == DEMO_ID:
        return DEMO_MEAN, DEMO_STD
    if key not in EVAL_STATS:
        raise ValueError(f"unknown eval dataset {eval_dataset!r}; expected one of "
                         f"{', '.join(list(EVAL_STATS) + [DEMO_ID])}")
    return EVAL_STATS[key]


def eval_transform(eval_dataset: str, mode: str = "knn", eval_scale: int = 224,
                   resize: Optional[bool] = None) -> Callable:
    """The evaluation transform (PIL -> normalised float tensor) of a dataset id.

    Args:
        eval_dataset: dataset id.
        mode: ``"knn"`` (fmow: Resize(512)+CenterCrop(512)) or ``"linprobe"`` (fmow: Resize(eval_scale)+
            CenterCrop(eval_scale)).
        eval_scale: linear-probe image side.
        resize: force (True) or skip (False) the Resize(eval_scale)+CenterCrop(eval_scale) for any dataset;
            ``None`` keeps the original behaviour (only fmow).
    """
    if mode not in ("knn", "linprobe"):
        raise ValueError(f"mode must be 'knn' or 'linprobe', got {mode!r}")
    key = eval_dataset.lower()
    mean, std = eval_stats(key)
    steps: List[Callable] = []
    if key == "ucmerced":
        steps.append(T.Resize((256, 256)))
    if resize or (resize is None and key == "fmow"):
        side = 512 if (mode == "knn" and resize is None) else int(eval_scale)
        steps += [T.Resize(side), T.CenterCrop(side)]
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


def _samples(source: PathLike, eval_dataset: str):
    filt = fmow_rgb_filter if eval_dataset == "fmow" else None
    return collect_samples(source, is_valid_file=filt)


def build_eval_datasets(eval_dataset: str, train_fnames: Optional[PathLike] = None,
                        val_fnames: Optional[PathLike] = None, eval_path: Optional[PathLike] = None,
                        seed: int = 0, transform: Optional[Callable] = None) -> Tuple[Dataset, Dataset, int]:
    """kNN datasets: ``(train_ds, val_ds, num_classes)`` with items ``(img[3,H,W] normalised, label)``.

    Sources, in order of precedence: ``train_fnames`` + ``val_fnames`` (each an ImageFolder root or a
    split-list file); ``eval_path`` (ImageFolder root or list) split 90/10 at random with ``seed``; for
    ``eval_dataset="demo"`` with no source, the built-in synthetic scenes. Train and val share one class map.

    Raises:
        ValueError: unknown id, or only one of train/val given, or no source at all.
        MissingDataError / DataError: missing or empty folder, bad split list (message names the file).
    """
    key = eval_dataset.lower()
    tf = transform or eval_transform(key, "knn")
    if (train_fnames is None) != (val_fnames is None):
        raise ValueError("give both --eval_train_fnames and --eval_val_fnames (or --eval_path), got "
                         f"train={train_fnames!r}, val={val_fnames!r}")
    if train_fnames is not None:
        train_s = _samples(train_fnames, key)
        same = os.path.realpath(train_fnames) == os.path.realpath(val_fnames)
        val_s = train_s if same else _samples(val_fnames, key)  # one scan: its warnings once
        cmap = make_class_map(train_s, val_s)
        return SceneDataset(train_s, cmap, tf), SceneDataset(val_s, cmap, tf), len(cmap)
    if eval_path is not None:
        samples = _samples(eval_path, key)
        if len(samples) < 2:
            raise DataError(f"{eval_path}: need at least 2 images for a 90/10 split, found {len(samples)}")
        cmap = make_class_map(samples)
        tr_idx, va_idx = random_split_indices(len(samples), 0.1, seed)
        return (SceneDataset([samples[i] for i in tr_idx], cmap, tf),
                SceneDataset([samples[i] for i in va_idx], cmap, tf), len(cmap))
    if key == DEMO_ID:
        return demo_eval_datasets(tf, seed)
    raise ValueError(f"eval dataset {eval_dataset!r}: no data given; pass --eval_train_fnames and "
                     f"--eval_val_fnames, or --eval_path")


def demo_eval_datasets(transform: Optional[Callable] = None, seed: int = 0, num_classes: int = 4,
                       size: int = 96) -> Tuple[Dataset, Dataset, int]:
    """Built-in synthetic kNN sets (no files): 32 train and 8 val images per class, disjoint seeds."""
    tf = transform or eval_transform(DEMO_ID, "knn")
    n_tr, n_va = DEMO_EVAL_PER_CLASS
    train = DemoScenes(n_tr * num_classes, size, num_classes, seed=1000 + seed, transform=tf)
    val = DemoScenes(n_va * num_classes, size, num_classes, seed=2000 + seed, transform=tf)
    return train, val, num_classes


def build_scene_dataset(source: PathLike, eval_dataset: str, transform: Callable,
                        class_to_idx: Optional[dict] = None, with_label: bool = True) -> SceneDataset:
    """A labelled :class:`SceneDataset` of one source with the dataset id's file filter."""
    samples = _samples(source, eval_dataset.lower())
    return SceneDataset(samples, class_to_idx or make_class_map(samples), transform, with_label=with_label)

