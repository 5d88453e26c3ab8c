"""Deterministic synthetic data for tests and the demo: multi-class scenes and small georeferenced GeoTIFFs.

Scenes: each class has its own colour palette, orientation, coarse-field frequency, fine-texture frequency
and density of rectangular "buildings", so classes differ at three spatial scales; each image draws its
phases, jitter, blobs and noise from ``numpy.random.default_rng([seed, class, index])``, so the same
arguments always give the same pixels.

* :func:`make_scene` -- one image as a float array (bands, H, W) in [0, 1].
* :func:`make_scene_folder` -- an ImageFolder tree ``root/class_XX/img_XXXX.<ext>``.
* :func:`write_split_lists` -- ``train.txt``/``val.txt`` in ``./<class>/<file>`` format (+ SHA256SUMS).
* :func:`make_geotiff_folder` / :func:`write_geotiff` -- GeoTIFF tiles with real geotransforms and nodata.
* :class:`DemoScenes` -- the in-memory dataset behind ``config/demo.yaml`` (``type: demo``): images are
  generated on the fly in the DataLoader workers; nothing is written to disk.
"""
from __future__ import annotations

import colorsys
import math
import os
from pathlib import Path
from typing import Callable, List, Optional, Tuple, Union

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from .splits import write_split_lists  # re-exported: part of this module's public API
from .stats import DEMO_MEAN, DEMO_STD  # re-exported

PathLike = Union[str, os.PathLike]

__all__ = ["make_scene", "make_scene_folder", "write_split_lists", "make_geotiff_folder", "write_geotiff",
           "DemoScenes", "DEMO_MEAN", "DEMO_STD", "demo_class_names"]

def demo_class_names(num_classes: int) -> List[str]:
    """Folder / class names used by the generators: ``class_00``, ``class_01``, ..."""
    return [f"class_{c:02d}" for c in range(num_classes)]


