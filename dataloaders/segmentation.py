"""Segmentation windows: the datasets, the evaluation grid, the start-up checks of the data, and the builder.

The config is loaded with ``dataloaders.config.load_config(path, schema="segmentation")`` (keys, defaults and
checks: :data:`dataloaders.config.SEG_SCHEMA`); pixels and labels come from a source of ``dataloaders.seg_sources``
(:class:`GeoVectorSource`: GeoTIFFs + vector polygons burnt by ``dataloaders.seg_labels``; :class:`MaskPairSource`:
image/mask pairs). :func:`build_seg_datasets` turns a loaded config into the training and validation datasets.

Training windows are drawn by the GeoTIFF window sampler (``SegmentationDataset.make_sampler``); evaluation windows
cover every tile (:func:`grid_windows`), sharded by tile over the ranks (:class:`TileShardSampler`). Validation
datasets read each tile on its own read grid (no ``gsd_range``: the engine rescales validation windows itself and
assembles whole tiles).

Samples are dicts (torchgeo style, with metadata): ``image`` FloatTensor [C, S, S] (normalised; invalid pixels 0),
``mask`` LongTensor [S, S] (invalid pixels ``ignore_index``), ``res`` float, ``tile`` int,
``row``/``col``/``height``/``width`` (the window, height and width clipped to the raster), ``transform`` (6 affine
coefficients of the window, or None), ``crs`` (str or None), ``path``; :func:`seg_collate` batches them (tensors
stacked, metadata as lists).

Resolution: :meth:`SegmentationDataset.res_of`, with the rules of ``util/gsd.py`` (``window_res`` and
``reference_gsd_factor``; the formulas, and why this rule has no ``- 1``, are documented there).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

from util.gsd import reference_gsd_factor, window_res

from .errors import DataError
from .geo_sampler import DistributedRandomWindowSampler, WindowSpec
from .seg_labels import VectorLabels
from .seg_sources import GeoVectorSource, MaskPairSource

PathLike = Union[str, os.PathLike]

__all__ = ["SegmentationDataset", "grid_windows", "TileShardSampler", "seg_collate", "build_seg_datasets"]


# ================================================================================================= windows
def grid_windows(shapes: Sequence[Tuple[int, int]], size: int) -> List[WindowSpec]:
    """Windows of side ``size`` covering every tile (row-major, tiles in order); the last row/column of windows is
    shifted back to end at the tile's edge (overlapping its neighbour). Tiles smaller than ``size`` get one window
    at (0, 0) (read clipped, then padded)."""
    out = []
    for t, (h, w) in enumerate(shapes):
        rows = list(range(0, max(h - size, 0) + 1, size))
        cols = list(range(0, max(w - size, 0) + 1, size))
        if h > size and rows[-1] != h - size:
            rows.append(h - size)
        if w > size and cols[-1] != w - size:
            cols.append(w - size)
        out += [WindowSpec(t, r, c, size, size) for r in rows for c in cols]
    return out


class TileShardSampler(Sampler):
    """Evaluation windows sharded by tile: rank r of W gets all windows of tiles r, r + W, ..., in order, so that
    each rank assembles (and writes) whole tiles and every window is seen exactly once over the ranks."""

    def __init__(self, windows: Sequence[WindowSpec], num_replicas: int = 1, rank: int = 0) -> None:
        self.indices = [i for i, w in enumerate(windows) if w.tile % num_replicas == rank]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class SegmentationDataset(Dataset):
    """Normalised windows + labels of a source (:class:`GeoVectorSource` or :class:`MaskPairSource`).

    Indexing: a :class:`WindowSpec` (what :class:`DistributedRandomWindowSampler` yields, training) or an int into
    ``windows`` (evaluation: :func:`grid_windows`). Training (``train=True``) resizes windows to ``input_size``
    (image bilinear, label nearest) and flips them horizontally/vertically at random; with ``crop_scale`` (min, max)
    a random square crop of that fraction of the window side is taken first (scale augmentation: the res follows the
    crop, ``res_of``); evaluation returns windows
    at their native ``size`` (the engine rescales them per evaluation scale).
    """

    def __init__(self, source, mean: Sequence[float], std: Sequence[float], size: int,
                 input_size: Optional[int] = None, train: bool = False, windows: Optional[List[WindowSpec]] = None,
                 ignore_index: int = 255, base_resolution: float = 1.0, reference_gsd: Optional[float] = None,
                 length: Optional[int] = None, seed: int = 0, crop_scale: Tuple[float, float] = (1.0, 1.0)) -> None:
        if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {tuple(crop_scale)}")
        if len(mean) != source.num_bands:
            raise DataError(f"{source.paths[0]}: has {source.num_bands} band(s) but data.mean has {len(mean)} entries")
        self.source = source
        self.mean = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)
        self.size = int(size)
        self.input_size = int(input_size or size)
        self.train = bool(train)
        self.windows = windows if windows is not None else grid_windows(source.shapes, self.size)
        self.ignore_index = int(ignore_index)
        self.base_resolution = float(base_resolution)
        self.reference_gsd = reference_gsd
        self.length = int(length) if length else len(self.windows)
        self.seed = int(seed)
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.epoch = 0

    def __len__(self) -> int:
        return self.length if self.train else len(self.windows)

    def make_sampler(self, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> DistributedRandomWindowSampler:
        """Training windows: the GeoTIFF window sampler (area-weighted tiles, epoch-seeded, distributed)."""
        return DistributedRandomWindowSampler(self.source.tile_index, self.size, self.length,
                                              num_replicas=num_replicas, rank=rank, seed=seed,
                                              mosaic=self.source.mosaic)

    def res_of(self, gsd: Optional[float], input_px: int, window_px: Optional[int] = None) -> float:
        """Model res of ``window_px`` (default ``size``) window pixels with ground ``gsd`` (metres; None: unknown)
        shown at ``input_px`` pixels: ``window_res(...) * reference_gsd_factor(gsd, reference_gsd)``
        (``util/gsd.py``)."""
        res = window_res(window_px or self.size, input_px, self.base_resolution)
        return res * reference_gsd_factor(gsd, self.reference_gsd)

    def __getitem__(self, idx) -> dict:
        spec = WindowSpec(*idx) if not isinstance(idx, (int, np.integer)) else self.windows[int(idx)]
        tile, row, col, size = int(spec.tile), int(spec.row), int(spec.col), int(spec.height)
        th, tw = self.source.shapes[tile]
        if self.train and self.source.mosaic:  # the window may extend past its tile: read whole from all tiles
            h = w = size
        else:
            h, w = min(size, th - row), min(size, tw - col)
        image, valid, label, meta = self.source.read(tile, row, col, h, w)
        image = np.where(valid[None], (image - self.mean) / self.std, 0.0).astype(np.float32)
        image = np.nan_to_num(image)
        label = np.where(valid, label, self.ignore_index).astype(np.int64)
        if (h, w) != (size, size):  # raster smaller than the window: pad (image 0 = mean, label ignored)
            image = np.pad(image, ((0, 0), (0, size - h), (0, size - w)))
            label = np.pad(label, ((0, size - h), (0, size - w)), constant_values=self.ignore_index)
        img_t, lab_t = torch.from_numpy(image), torch.from_numpy(label)
        shown = size  # window pixels per side that the model sees as its input
        if self.train:
            rng = np.random.default_rng([self.seed, tile, row % 2**31, col % 2**31, self.epoch])  # mosaic: row/col < 0
            side = size
            if self.crop_scale != (1.0, 1.0):  # scale augmentation: a random square crop, res follows its side
                side = max(1, min(size, int(round(size * rng.uniform(*self.crop_scale)))))
                top, left = (int(v) for v in rng.integers(0, size - side + 1, size=2))
                img_t, lab_t = img_t[:, top:top + side, left:left + side], lab_t[top:top + side, left:left + side]
            if self.input_size != side:
                img_t = F.interpolate(img_t[None], size=(self.input_size,) * 2, mode="bilinear",
                                      align_corners=False, antialias=True)[0]
                lab_t = F.interpolate(lab_t[None, None].float(), size=(self.input_size,) * 2,
                                      mode="nearest")[0, 0].long()
            shown = side
            if rng.random() < 0.5:
                img_t, lab_t = img_t.flip(-1), lab_t.flip(-1)
            if rng.random() < 0.5:
                img_t, lab_t = img_t.flip(-2), lab_t.flip(-2)
        return {
            "image": img_t.contiguous(), "mask": lab_t.contiguous(),
            "res": self.res_of(meta["gsd"], self.input_size if self.train else size, shown),
            "tile": tile, "row": row, "col": col, "height": h, "width": w,
            "transform": meta["transform"], "crs": meta["crs"], "path": self.source.paths[tile],
        }


def seg_collate(batch: List[dict]) -> dict:
    """Stack ``image`` [N, C, S, S], ``mask`` [N, S, S] and ``res`` [N]; other entries become lists."""
    out: Dict[str, Any] = {
        "image": torch.stack([b["image"] for b in batch]),
        "mask": torch.stack([b["mask"] for b in batch]),
        "res": torch.tensor([float(b["res"]) for b in batch], dtype=torch.float32),
    }
    for key in batch[0]:
        if key not in out:
            out[key] = [b[key] for b in batch]
    return out


# ============================================================================================ start-up checks
def _check_not_empty(labels: VectorLabels, key: str, train: bool) -> None:
    """A label file without polygons: an error for training (every pixel would be background), else a warning."""
    if len(labels):
        return
    what = f" ({labels.dropped} non-polygon feature(s) ignored)" if labels.dropped else ""
    if train:
        raise DataError(f"{labels.source}: {key} holds no polygon features{what}: every training pixel would be "
                        f"background; point {key} at the labelled polygons")
    print(f"WARNING: {labels.source}: {key} holds no polygon features{what}: every validation pixel is background")


def _check_tiles_labelled(src: GeoVectorSource, labels: PathLike, key: str, train: bool) -> None:
    """Rasters that no polygon touches burn zero label pixels: an error when that is every training raster (the
    labels lie elsewhere or in another CRS), else one warning line naming them."""
    empty = src.unlabelled_tiles()
    if not empty:
        return
    n = len(src.paths)
    if train and len(empty) == n:
        raise DataError(f"{labels}: no polygon touches any of the {n} training raster(s) of {key} (every label "
                        f"pixel would be background): do the labels cover these rasters, in the CRS they declare?")
    names = ", ".join(os.path.basename(src.paths[i]) for i in empty[:5]) + (" ..." if len(empty) > 5 else "")
    print(f"WARNING: {labels}: no polygon touches {len(empty)} of the {n} {'training' if train else 'validation'} "
          f"raster(s) of {key}, so their labels are all background: {names}")


def _check_mask_values(src: MaskPairSource, d: Mapping, classes: Sequence[str], mask_dir: PathLike,
                       train: bool) -> None:
    """Configured classes whose mask value never occurs, and raw values that map to no class: an error when no
    foreground class occurs in the training masks, else one warning line each."""
    values = list(d.get("mask_values") or range(len(classes)))
    key = "data.mask_values" if d.get("mask_values") else "the class ids (no data.mask_values)"
    found = sorted(src.raw_values)
    absent = [f"{classes[i]!r} (value {v})" for i, v in enumerate(values) if v not in src.raw_values]
    unmapped = [v for v in found if v not in values and v != d["ignore_index"]]
    hint = f"values in the masks: {found[:12]}{' ...' if len(found) > 12 else ''}; set data.mask_values"
    if train and all(v not in src.raw_values for v in values[1:]):
        raise DataError(f"{mask_dir}: no foreground class of {key} occurs in the training masks (absent: "
                        f"{', '.join(absent)}; {hint})")
    split = "training" if train else "validation"
    if absent:
        print(f"WARNING: {mask_dir}: {', '.join(absent)} of {key} never occur(s) in the {split} masks ({hint})")
    if unmapped:
        print(f"WARNING: {mask_dir}: mask values {unmapped[:12]} of the {split} masks are no class of {key} and "
              f"become data.ignore_index {d['ignore_index']}")


# ================================================================================================ builders
def build_seg_datasets(cfg: Mapping, input_size: int, base_resolution: float = 1.0, seed: int = 0,
                       crop_scale: Tuple[float, float] = (1.0, 1.0),
                       ) -> Tuple[SegmentationDataset, SegmentationDataset, List[str]]:
    """(train dataset, validation dataset, class names with "background" first) of a loaded config;
    ``crop_scale``: the training windows' random square crop, as a fraction of the window side."""
    from .geotiff import geotiff_dataset_from_config

    d = cfg["data"]
    classes = ["background"] + list(d["classes"])
    common = dict(mean=d["mean"], std=d["std"], size=d["size"], ignore_index=d["ignore_index"],
                  base_resolution=base_resolution, reference_gsd=d.get("reference_gsd"), seed=seed)

    def source(img_dir, label_src, train):
        if d["type"] == "geotiff":
            # the GeoTIFF reader of the pretraining configs, with the same keys; evaluation reads every tile on its
            # own grid (no gsd_range: the engine rescales validation windows itself and assembles whole tiles)
            geo = geotiff_dataset_from_config({**d, "img_dir": img_dir, "length": None,
                                               "gsd_range": d.get("gsd_range") if train else None},
                                              window_size=1, seed=seed)
            return GeoVectorSource(geo, label_src, d["all_touched"])
        return MaskPairSource(img_dir, label_src, len(classes), d["scale"], d.get("bands"), d.get("glob"),
                              d.get("mask_values"), d["ignore_index"])

    if d["type"] == "geotiff":
        train_labels = VectorLabels(d["labels"], d["classes"], d.get("class_column"))
        val_labels = (train_labels if d["val_labels"] == d["labels"]
                      else VectorLabels(d["val_labels"], d["classes"], d.get("class_column")))
        if train_labels.dropped:
            print(f"{d['labels']}: ignoring {train_labels.dropped} non-polygon feature(s)")
        _check_not_empty(train_labels, "data.labels", train=True)
        if val_labels is not train_labels:
            _check_not_empty(val_labels, "data.val_labels", train=False)
        train_src, val_src = source(d["img_dir"], train_labels, True), source(d["val_img_dir"], val_labels, False)
        if len(train_labels):
            _check_tiles_labelled(train_src, d["labels"], "data.img_dir", train=True)
        if len(val_labels):
            _check_tiles_labelled(val_src, d["val_labels"], "data.val_img_dir", train=False)
    else:
        train_src = source(d["img_dir"], d["mask_dir"], True)
        val_src = source(d["val_img_dir"], d["val_mask_dir"], False)
        _check_mask_values(train_src, d, classes, d["mask_dir"], train=True)
        if d["val_mask_dir"] != d["mask_dir"]:
            _check_mask_values(val_src, d, classes, d["val_mask_dir"], train=False)
    if not d.get("mosaic") and not any(h >= d["size"] and w >= d["size"] for h, w in train_src.shapes):
        raise DataError(f"{d['img_dir']}: no training raster/image holds a {d['size']} px window; lower data.size")
    train = SegmentationDataset(train_src, input_size=input_size, train=True, length=d["length"],
                                crop_scale=crop_scale, **common)
    val = SegmentationDataset(val_src, input_size=input_size, train=False, **common)
    return train, val, classes
