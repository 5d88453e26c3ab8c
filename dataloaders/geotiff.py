"""GeoTIFF datasets read with rasterio: any band count and dtype, ground GSD per window, CRS, nodata masks.

Pieces (re-exported here):

* :func:`build_tile_index` / :func:`load_aoi` / :func:`read_raster_info` (``geo_index``): a geopandas
  GeoDataFrame of tiles (multi-band files or band-file scenes) with their read grids, in one CRS, optionally
  restricted to an area-of-interest polygon file; headers cached and shared by all ranks.
* :class:`GridReader` (``geo_read``): plain, decimated (overviews, ``gsd_range``) and warped reads; a pixel's
  value does not depend on the window that reads it.
* :class:`DistributedRandomWindowSampler` (``geo_sampler``): distributed, epoch-seeded, area-weighted windows.
* :class:`GeoTiffDataset`: reads a window. A sample is the dict (torchgeo style: it carries its metadata)::

      image      FloatTensor[C, h, w]  raw values / scale (invalid pixels hold whatever the file holds)
      mask       BoolTensor[h, w]      True = valid pixel (see nodata_mode)
      band_mask  BoolTensor[C, h, w]   True = valid value of that band
      gsd        float                 ground metres per pixel at the window centre (mean of x and y)
      gsd_xy     (float, float)        ground metres along the pixel x and y axes
      res        float                 util.gsd.reference_gsd_factor(gsd, reference_gsd) (1.0 without reference_gsd)
      crs        str                   CRS of the window grid ("EPSG:32610" or WKT)
      transform  (a, b, c, d, e, f)    affine of the window grid: pixel (col, row) -> crs coordinates
      bounds     (minx, miny, maxx, maxy) in crs
      path       str                   the tile's file (scene: "<folder>/<wildcard text>", e.g. .../T33UUP_20240101)

  ``rasterio.features.rasterize(shapes, out_shape=(h, w), transform=Affine(*sample["transform"]))`` puts
  vector labels (reprojected to ``crs``) on the window's pixels.
* :class:`GeoTiffPretrainDataset`: turns windows into the pretraining 4-tuple.

Relative resolution. The model's positional embedding takes a *relative* scale ``res`` (not metres). For
GeoTIFF configs the crop-derived res of the pretraining transform is multiplied by
``util.gsd.reference_gsd_factor(gsd, reference_gsd)`` (formulas in ``util/gsd.py``; ``relative_res`` is
re-exported here), so pixels twice as large on the ground as the reference get twice the res; ``gsd`` is the
window's ground GSD as read (so a ``gsd_range`` read at 4x the tile's GSD gets 4x the res).

Valid mask: a band value is invalid when it equals that band's nodata (``data.nodata``, one value or one per
band, overriding the files' own), is NaN, lies outside every file's footprint, or is masked by the file's
internal mask / alpha band. ``nodata_mode: any`` (default) marks a pixel invalid when any band is invalid;
``all`` only when all are. The pretraining view sets invalid values to the band mean (0 after
normalisation).
"""
from __future__ import annotations

import math
import os
from typing import Callable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from affine import Affine
from torch.utils.data import Dataset

from util.gsd import reference_gsd_factor, relative_res

from .errors import DataError
from .geo_index import (RasterInfo, build_tile_index, crs_to_string, find_rasters, ground_gsd_at,
                        ground_sample_distance, load_aoi, read_raster_info, to_crs)
from .geo_read import NODATA_MODES, RESAMPLING_METHODS, GridReader
from .geo_sampler import DistributedRandomWindowSampler, WindowDrawer, WindowSpec

PathLike = Union[str, os.PathLike]

__all__ = ["GeoTiffDataset", "GeoTiffPretrainDataset", "DistributedRandomWindowSampler", "WindowSpec",
           "build_tile_index", "load_aoi", "read_raster_info", "find_rasters", "ground_sample_distance",
           "ground_gsd_at", "relative_res", "RasterInfo", "GridReader", "geotiff_dataset_from_config",
           "NODATA_MODES", "RESAMPLING_METHODS"]