def _class_params(cls: int) -> dict:
    golden = 0.6180339887
    return {
        "hue": (cls * golden) % 1.0,
        "theta": math.pi * ((cls * 0.37) % 1.0),
        "coarse": 1.0 + (cls % 3),                   # cycles per image
        "fine": 6.0 + 5.0 * ((cls // 3) % 3) + (cls % 2) * 3.0,
        "rects": 2 + 5 * ((cls + 1) % 3),
        "dark": 0.25 + 0.15 * ((cls // 2) % 3),
    }


def make_scene(cls: int, size: int = 64, seed: int = 0, index: int = 0, bands: int = 3) -> np.ndarray:
    """A synthetic scene of class ``cls`` as float32 (bands, size, size) in [0, 1].

    Structure at three scales: a coarse oriented field blended with smooth blobs, mid-scale rectangles
    whose number depends on the class, and a fine oriented texture. Extra bands (beyond RGB) are further
    mixtures of the same structures, so multi-band tiles stay spatially coherent.
    """
    if bands < 1:
        raise ValueError(f"bands must be >= 1, got {bands}")
    p = _class_params(int(cls))
    rng = np.random.default_rng([int(seed), int(cls), int(index)])
    yy, xx = np.meshgrid(np.arange(size, dtype=np.float32) / size, np.arange(size, dtype=np.float32) / size,
                         indexing="ij")
    theta = p["theta"] + rng.uniform(-0.15, 0.15)
    u = xx * math.cos(theta) + yy * math.sin(theta)
    v = -xx * math.sin(theta) + yy * math.cos(theta)
    coarse = 0.5 + 0.5 * np.sin(2 * math.pi * p["coarse"] * rng.uniform(0.9, 1.1) * u + rng.uniform(0, 2 * math.pi))
    blobs = np.zeros_like(xx)
    for _ in range(3):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.1, 0.3)
        blobs += np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
    field = np.clip(0.7 * coarse + 0.3 * blobs / max(blobs.max(), 1e-6), 0, 1)
    fine = 0.5 + 0.5 * np.sin(2 * math.pi * p["fine"] * rng.uniform(0.9, 1.1) * v + rng.uniform(0, 2 * math.pi))

    c_a = np.array(colorsys.hsv_to_rgb(p["hue"], 0.55, 0.85), dtype=np.float32)
    c_b = np.array(colorsys.hsv_to_rgb((p["hue"] + 0.12) % 1.0, 0.6, p["dark"]), dtype=np.float32)
    rgb = c_a[:, None, None] * field + c_b[:, None, None] * (1 - field) + 0.18 * (fine - 0.5)
    roof = np.array(colorsys.hsv_to_rgb((p["hue"] + 0.5) % 1.0, 0.3, 0.9), dtype=np.float32)
    for _ in range(p["rects"]):
        w, h = (rng.uniform(0.06, 0.16, size=2) * size).astype(int) + 1
        x0, y0 = rng.integers(0, max(size - w, 1)), rng.integers(0, max(size - h, 1))
        rgb[:, y0:y0 + h, x0:x0 + w] = roof[:, None, None] * rng.uniform(0.8, 1.0)
    rgb += rng.normal(0, 0.03, size=rgb.shape).astype(np.float32)
    out = [rgb[0], rgb[1], rgb[2]]
    for b in range(3, bands):
        wts = rng.dirichlet(np.ones(3)).astype(np.float32)
        extra = 0.6 * (wts[0] * field + wts[1] * fine + wts[2] * rgb.mean(0)) + 0.2 * math.sin(b)
        out.append(extra + rng.normal(0, 0.02, size=extra.shape).astype(np.float32))
    return np.clip(np.stack(out[:bands]), 0.0, 1.0).astype(np.float32)


def scene_to_uint8(scene: np.ndarray) -> np.ndarray:
    """(3, H, W) float [0, 1] -> (H, W, 3) uint8."""
    return np.round(np.transpose(scene[:3], (1, 2, 0)) * 255).astype(np.uint8)


def make_scene_folder(root: PathLike, num_classes: int = 4, per_class: int = 8, size: int = 64, seed: int = 0,
                      ext: str = "png") -> Path:
    """Write an ImageFolder tree ``root/class_XX/img_XXXX.<ext>`` of synthetic RGB scenes; returns ``root``."""
    root = Path(root)
    ext = ext.lstrip(".").lower()
    for c, name in enumerate(demo_class_names(num_classes)):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = Image.fromarray(scene_to_uint8(make_scene(c, size, seed, i)))
            kwargs = {"quality": 95} if ext in ("jpg", "jpeg") else {}
            img.save(folder / f"img_{i:04d}.{ext}", **kwargs)
    return root


# ----------------------------------------------------------------------------------------------------------
# GeoTIFFs
_DTYPE_RANGE = {"uint8": 254.0, "uint16": 3000.0, "int16": 3000.0, "uint32": 3000.0, "int32": 3000.0,
                "float32": 1.0, "float64": 1.0}


def write_geotiff(path: PathLike, array: np.ndarray, transform, crs: Optional[str], nodata=None,
                  dtype: Optional[str] = None) -> Path:
    """Write a (bands, H, W) array to a GeoTIFF with the given affine ``transform`` and ``crs``."""
    import rasterio

    array = np.asarray(array)
    if array.ndim == 2:
        array = array[None]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = {"driver": "GTiff", "width": array.shape[2], "height": array.shape[1], "count": array.shape[0],
               "dtype": dtype or array.dtype.name, "transform": transform}
    if crs is not None:
        profile["crs"] = crs
    if nodata is not None:
        profile["nodata"] = nodata
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(array.astype(profile["dtype"]))
    return path


def make_geotiff_folder(root: PathLike, n: int = 2, bands: int = 3, size: int = 128, gsd: float = 1.0,
                        crs: str = "EPSG:32610", nodata: Optional[float] = 0, dtype: str = "uint16",
                        seed: int = 0, origin: Optional[Tuple[float, float]] = None) -> Path:
    """Write ``n`` synthetic tiles ``root/tile_XXX.tif`` side by side along x; returns ``root``.

    ``gsd`` is the pixel size in CRS units (metres for a projected CRS, degrees for a geographic one, e.g.
    ``gsd=1e-5`` with ``crs="EPSG:4326"``). Default origin: (500000, 4200000) for projected CRSs,
    (-122.0, 37.0) for geographic ones. Pixel values are scaled to the dtype (uint8: 1-255, uint16/int16:
    1-3001 like raw DNs, float: 0-1) and never equal ``nodata``; when ``nodata`` is set, a triangle in the
    top-left corner of every tile (row + col < size / 4) holds ``nodata`` in all bands.
    """
    from affine import Affine
    from rasterio.crs import CRS

    root = Path(root)
    if dtype not in _DTYPE_RANGE:
        raise ValueError(f"dtype must be one of {sorted(_DTYPE_RANGE)}, got {dtype!r}")
    geographic = CRS.from_user_input(crs).is_geographic
    x0, y0 = origin if origin is not None else ((-122.0, 37.0) if geographic else (500000.0, 4200000.0))
    span = _DTYPE_RANGE[dtype]
    rows, cols = np.indices((size, size))
    corner = (rows + cols) < size / 4
    for i in range(n):
        scene = make_scene(i % 4, size, seed, i, bands=bands)
        if np.issubdtype(np.dtype(dtype), np.integer):
            data = 1 + np.round(scene * span)
        else:
            data = 0.001 + scene * 0.998
        if nodata is not None:
            data = np.where(data == nodata, data + 1, data)
            data[:, corner] = nodata
        transform = Affine(gsd, 0.0, x0 + i * size * gsd, 0.0, -gsd, y0)  # north-up, origin top-left
        write_geotiff(root / f"tile_{i:03d}.tif", data, transform, crs, nodata, dtype)
    return root


# ----------------------------------------------------------------------------------------------------------
class DemoScenes(Dataset):
    """In-memory labelled synthetic scenes (``type: demo``); no files are read or written.

    Item ``i`` is class ``i % num_classes``, generated from ``(seed, class, i)`` as an RGB PIL image of
    ``size`` px. Items: ``transform(img)`` plus the label when ``with_label`` (a tuple from the transform is
    flattened, as in :class:`dataloaders.scenes.SceneDataset`).
    """

    def __init__(self, length: int = 256, size: int = 96, num_classes: int = 4, seed: int = 0,
                 transform: Optional[Callable] = None, with_label: bool = True) -> None:
        if length < 1 or size < 1 or num_classes < 1:
            raise ValueError(f"length, size and num_classes must be >= 1, got {length}, {size}, {num_classes}")
        self.length, self.size, self.num_classes, self.seed = int(length), int(size), int(num_classes), int(seed)
        self.transform = transform
        self.with_label = with_label
        self.classes = demo_class_names(self.num_classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.targets = [i % self.num_classes for i in range(self.length)]

    def __len__(self) -> int:
        return self.length

    def image(self, index: int) -> Image.Image:
        """The RGB PIL image of item ``index``."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for DemoScenes of length {self.length}")
        return Image.fromarray(scene_to_uint8(make_scene(index % self.num_classes, self.size, self.seed, index)))

    def __getitem__(self, index: int):
        label = index % self.num_classes
        img = self.image(index)
        out = self.transform(img) if self.transform is not None else img
        if not self.with_label:
            return out
        return (*out, label) if isinstance(out, tuple) else (out, label)
