"""Segmentation outputs: georeferenced prediction GeoTIFFs, polygons (GeoPackage) and overlay PNGs.

* ``pred_<stem>.tif``: uint8 class ids of the whole source raster, with its transform and CRS (a palette on band 1);
  a non-georeferenced source (a PNG pair) gets ``pred_<stem>.png`` instead.
* ``pred_<stem>.gpkg`` (``polygonize``): one polygon per connected region of each foreground class
  (``rasterio.features.shapes``, 4-connectivity), simplified with shapely (``simplify`` in CRS units; 0 keeps the
  pixel staircase), columns ``class_id``, ``class``, ``area``.
* ``overlay_<stem>.png`` (``overlays``): the image (first three bands, 2-98 % stretch) with predicted pixels tinted
  by class colour and the ground-truth outline in white.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from util.io import atomic_write

__all__ = ["PALETTE", "class_colour", "write_prediction_geotiff", "polygonize_prediction", "overlay_image",
           "PredictionWriter"]

PALETTE = [(0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60)]


def class_colour(cls: int) -> tuple[int, int, int]:
    """RGB of class id ``cls`` in prediction maps (background 0 black; the palette repeats)."""
    return PALETTE[cls % len(PALETTE)] if cls else PALETTE[0]


_colour = class_colour


def write_prediction_geotiff(path: str | os.PathLike, pred: np.ndarray, transform: Optional[Sequence[float]],
                             crs: Optional[str], num_classes: int) -> Path:
    """Write class ids ``pred`` [H, W] as a 1-band uint8 GeoTIFF (deflate, palette) with ``transform``/``crs``."""
    import rasterio
    from affine import Affine

    path = Path(path)
    profile = {"driver": "GTiff", "width": pred.shape[1], "height": pred.shape[0], "count": 1, "dtype": "uint8",
               "compress": "deflate"}
    if transform is not None:
        profile["transform"] = Affine(*transform[:6])
    if crs is not None:
        profile["crs"] = crs
    def write(tmp: str) -> None:
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(pred.astype(np.uint8)[None])
            dst.write_colormap(1, {c: (*_colour(c), 255) for c in range(max(num_classes, 2))})

    return atomic_write(path, write, by_name=True)


def polygonize_prediction(pred: np.ndarray, transform: Optional[Sequence[float]], crs: Optional[str],
                          class_names: Sequence[str], simplify: float = 0.0):
    """GeoDataFrame of the foreground regions of ``pred`` (see module docstring), in ``crs``."""
    import geopandas as gpd
    from affine import Affine
    from rasterio.features import shapes
    from shapely.geometry import shape

    affine = Affine(*transform[:6]) if transform is not None else Affine.identity()
    rows = []
    for geom, value in shapes(pred.astype(np.uint8), mask=pred > 0, connectivity=4, transform=affine):
        poly = shape(geom)
        if simplify > 0:
            poly = poly.simplify(simplify, preserve_topology=True)
        if poly.is_empty:
            continue
        cid = int(value)
        rows.append({"class_id": cid, "class": class_names[cid] if cid < len(class_names) else str(cid),
                     "area": float(poly.area), "geometry": poly})
    columns = ["class_id", "class", "area", "geometry"]
    return gpd.GeoDataFrame(rows or None, columns=columns, geometry="geometry", crs=crs)


def overlay_image(image: np.ndarray, pred: np.ndarray, truth: Optional[np.ndarray] = None,
                  ignore_index: int = 255, alpha: float = 0.45) -> np.ndarray:
    """uint8 RGB [H, W, 3]: ``image`` [C, H, W] (normalised values; first 3 bands, or one band as grey), stretched
    2-98 %, with predicted classes tinted and the ground-truth boundary (``truth``) drawn white."""
    img = image[:3] if image.shape[0] >= 3 else np.repeat(image[:1], 3, axis=0)
    lo, hi = np.percentile(img, 2), np.percentile(img, 98)
    rgb = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1).transpose(1, 2, 0)
    out = rgb.copy()
    for cls in np.unique(pred):
        if cls == 0:
            continue
        sel = pred == cls
        out[sel] = (1 - alpha) * rgb[sel] + alpha * np.asarray(_colour(int(cls))) / 255.0
    if truth is not None:
        fg = (truth > 0) & (truth != ignore_index)
        edge = np.zeros_like(fg)
        edge[1:, :] |= fg[1:, :] != fg[:-1, :]
        edge[:, 1:] |= fg[:, 1:] != fg[:, :-1]
        out[edge] = 1.0
    return (out * 255).round().astype(np.uint8)


class PredictionWriter:
    """Writes each evaluated tile's prediction (see module docstring) into ``out_dir``.

    ``paths``/``transforms``/``crs``: per tile of the evaluation source (``source.paths`` etc.).
    """

    def __init__(self, out_dir: str | os.PathLike, class_names: Sequence[str], paths: Sequence[str],
                 transforms: Sequence[Any], crs: Sequence[Optional[str]], polygonize: bool = False,
                 simplify: float = 0.0, overlays: bool = False, ignore_index: int = 255) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.class_names = list(class_names)
        self.paths, self.transforms, self.crs = list(paths), list(transforms), list(crs)
        self.polygonize, self.simplify, self.overlays = polygonize, float(simplify), overlays
        self.ignore_index = ignore_index
        self.written: list[Path] = []

    def write(self, tile: int, pred: np.ndarray, truth: Optional[np.ndarray] = None,
              image: Optional[np.ndarray] = None) -> None:
        stem = Path(self.paths[tile]).stem
        transform, crs = self.transforms[tile], self.crs[tile]
        if transform is not None:
            self.written.append(write_prediction_geotiff(self.out_dir / f"pred_{stem}.tif", pred, transform, crs,
                                                         len(self.class_names)))
        else:
            from PIL import Image

            img = Image.fromarray(pred.astype(np.uint8), mode="P")
            img.putpalette([v for c in range(256) for v in _colour(c)])
            img.save(self.out_dir / f"pred_{stem}.png")
            self.written.append(self.out_dir / f"pred_{stem}.png")
        if self.polygonize:
            gdf = polygonize_prediction(pred, transform, crs, self.class_names, self.simplify)
            target = self.out_dir / f"pred_{stem}.gpkg"
            atomic_write(target, lambda tmp: gdf.to_file(tmp, layer="predictions", driver="GPKG"), by_name=True)
            self.written.append(target)
        if self.overlays and image is not None:
            from PIL import Image

            path = self.out_dir / f"overlay_{stem}.png"
            Image.fromarray(overlay_image(image, pred, truth, self.ignore_index)).save(path)
            self.written.append(path)