def _window_bounds(transform, row: int, col: int, height: int, width: int) -> Tuple[float, float, float, float]:
    """(minx, miny, maxx, maxy) of a pixel window in the raster's CRS (handles any affine transform)."""
    xs, ys = [], []
    for r, c in ((row, col), (row, col + width), (row + height, col), (row + height, col + width)):
        x, y = transform @ (c, r)
        xs.append(x)
        ys.append(y)
    return float(min(xs)), float(min(ys)), float(max(xs)), float(max(ys))


class GeoTiffDataset(Dataset):
    """Windows of a set of GeoTIFFs or band-file scenes (folder, glob, file or list; or a prebuilt tile index).

    Indexing: ``dataset[WindowSpec(tile, row, col, h, w)]`` reads that window of the tile's read grid (what
    :class:`DistributedRandomWindowSampler` yields); ``dataset[i]`` with an int reads a random window drawn
    deterministically from ``(seed, i)``, so the dataset also works with ordinary samplers.

    Args:
        source: folder / file / list of files (with ``band_files``: the folder of scene folders), or a
            GeoDataFrame from :func:`build_tile_index`.
        window_size: side (px) of the windows drawn for int indexes and by :meth:`make_sampler`.
        bands: 1-based band indexes to read (default: all bands; not with ``band_files``).
        nodata: nodata overriding the files' own: one value, or one per band read.
        scale: raw values are divided by it (e.g. 255 for 8-bit imagery, 10000 for Sentinel-2 L2A DNs).
        aoi: area-of-interest vector file (or shapely geometry in the index CRS).
        length: nominal length (``len(dataset)``); default: number of tiles.
        seed: seed of int-indexed windows and of the ``gsd_range`` draws.
        glob: file pattern under a folder.
        expected_bands: band count every tile must have when ``bands`` is not given.
        verify: read every file's last row when building the index (truncated files fail early, by name).
        band_files: per-band file patterns of a scene (``["*_B02.tif", "*_B03.tif"]``), stacked in order.
        scene_glob: scene folders under ``source``, each searched separately (default: ``source`` itself);
            files of one scene agree on what the patterns' wildcards match (see ``geo_index.find_scenes``).
        crs: read every tile in this CRS (mixed-CRS collections; windows are read warped).
        target_gsd: cell of the read grids in metres (see ``geo_index.grid_cell``).
        resampling: method of warped reads (default ``bilinear``); ``downsampling`` the method of
            ``gsd_range`` reads (default ``average``). Any ``rasterio.enums.Resampling`` name.
        mosaic: windows may extend past their tile; they are read from every tile they touch.
        gsd_range: ``(min, max)`` metres: each window is read at a GSD drawn log-uniformly from the range
            (never finer than the tile's own), covering ``gsd / tile_gsd`` times more ground.
        nodata_mode: ``any`` (default: a pixel is invalid when any band is invalid) or ``all``.
        index_cache: header cache file (None: next to the data or in the user cache; False: off).
        reference_gsd: metres mapping to ``res`` 1 in the samples (``util.gsd.reference_gsd_factor``).
    """

    def __init__(self, source, window_size: int = 256, bands: Optional[Sequence[int]] = None,
                 nodata=None, scale: float = 1.0, aoi=None, length: Optional[int] = None,
                 seed: int = 0, glob: Optional[str] = None, expected_bands: Optional[int] = None,
                 verify: bool = True, *, band_files: Optional[Sequence[str]] = None, scene_glob: Optional[str] = None,
                 crs: Optional[str] = None, target_gsd: Optional[float] = None, resampling: Optional[str] = None,
                 downsampling: Optional[str] = None, mosaic: bool = False,
                 gsd_range: Optional[Sequence[float]] = None, nodata_mode: str = "any", index_cache=None,
                 reference_gsd: Optional[float] = None) -> None:
        import geopandas as gpd

        if nodata_mode not in NODATA_MODES:
            raise ValueError(f"nodata_mode must be one of {NODATA_MODES}, got {nodata_mode!r}")
        for name, method in (("resampling", resampling), ("downsampling", downsampling)):
            if method is not None and method not in RESAMPLING_METHODS:
                raise ValueError(f"{name} must be one of {', '.join(RESAMPLING_METHODS)}, got {method!r}")
        if gsd_range is not None and not (len(gsd_range) == 2 and 0 < gsd_range[0] <= gsd_range[1]):
            raise ValueError(f"gsd_range must be [min, max] metres with 0 < min <= max, got {gsd_range!r}")
        if isinstance(source, gpd.GeoDataFrame):
            self.tile_index = source
        else:
            self.tile_index = build_tile_index(source, glob=glob, aoi=aoi, bands=bands, crs=crs,
                                               expected_bands=expected_bands, verify=verify, band_files=band_files,
                                               scene_glob=scene_glob, target_gsd=target_gsd, nodata=nodata,
                                               index_cache=index_cache)
        self.window_size = int(window_size)
        self.bands = [int(b) for b in bands] if bands else None
        self.scale = float(scale)
        self.seed = int(seed)
        self.length = int(length) if length else len(self.tile_index)
        self.num_bands = int(self.tile_index["count"].iloc[0])
        self.mosaic = bool(mosaic)
        self.gsd_range = None if gsd_range is None else (float(gsd_range[0]), float(gsd_range[1]))
        self.nodata_mode = nodata_mode
        self.reference_gsd = None if reference_gsd is None else float(reference_gsd)
        self._paths = list(self.tile_index["path"])
        self._gsd = [float(g) for g in self.tile_index["gsd"]]
        self._crs = [str(c) for c in self.tile_index["crs"]]
        self._transforms = [Affine(*t) for t in self.tile_index["transform"]]
        self.tile_shapes = [(int(h), int(w)) for h, w in zip(self.tile_index["height"], self.tile_index["width"])]
        if not self.mosaic and not any(h >= self.window_size and w >= self.window_size for h, w in self.tile_shapes):
            biggest = max(self.tile_shapes, key=lambda hw: hw[0] * hw[1])
            raise DataError(f"{self._paths[0] if len(self._paths) == 1 else source}: no raster can hold a "
                            f"{self.window_size}x{self.window_size} px window (largest is {biggest[0]}x{biggest[1]} "
                            f"px); use a smaller data.size, or data.mosaic: true where tiles have neighbours")
        self.reader = GridReader(self.tile_index, resampling=resampling or "bilinear",
                                 downsampling=downsampling or "average")
        self._drawer: Optional[WindowDrawer] = None
        self._sindex = None
        self._index_crs: Optional[str] = None

    def __len__(self) -> int:
        return self.length

    def __getstate__(self):  # the spatial index is rebuilt lazily in each worker
        state = self.__dict__.copy()
        state["_sindex"] = None
        return state

    @property
    def drawer(self) -> WindowDrawer:
        """The :class:`WindowDrawer` of this dataset's window size (and mosaic mode)."""
        if self._drawer is None:
            self._drawer = WindowDrawer(self.tile_index, self.window_size, mosaic=self.mosaic)
        return self._drawer

    def make_sampler(self, length: Optional[int] = None, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                     shuffle: bool = True) -> DistributedRandomWindowSampler:
        """A :class:`DistributedRandomWindowSampler` over this dataset's tiles, window size and mosaic mode."""
        return DistributedRandomWindowSampler(self.tile_index, self.window_size, length or self.length,
                                              num_replicas=num_replicas, rank=rank, seed=seed, shuffle=shuffle,
                                              mosaic=self.mosaic)

    def window_for_index(self, i: int) -> WindowSpec:
        """The deterministic random window of integer index ``i``."""
        return self.drawer.draw(1, np.random.default_rng([self.seed, int(i), 7]))[0]

    def gsd_factor(self, spec: WindowSpec) -> float:
        """How many read-grid pixels one output pixel of ``spec`` covers (1 without ``gsd_range``).

        Drawn log-uniformly (deterministically from the seed and the window) so that the read GSD lies in
        ``gsd_range``, never below the tile's own GSD, rounded to 0.001; without ``mosaic`` capped so the
        window fits its tile. The sample's ``gsd`` is measured on the resulting grid.
        """
        if self.gsd_range is None:
            return 1.0
        tile = int(spec.tile)
        native = self._gsd[tile]
        lo, hi = max(self.gsd_range[0], native), max(self.gsd_range[1], native)
        rng = np.random.default_rng([self.seed, tile, int(spec.row) % 2**31, int(spec.col) % 2**31, 13])
        gsd = math.exp(rng.uniform(math.log(lo), math.log(hi))) if hi > lo else lo
        factor = round(gsd / native, 3)  # 0.1 % steps: 2x stays 2x across tiles (res is measured, not assumed)
        if not self.mosaic:
            h, w = self.tile_shapes[tile]
            factor = min(factor, h / spec.height, w / spec.width)
        return max(factor, 1.0)

    def window_grid(self, spec: WindowSpec) -> Tuple[Affine, float]:
        """``(transform, factor)`` of the output grid of ``spec`` in its tile's read CRS.

        With a ``gsd_range`` factor f > 1 the window keeps its centre (to the nearest coarse pixel: its origin
        is a multiple of f pixels from the tile's) and covers f times more ground per side (shifted back
        inside the tile without ``mosaic``).
        """
        tile, row, col, height, width = (int(v) for v in spec)
        factor = self.gsd_factor(spec)
        if factor == 1.0:
            return self._transforms[tile] @ Affine.translation(col, row), 1.0
        cy, cx = row + height / 2.0, col + width / 2.0
        # on the tile's grid coarsened by `factor` (its origin the tile's), so that windows of one factor share
        # their pixels: a pixel has one value whatever the window
        r0 = round((cy - height * factor / 2.0) / factor) * factor
        c0 = round((cx - width * factor / 2.0) / factor) * factor
        if not self.mosaic:
            h, w = self.tile_shapes[tile]
            r0 = min(max(r0, 0.0), math.floor(h / factor - height + 1e-9) * factor)
            c0 = min(max(c0, 0.0), math.floor(w / factor - width + 1e-9) * factor)
        return self._transforms[tile] @ Affine.translation(c0, r0) @ Affine.scale(factor), factor

    def _contributors(self, tile: int, crs: str, transform: Affine, height: int, width: int) -> List[int]:
        """Tiles whose footprint meets the window grown by the resampling kernel's reach: ``tile`` first, then
        the others in index order."""
        if not self.mosaic:
            return [tile]
        from shapely.geometry import box

        if self._index_crs is None:
            self._index_crs = crs_to_string(self.tile_index.crs)
        m = self.reader.reach(tile)  # the resampling kernel reaches this far past the window
        geom = to_crs(box(*_window_bounds(transform, -m, -m, height + 2 * m, width + 2 * m)), crs, self._index_crs)
        if self._sindex is None:
            self._sindex = self.tile_index.sindex
        hits = sorted(int(i) for i in self._sindex.query(geom, predicate="intersects"))
        return [tile] + [i for i in hits if i != tile]

    def read_window(self, spec: WindowSpec) -> dict:
        """Read one window; see the module docstring for the sample dict."""
        tile, row, col, height, width = (int(v) for v in spec)
        path = self._paths[tile]
        h, w = self.tile_shapes[tile]
        if not self.mosaic and (row < 0 or col < 0 or row + height > h or col + width > w):
            raise DataError(f"{path}: window rows {row}:{row + height}, cols {col}:{col + width} is outside the "
                            f"raster ({h} x {w} px)")
        transform, factor = self.window_grid(spec)
        crs = self._crs[tile]
        tiles = self._contributors(tile, crs, transform, height, width)
        image, band_valid = self.reader.read(tiles, crs, transform, height, width, decimated=factor > 1.0)
        valid = band_valid.all(0) if self.nodata_mode == "any" else band_valid.any(0)
        try:
            gsd_x, gsd_y = ground_gsd_at(crs, transform, width / 2.0, height / 2.0)
        except ValueError as exc:
            raise DataError(f"{path}: cannot compute the ground sample distance of window rows {row}:"
                            f"{row + height}, cols {col}:{col + width}: {exc}") from None
        if self.scale != 1.0:
            image /= self.scale
        gsd = 0.5 * (gsd_x + gsd_y)
        return {
            "image": torch.from_numpy(image),
            "mask": torch.from_numpy(np.ascontiguousarray(valid)),
            "band_mask": torch.from_numpy(band_valid),
            "gsd": gsd,
            "gsd_xy": (gsd_x, gsd_y),
            "res": reference_gsd_factor(gsd, self.reference_gsd),
            "crs": crs,
            "transform": tuple(transform)[:6],
            "bounds": _window_bounds(transform, 0, 0, height, width),
            "path": path,
        }

    def __getitem__(self, idx) -> dict:
        if isinstance(idx, (int, np.integer)):
            if not -self.length <= idx < self.length:
                raise IndexError(f"index {idx} out of range for a dataset of length {self.length}")
            idx = self.window_for_index(int(idx) % self.length)
        return self.read_window(WindowSpec(*idx))


