"""One entry point per use: pretraining dataset + sampler, kNN datasets, linear-probe datasets.

All heavy per-sample work (decoding, crops, resizes, res) happens in ``Dataset.__getitem__``, i.e. in the
DataLoader workers; the default collate only stacks. Pretraining batches are
``(imgs[N,C,in,in], input_res[N], targets[N,C,T,T], target_res[N])``.

Usage by the training engines::

    cfg = load_config(args.config, data_root=args.data_root, overrides=args.data_override)
    ds = build_pretrain_dataset(cfg, args.input_size, max(args.target_size), args.scale_min, args.scale_max,
                                args.base_resolution, seed=args.seed)
    sampler = build_pretrain_sampler(ds, cfg, world_size, rank, args.seed)
    loader = DataLoader(ds, sampler=sampler, batch_size=..., drop_last=True, num_workers=...)
    for epoch in ...: sampler.set_epoch(epoch); ...
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional, Tuple, Union

from torch.utils.data import Dataset, DistributedSampler, Sampler

from .config import GEO_TYPES, data_section, validate_config
from .errors import DataError
from .eval_sets import (DEMO_ID, EVAL_STATS, build_eval_datasets, build_scene_dataset, demo_eval_datasets,
                        eval_stats, eval_transform)
from .geotiff import GeoTiffDataset, GeoTiffPretrainDataset, geotiff_dataset_from_config
from .scenes import SceneDataset, collect_samples, fmow_rgb_filter, make_class_map
from .synthetic import DemoScenes
from .transforms import LinprobeTrainTransform, PretrainTransform

PathLike = Union[str, os.PathLike]

__all__ = ["EVAL_STATS", "build_pretrain_dataset", "build_pretrain_sampler", "build_eval_datasets",
           "build_linprobe_datasets", "eval_transform", "eval_stats"]


def validated_data(cfg: Mapping) -> dict:
    """The validated inner ``data`` dict of a config (already-validated dicts pass unchanged)."""
    return validate_config({"data": data_section(cfg)}, source="<config dict>")["data"]


def norm_stats(d: dict) -> Tuple[list, list]:
    """(mean, std) lists of a validated ``data`` dict."""
    return list(d["mean"]), list(d["std"])


def _with_context(exc: DataError, d: dict) -> DataError:
    where = f"data.type={d['type']}" + (f", data.img_dir={d['img_dir']}" if "img_dir" in d else "")
    return type(exc)(f"{exc} [config: {where}]")


def scene_samples(d: dict):
    """(path, class) samples of a scene-folder ``data`` dict (FMoW: only ``*_rgb.jpg`` files)."""
    filt = fmow_rgb_filter if d["type"] == "fmow" else None
    return collect_samples(d["img_dir"], is_valid_file=filt)


def build_pretrain_dataset(cfg: Mapping, input_size: int = 224, target_size: Optional[int] = None,
                           scale_min: float = 0.2, scale_max: float = 1.0, base_resolution: float = 2.5,
                           seed: int = 0) -> Dataset:
    """The pretraining dataset of a config; items ``(img[C,in,in], input_res, target[C,T,T], target_res)``.

    * ``fmow``: ImageFolder of ``*_rgb.jpg`` (or a split list); random 2x-input crop, flip, RRC, resize.
    * ``resisc``/``eurosat``: ImageFolder or split list; RRC from the whole image (as the original collate).
    * ``demo``: in-memory synthetic scenes (``length`` images of ``size`` px), the fmow pipeline.
    * ``naip``/``sentinel2``/``geotiff``: :class:`GeoTiffPretrainDataset` over windows of ``size`` px
      (default 2x input) with the GeoTIFF keys of the config (``geotiff.geotiff_dataset_from_config``);
      pair it with :func:`build_pretrain_sampler`.

    ``target_size`` None means ``2 * input_size``. Errors (missing/empty folder, bad files, wrong band
    count) name the file and the config entries.
    """
    d = validated_data(cfg)
    mean, std = norm_stats(d)
    target = int(target_size) if target_size else 2 * int(input_size)
    geo = d["type"] in GEO_TYPES
    transform = PretrainTransform(input_size, mean, std, target_size=target, scale=(scale_min, scale_max),
                                  base_resolution=base_resolution,
                                  random_crop=d["type"] in ("fmow", DEMO_ID))
    try:
        if d["type"] == DEMO_ID:
            return DemoScenes(d["length"], d["size"], d["num_classes"], d["seed"], transform, with_label=False)
        if geo:
            ds = geotiff_dataset_from_config(d, window_size=d.get("size") or 2 * int(input_size), seed=seed)
            return GeoTiffPretrainDataset(ds, transform, [m * 1.0 for m in mean],
                                          reference_gsd=d.get("reference_gsd"), min_valid=d.get("min_valid", 0.0))
        samples = scene_samples(d)
        return SceneDataset(samples, make_class_map(samples), transform, with_label=False, decode="tensor")
    except DataError as exc:
        raise _with_context(exc, d) from None


def build_pretrain_sampler(dataset: Dataset, cfg: Mapping, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                           shuffle: bool = True) -> Sampler:
    """Sampler with ``set_epoch`` for any pretraining dataset of :func:`build_pretrain_dataset`.

    GeoTIFF datasets get a :class:`DistributedRandomWindowSampler` (``data.length`` windows per epoch over
    all ranks, default: one per tile); the others a ``DistributedSampler`` (also for one process).
    """
    if isinstance(dataset, (GeoTiffPretrainDataset, GeoTiffDataset)):
        d = validated_data(cfg)
        geo = dataset.geo if isinstance(dataset, GeoTiffPretrainDataset) else dataset
        return geo.make_sampler(length=d.get("length") or len(geo), num_replicas=num_replicas, rank=rank,
                                seed=seed, shuffle=shuffle)
    return DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)


def default_val_source(train_source: PathLike) -> Optional[Path]:
    """The validation source that sits next to a training source, if it exists: ``train.txt`` -> ``val.txt``,
    ``train-<name>.txt`` -> ``val-<name>.txt`` (the shipped list names), a folder ``train`` -> ``val``."""
    src = Path(train_source)
    name = src.name
    if name.startswith("train"):
        candidate = src.with_name("val" + name[len("train"):])
        if candidate.exists():
            return candidate
    return None


def _stratified_split(samples: list, val_fraction: float, seed: int) -> Tuple[list, list]:
    """Seeded per-class split of ``samples`` into (train, val): ``ceil(n * fraction)`` of each class with at
    least two images goes to val."""
    import math
    import random

    by_class: dict = {}
    for s in samples:
        by_class.setdefault(s[1], []).append(s)
    rng = random.Random(seed)
    train, val = [], []
    for cls in sorted(by_class):
        items = sorted(by_class[cls])
        rng.shuffle(items)
        n_val = min(len(items) - 1, max(1, math.ceil(len(items) * val_fraction - 1e-9))) if len(items) > 1 else 0
        val += items[:n_val]
        train += items[n_val:]
    return sorted(train), sorted(val)


def build_linprobe_datasets(cfg: Mapping, eval_dataset: str, eval_path: Optional[PathLike],
                            input_size: int = 224, scale_min: float = 0.5, scale_max: float = 1.0,
                            base_resolution: float = 2.5, eval_scale: int = 224, seed: int = 0,
                            val_resize: Optional[bool] = None, val_fraction: float = 0.1,
                            report: Optional[list] = None) -> Tuple[Dataset, Dataset, int]:
    """Linear-probe / finetune datasets: ``(train_ds, val_ds, num_classes)``. Never validates on training images.

    Train (from the config): items ``(img[3,in,in], input_res, label)`` with
    :class:`LinprobeTrainTransform` (fmow: resize + random crop first), normalised with the config stats.
    Val: items ``(img, label)`` with :func:`eval_transform` in ``linprobe`` mode (fmow: Resize+CenterCrop to
    ``eval_scale``; ``val_resize=True`` applies that to every dataset), from, in this order:

    * ``eval_path`` (an ImageFolder root or split list); images that are also training images are dropped;
    * the list or folder next to the training source (``val-<name>.txt`` beside ``train-<name>.txt``, ``val.txt``
      beside ``train.txt``, ``val/`` beside ``train/``);
    * a seeded, per-class split of the training source (``val_fraction`` of each class; those images are then not
      trained on).

    One class map over train and val. What was chosen is appended to ``report`` (a list of lines) when given.
    """
    d = validated_data(cfg)
    notes = report if report is not None else []
    if d["type"] in GEO_TYPES:
        raise DataError(f"data.type={d['type']}: linear probing needs labelled scenes (fmow, resisc, eurosat, "
                        f"demo); GeoTIFF configs have no labels")
    mean, std = norm_stats(d)
    train_tf = LinprobeTrainTransform(input_size, mean, std, scale=(scale_min, scale_max),
                                      base_resolution=base_resolution, resize_crop=d["type"] == "fmow")
    val_tf = eval_transform(eval_dataset, "linprobe", eval_scale, resize=val_resize)
    try:
        if d["type"] == DEMO_ID:
            train = DemoScenes(d["length"], d["size"], d["num_classes"], d["seed"], train_tf)
            if eval_path is None:
                _, val, _ = demo_eval_datasets(val_tf, seed, d["num_classes"], d["size"])
                notes.append("validation: built-in synthetic scenes drawn with another seed than the training ones")
                return train, val, d["num_classes"]
            val = build_scene_dataset(eval_path, eval_dataset, val_tf)
            names = sorted(set(train.classes) | set(val.classes))
            if names != train.classes:
                raise DataError(f"{eval_path}: classes {names} do not match the demo classes {train.classes}")
            return train, val, len(names)
        train_s = scene_samples(d)
        val_filter = fmow_rgb_filter if eval_dataset.lower() == "fmow" else None
        if eval_path is None:
            eval_path = default_val_source(d["img_dir"])
            if eval_path is not None:
                notes.append(f"validation: {eval_path} (found next to the training source {d['img_dir']})")
        if eval_path is not None:
            val_s = collect_samples(eval_path, is_valid_file=val_filter)
            seen = {os.path.realpath(p) for p, _ in train_s}
            kept = [s for s in val_s if os.path.realpath(s[0]) not in seen]
            if len(kept) < len(val_s):
                notes.append(f"validation: {len(val_s) - len(kept)} of the {len(val_s)} images of {eval_path} are "
                             f"training images and are left out; {len(kept)} remain")
            val_s = kept
            if not val_s:
                notes.append(f"validation: {eval_path} holds only training images")
        if eval_path is None or not val_s:
            train_s, val_s = _stratified_split(train_s, val_fraction, seed)
            notes.append(f"validation: no separate validation set, so a seeded split (seed {seed}) of the training "
                         f"source holds out {len(val_s)} of {len(train_s) + len(val_s)} images "
                         f"({val_fraction:.0%} per class; pass --eval_path to use your own)")
            if not val_s:
                raise DataError(f"{d['img_dir']}: too few images to hold out a validation set; pass --eval_path")
        cmap = make_class_map(train_s, val_s)
        return SceneDataset(train_s, cmap, train_tf), SceneDataset(val_s, cmap, val_tf), len(cmap)
    except DataError as exc:
        raise _with_context(exc, d) from None
