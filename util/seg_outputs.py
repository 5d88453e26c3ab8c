"""Segmentation outputs: georeferenced prediction GeoTIFFs, polygons (GeoPackage) and overlay PNGs.

* ``pred_<stem>.tif``: uint8 class ids of the whole source raster, with its transform and CRS (a palette on band 1);
  a non-georeferenced source (a PNG pair) gets ``pred_<stem>.png`` instead.
* ``pred_<stem>.gpkg`` (``polygonize``): one polygon per connected region of each foreground class
  (``rasterio.features.shapes``, 4-connectivity), simplified with shapely (``simplify`` in CRS units; 0 keeps the
  pixel staircase), columns ``class_id``, ``class``, ``area``. :func:`polygonize_strips` gives the same polygons
  from a class map read in horizontal strips (memory: one strip and the polygons; ``main_predict.py``).
* ``overlay_<stem>.png`` (``overlays``): the image (first three bands, 2-98 % stretch) with predicted pixels tinted
  by class colour and the ground-truth outline in white.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from util.io import atomic_write

__all__ = ["PALETTE", "class_colour", "write_prediction_geotiff", "polygonize_prediction", "polygonize_strips",
           "RegionMerger", "overlay_image", "PredictionWriter"]

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
    """GeoDataFrame of the foreground regions of the class map ``pred`` [H, W] (see module docstring), in ``crs``:
    :func:`polygonize_strips` of the map as one strip."""
    return polygonize_strips([(0, pred)], transform, crs, class_names, simplify)


def polygonize_strips(strips: Iterable[tuple[int, np.ndarray]], transform: Optional[Sequence[float]],
                      crs: Optional[str], class_names: Sequence[str], simplify: float = 0.0):
    """GeoDataFrame of the foreground regions of a class map given as horizontal ``strips``: ``(first row, class
    ids [h, W])`` top to bottom, each starting where the last ended. The same rows as :func:`polygonize_prediction`
    of the whole map, holding one strip and the polygons in memory: regions cut by strip boundaries are merged
    (:class:`RegionMerger`) before ``simplify``.

    Rows come in raster order of each region's first pixel. Geometries are built in pixel coordinates (exact;
    collinear vertices dropped), mapped by ``transform``, normalised (``shapely.normalize``: the simplification of
    a ring depends on the vertex it starts at), then simplified.
    """
    import geopandas as gpd
    import shapely
    from affine import Affine
    from shapely.affinity import affine_transform

    merger = RegionMerger()
    for row, strip in strips:
        merger.add(row, strip)
    affine = Affine(*transform[:6]) if transform is not None else Affine.identity()
    matrix = [affine.a, affine.b, affine.d, affine.e, affine.c, affine.f]
    rows = []
    for cid, poly in sorted(merger.finish(), key=lambda item: _first_pixel(item[1])):
        poly = shapely.normalize(affine_transform(poly.simplify(0), matrix))
        if simplify > 0:
            poly = poly.simplify(simplify, preserve_topology=True)
        if poly.is_empty:
            continue
        rows.append({"class_id": cid, "class": class_names[cid] if cid < len(class_names) else str(cid),
                     "area": float(poly.area), "geometry": poly})
    columns = ["class_id", "class", "area", "geometry"]
    return gpd.GeoDataFrame(rows or None, columns=columns, geometry="geometry", crs=crs)


def _first_pixel(poly) -> tuple[float, float]:
    """``(row, col)`` of the first pixel in raster order of a region polygon in pixel coordinates (its top row,
    the leftmost corner on it): unique per region."""
    coords = np.asarray(poly.exterior.coords)
    top = coords[:, 1].min()
    return float(top), float(coords[coords[:, 1] == top, 0].min())


class RegionMerger:
    """Connected regions (4-connectivity, as ``rasterio.features.shapes``) of each non-zero class of a class map
    fed as horizontal strips (:meth:`add`), as polygons in pixel coordinates (x = column, y = row).

    Each strip is polygonised alone; a piece that reaches the strip's last row stays open, and where a pixel of
    the next strip's first row has the same class as the pixel above it, the pieces of both join one region
    (union-find). A region no piece of the newest strip's last row belongs to is complete: its pieces are united
    (``shapely.union_all``) at once, so only the open pieces and the finished polygons are kept.
    """

    def __init__(self) -> None:
        self.open: dict[int, tuple[int, list[Any]]] = {}  # region id -> (class id, pieces)
        self.below: Optional[np.ndarray] = None  # region id of each pixel of the last row fed (0: none)
        self.below_class: Optional[np.ndarray] = None
        self.next_row = 0
        self.finished: list[tuple[int, Any]] = []
        self._next_id = 1

    def add(self, row: int, strip: np.ndarray) -> None:
        """Feed the class ids ``strip`` [h, W] of rows ``[row, row + h)`` (0 is no region)."""
        from affine import Affine
        from rasterio.features import shapes
        from shapely.geometry import shape

        if row != self.next_row:
            raise ValueError(f"strips must follow one another: got row {row}, expected {self.next_row}")
        strip = np.ascontiguousarray(strip, dtype=np.uint8)
        h, w = strip.shape
        self.next_row = row + h
        pieces = [(int(v), shape(g)) for g, v in shapes(strip, mask=strip > 0, connectivity=4,
                                                         transform=Affine.translation(0, row))]
        parent: dict[int, int] = {}  # union-find: open regions by their id, pieces i by -(i + 1)

        def find(k: int) -> int:
            while parent.get(k, k) != k:
                parent[k] = parent.get(parent[k], parent[k])
                k = parent[k]
            return k

        if self.below is not None:
            top = _row_labels(pieces, row, w)
            link = (top > 0) & (self.below > 0) & (self.below_class == strip[0])
            for region, label in set(zip(self.below[link].tolist(), top[link].tolist())):
                parent[find(-label)] = find(region)
        members: dict[int, tuple[int, list[Any]]] = {}
        for region, (cid, polys) in self.open.items():
            members.setdefault(find(region), (cid, []))[1].extend(polys)
        for i, (cid, poly) in enumerate(pieces):
            members.setdefault(find(-(i + 1)), (cid, []))[1].append(poly)
        last = _row_labels(pieces, row + h - 1, w)
        still_open = {find(-int(label)) for label in np.unique(last[last > 0])}
        self.open, renamed = {}, {}
        for root, (cid, polys) in members.items():
            if root in still_open:
                renamed[root] = self._next_id
                self.open[self._next_id] = (cid, polys)
                self._next_id += 1
            else:
                self.finished.append((cid, _unite(polys)))
        ids = np.zeros(len(pieces) + 1, np.int64)
        for i in range(len(pieces)):
            ids[i + 1] = renamed.get(find(-(i + 1)), 0)
        self.below, self.below_class = ids[last], strip[-1].copy()

    def finish(self) -> list[tuple[int, Any]]:
        """Every region as ``(class id, polygon)`` once the last strip is fed."""
        self.finished += [(cid, _unite(polys)) for cid, polys in self.open.values()]
        self.open, self.below, self.below_class = {}, None, None
        return self.finished


def _row_labels(pieces: Sequence[tuple[int, Any]], row: int, width: int) -> np.ndarray:
    """[W] int: 1 + the index in ``pieces`` of the piece covering each pixel of ``row`` (0: none)."""
    from affine import Affine
    from rasterio.features import rasterize

    on_row = [(poly, i + 1) for i, (_, poly) in enumerate(pieces) if poly.bounds[1] <= row < poly.bounds[3]]
    if not on_row:
        return np.zeros(width, np.int64)
    return rasterize(on_row, out_shape=(1, width), transform=Affine.translation(0, row), fill=0,
                     dtype="int32")[0].astype(np.int64)


def _unite(polys: list[Any]) -> Any:
    """One region's polygon from its pieces (edge-adjacent, so one polygon)."""
    import shapely

    if len(polys) == 1:
        return polys[0]
    merged = shapely.union_all(polys)
    if merged.geom_type != "Polygon":
        raise AssertionError(f"pieces of one region gave a {merged.geom_type}")
    return merged


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