def geotiff_dataset_from_config(d: Mapping, window_size: int, seed: int = 0) -> GeoTiffDataset:
    """The :class:`GeoTiffDataset` of a validated ``data`` section (types naip, sentinel2, geotiff)."""
    expected = None if d.get("bands") else len(d["mean"])
    return GeoTiffDataset(d["img_dir"], window_size=window_size, bands=d.get("bands"), nodata=d.get("nodata"),
                          scale=d.get("scale", 1.0), aoi=d.get("aoi"), length=d.get("length"), seed=seed,
                          glob=d.get("glob"), expected_bands=expected, band_files=d.get("band_files"),
                          scene_glob=d.get("scene_glob"), crs=d.get("crs"), target_gsd=d.get("target_gsd"),
                          resampling=d.get("resampling"), downsampling=d.get("downsampling"),
                          mosaic=bool(d.get("mosaic", False)), gsd_range=d.get("gsd_range"),
                          nodata_mode=d.get("nodata_mode") or "any", index_cache=d.get("index_cache"),
                          reference_gsd=d.get("reference_gsd"))


class GeoTiffPretrainDataset(Dataset):
    """Pretraining view of a :class:`GeoTiffDataset`: items ``(img, input_res, target, target_res)``.

    Per window: invalid pixels are set to the band mean (so they are 0 after normalisation), the
    pretraining transform (normalisation, flip, square random resized crop from the whole window) runs,
    and both res values are multiplied by ``util.gsd.reference_gsd_factor(gsd, reference_gsd)``.
    With ``min_valid > 0`` a window whose valid fraction is lower is redrawn (up to ``max_redraws`` times,
    deterministically from the index) inside the same tile.
    """

    def __init__(self, geo: GeoTiffDataset, transform: Callable, mean: Sequence[float],
                 reference_gsd: Optional[float] = None, min_valid: float = 0.0, max_redraws: int = 10) -> None:
        if len(mean) != geo.num_bands:
            raise DataError(f"{geo.tile_index['path'].iloc[0]}: reads {geo.num_bands} band(s) but data.mean has "
                            f"{len(mean)} entries")
        self.geo = geo
        self.transform = transform
        self.mean = torch.as_tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
        self.reference_gsd = reference_gsd
        self.min_valid = float(min_valid)
        self.max_redraws = int(max_redraws)

    @property
    def tile_index(self):
        """The tile index (GeoDataFrame) of the underlying dataset."""
        return self.geo.tile_index

    @property
    def window_size(self) -> int:
        return self.geo.window_size

    def __len__(self) -> int:
        return len(self.geo)

    def _read(self, idx) -> dict:
        sample = self.geo[idx]
        if self.min_valid <= 0:
            return sample
        spec = WindowSpec(*idx) if not isinstance(idx, (int, np.integer)) else self.geo.window_for_index(int(idx))
        rng = np.random.default_rng([self.geo.seed, spec.tile, spec.row % 2**31, spec.col % 2**31, 11])
        best = sample
        for _ in range(self.max_redraws):
            if float(sample["mask"].float().mean()) >= self.min_valid:
                return sample
            redraw = self.geo.drawer.draw_in_tile(spec.tile, rng)
            sample = self.geo.read_window(redraw._replace(height=spec.height, width=spec.width))
            if sample["mask"].float().mean() > best["mask"].float().mean():
                best = sample
        return sample if float(sample["mask"].float().mean()) >= self.min_valid else best

    def __getitem__(self, idx):
        sample = self._read(idx)
        valid = sample["band_mask"] & sample["mask"][None]
        img = torch.where(valid, sample["image"], self.mean)
        img = torch.nan_to_num(img)
        inp, input_res, target, target_res = self.transform(img)
        factor = reference_gsd_factor(sample["gsd"], self.reference_gsd)
        input_res, target_res = input_res * factor, target_res * factor
        return inp, input_res, target, target_res
