"""Synthetic georeferenced building scenes for the segmentation demo and tests (no download).

:func:`make_building_scenes` writes, under ``root``:

* ``train/tile_<NNN>.tif`` and ``val/tile_<NNN>.tif``: 3-band uint8 GeoTIFFs in a UTM CRS (EPSG:32633 by default, 0.5 m
  pixels), textured ground with bright rectangular "roofs" (each roof has its own tint), the first training tile with
  a nodata triangle in its top-left corner (value 0 in all bands);
* ``buildings.geojson``: one polygon per roof, in EPSG:4326 (so that the loader has to reproject), attribute
  ``class`` = ``building``;
* ``seg_demo.yaml``: a segmentation config over these files (relative paths).

The task is meant to be easy (a tiny encoder learns it in a minute on a CPU); it checks the plumbing, not the
model. Run ``python -m dataloaders.seg_synthetic <root>`` to write a copy.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Dict, List, Tuple, Union

import numpy as np

from .synthetic import write_geotiff

PathLike = Union[str, os.PathLike]

DEMO_SEG_MEAN = [0.33, 0.37, 0.30]
DEMO_SEG_STD = [0.17, 0.16, 0.17]


def _roofs(rng: np.random.Generator, size: int, count: int, min_side: int, max_side: int) -> List[Tuple[int, ...]]:
    """Non-overlapping (row0, col0, row1, col1) pixel rectangles (1 px gap at least)."""
    taken = np.zeros((size, size), dtype=bool)
    out = []
    for _ in range(count * 20):
        if len(out) == count:
            break
        h, w = rng.integers(min_side, max_side + 1, size=2)
        r, c = rng.integers(1, size - h - 1), rng.integers(1, size - w - 1)
        if taken[r - 1:r + h + 1, c - 1:c + w + 1].any():
            continue
        taken[r:r + h, c:c + w] = True
        out.append((int(r), int(c), int(r + h), int(c + w)))
    return out


def building_scene(size: int, seed: int, count: int = 6, min_side: int = 8,
                   max_side: int = 22) -> Tuple[np.ndarray, np.ndarray, List[Tuple[int, ...]]]:
    """(image uint8 [3, S, S], mask uint8 [S, S] with 1 on roofs, roof rectangles) of one synthetic scene."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    phase = rng.uniform(0, 2 * np.pi, size=2)
    ground = 0.30 + 0.06 * np.sin(2 * np.pi * (3 * xx + 2 * yy) + phase[0]) + 0.05 * np.sin(9 * np.pi * yy + phase[1])
    img = np.stack([ground * 0.9, ground * 1.1, ground * 0.85]) + rng.normal(0, 0.04, size=(3, size, size))
    mask = np.zeros((size, size), dtype=np.uint8)
    roofs = _roofs(rng, size, count, min_side, max_side)
    for r0, c0, r1, c1 in roofs:
        tint = rng.uniform(0.75, 0.95, size=3)
        img[:, r0:r1, c0:c1] = tint[:, None, None] + rng.normal(0, 0.03, size=(3, r1 - r0, c1 - c0))
        mask[r0:r1, c0:c1] = 1
    img = np.clip(np.round(img * 254) + 1, 1, 255).astype(np.uint8)  # 0 is reserved for nodata
    return img, mask, roofs


def make_building_scenes(root: PathLike, n_train: int = 4, n_val: int = 2, size: int = 128, gsd: float = 0.5,
                         crs: str = "EPSG:32633", label_crs: str = "EPSG:4326", seed: int = 0,
                         count: int = 6) -> Dict[str, object]:
    """Write the demo scenes (see module docstring). Returns ``{"config", "labels", "train", "val", "masks"}``
    (``masks``: ``{tif path: ground-truth uint8 mask}``, nodata pixels = 255)."""
    import geopandas as gpd
    from affine import Affine
    from shapely.geometry import box

    root = Path(root)
    features, masks = [], {}
    x0, y0 = 400000.0, 5000000.0
    for split, n, offset in (("train", n_train, 0), ("val", n_val, 1000)):
        for i in range(n):
            k = offset + i
            img, mask, roofs = building_scene(size, seed * 7919 + k, count)
            transform = Affine(gsd, 0.0, x0 + k * (size + 8) * gsd, 0.0, -gsd, y0)
            if split == "train" and i == 0:  # a nodata corner: ignored by the loss and the metrics
                corner = np.add.outer(np.arange(size), np.arange(size)) < size // 4
                img[:, corner] = 0
                mask = np.where(corner, 255, mask).astype(np.uint8)
            path = write_geotiff(root / split / f"tile_{i:03d}.tif", img, transform, crs, nodata=0, dtype="uint8")
            masks[str(path)] = mask
            for r0, c0, r1, c1 in roofs:
                (xa, ya), (xb, yb) = transform @ (c0, r0), transform @ (c1, r1)
                features.append(box(min(xa, xb), min(ya, yb), max(xa, xb), max(ya, yb)))
    gdf = gpd.GeoDataFrame({"class": ["building"] * len(features)}, geometry=features, crs=crs).to_crs(label_crs)
    labels = root / "buildings.geojson"
    labels.write_text(gdf.to_json())
    config = root / "seg_demo.yaml"
    config.write_text(
        "# Synthetic building scenes written by dataloaders/seg_synthetic.py (paths relative to this file)\n"
        "data:\n  type: geotiff\n  img_dir: train\n  val_img_dir: val\n  labels: buildings.geojson\n"
        "  classes: [building]\n  class_column: class\n  scale: 255.0\n"
        f"  mean: {json.dumps(DEMO_SEG_MEAN)}\n  std: {json.dumps(DEMO_SEG_STD)}\n"
        f"  size: {min(64, size)}\n  length: 256\n  reference_gsd: {gsd}\n")
    return {"config": config, "labels": labels, "train": root / "train", "val": root / "val", "masks": masks}


if __name__ == "__main__":
    out = make_building_scenes(sys.argv[1] if len(sys.argv) > 1 else "seg_demo_data")
    print(f"wrote {out['config']} ({len(out['masks'])} tiles, labels {out['labels']})")
