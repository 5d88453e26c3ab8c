"""Segmentation labels: polygons of vector files burnt on any window grid, and raw mask values mapped to class ids.

Polygons (Polygon/MultiPolygon, holes respected) are reprojected to each raster's CRS once (cached per CRS) and burnt
per window with ``rasterio.features.rasterize`` on the window's own affine transform: a pixel is labelled when its
centre lies inside a polygon (``all_touched``: when the polygon touches it). Where polygons overlap, the later
feature in the file wins. Class ids: 0 = background, ``1 + classes.index(name)`` for the foreground classes
(``data.classes``, see ``dataloaders.config``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from .errors import DataError, MissingDataError

__all__ = ["VECTOR_SUFFIXES", "VectorLabels", "mask_to_classes"]

VECTOR_SUFFIXES = (".geojson", ".json", ".gpkg", ".shp", ".fgb", ".kml", ".gml")


def _read_vector_file(path: Path):
    import geopandas as gpd

    try:
        return gpd.read_file(path)
    except Exception as exc:  # pyogrio/fiona raise many types
        raise DataError(f"{path}: cannot read the label file (expected GeoJSON/GPKG/Shapefile/...): "
                        f"{str(exc).splitlines()[0]}") from None


def _read_vectors(path: Path):
    """One vector file, or every vector file under a folder (e.g. SpaceNet's one GeoJSON per tile), concatenated
    in the first non-empty file's CRS (files without features are skipped)."""
    import geopandas as gpd
    import pandas as pd

    if not path.exists():
        raise MissingDataError(f"{path}: label file not found")
    if path.is_file():
        return _read_vector_file(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in VECTOR_SUFFIXES)
    if not files:
        raise DataError(f"{path}: no vector files ({', '.join(VECTOR_SUFFIXES)}) in the label folder")
    frames = [f for f in (_read_vector_file(p) for p in files) if len(f)]
    if not frames:
        return gpd.GeoDataFrame(geometry=[], crs="EPSG:4326")
    for p, f in zip(files, frames):
        if f.crs is None:
            raise DataError(f"{p}: label file has no CRS; expected one (e.g. EPSG:4326)")
    crs = frames[0].crs
    return gpd.GeoDataFrame(pd.concat([f.to_crs(crs) for f in frames], ignore_index=True), crs=crs)


class VectorLabels:
    """Labelled polygons of a vector file, rasterised on any window grid.

    Args:
        path: any vector file geopandas reads, a folder of them (concatenated), or a GeoDataFrame.
        classes: foreground class names; polygon values are ``1 + classes.index(name)``.
        class_column: attribute holding each polygon's class name; None: every polygon is class 1.

    Non-polygon features (points, lines) are dropped with a count in ``dropped``; invalid polygons are repaired
    with ``shapely.make_valid``.
    """

    def __init__(self, path, classes: Sequence[str] = ("building",), class_column: Optional[str] = None) -> None:
        import geopandas as gpd
        import shapely

        self.classes = [str(c) for c in classes]
        if isinstance(path, gpd.GeoDataFrame):
            gdf, self.source = path, "<GeoDataFrame>"
        else:
            self.source = str(path)
            gdf = _read_vectors(Path(path))
        if gdf.crs is None and len(gdf):
            raise DataError(f"{self.source}: label file has no CRS; expected one (e.g. EPSG:4326)")
        gdf = gdf[gdf.geometry.notna() & ~gdf.geometry.is_empty]
        polygonal = gdf.geometry.geom_type.isin(["Polygon", "MultiPolygon"])
        self.dropped = int((~polygonal).sum())
        gdf = gdf[polygonal].copy()
        if not len(gdf):
            values = np.zeros(0, dtype=np.uint8)  # no polygons: the builder says so, naming the file
        elif class_column is None:
            if len(self.classes) != 1:
                raise DataError(f"{self.source}: {len(self.classes)} classes need a class column")
            values = np.ones(len(gdf), dtype=np.uint8)
        else:
            if class_column not in gdf.columns:
                raise DataError(f"{self.source}: no column {class_column!r} (data.class_column); columns: "
                                f"{[c for c in gdf.columns if c != 'geometry']}")
            names = gdf[class_column].astype(str)
            unknown = sorted(set(names) - set(self.classes))
            if unknown:
                raise DataError(f"{self.source}: column {class_column!r} has values {unknown[:5]} not in "
                                f"data.classes {self.classes}; add them to data.classes")
            values = np.array([1 + self.classes.index(n) for n in names], dtype=np.uint8)
        geoms = shapely.make_valid(gdf.geometry.values)
        self.gdf = gpd.GeoDataFrame({"value": values}, geometry=list(geoms), crs=gdf.crs)
        self._by_crs: Dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.gdf)

    def __getstate__(self):  # DataLoader workers rebuild their reprojection cache
        state = self.__dict__.copy()
        state["_by_crs"] = {}
        return state

    def in_crs(self, crs: str):
        """The polygons reprojected to ``crs`` (cached), with their spatial index built."""
        frame = self._by_crs.get(crs)
        if frame is None:
            frame = self.gdf.to_crs(crs) if len(self.gdf) else self.gdf.set_crs(crs, allow_override=True)
            frame.sindex  # noqa: B018 - build the spatial index once
            self._by_crs[crs] = frame
        return frame

    def rasterize(self, transform, shape: Tuple[int, int], crs: str, all_touched: bool = False) -> np.ndarray:
        """uint8 [H, W] class ids (0 = background) of the window with affine ``transform`` and ``shape`` in ``crs``."""
        from rasterio.features import rasterize
        from shapely.geometry import box

        h, w = int(shape[0]), int(shape[1])
        out = np.zeros((h, w), dtype=np.uint8)
        if not len(self.gdf):
            return out
        frame = self.in_crs(crs)
        xs, ys = zip(*(transform @ (c, r) for r, c in ((0, 0), (0, w), (h, 0), (h, w))))
        hits = frame.sindex.query(box(min(xs), min(ys), max(xs), max(ys)), predicate="intersects")
        if len(hits) == 0:
            return out
        hits = np.sort(hits)  # file order: later features win where polygons overlap
        shapes = zip(frame.geometry.values[hits], frame["value"].values[hits])
        return rasterize(shapes, out_shape=(h, w), transform=transform, fill=0, all_touched=all_touched,
                         dtype="uint8")


def mask_to_classes(raw: np.ndarray, mask_values: Optional[Sequence[int]], num_classes: int,
                    ignore_index: int = 255) -> np.ndarray:
    """uint8 class ids of a raw mask (any shape): the pixels holding ``mask_values[i]`` (background, class 1, ...)
    get id ``i``; without ``mask_values`` the raw value is the id (``0 .. num_classes - 1``). Every other value
    becomes ``ignore_index``."""
    label = np.full(raw.shape, ignore_index, dtype=np.uint8)
    for cls, value in enumerate(mask_values or range(num_classes)):
        label[raw == value] = cls
    return label
