"""GeoTIFF datasets read with rasterio: any band count and dtype, real GSD, CRS, bounds and nodata masks.

Pieces (re-exported here):

* :func:`build_tile_index` / :func:`load_aoi` / :func:`read_raster_info` (``geo_index``): a geopandas
  GeoDataFrame of footprints in one CRS, optionally restricted to an area-of-interest polygon file.
* :class:`DistributedRandomWindowSampler` (``geo_sampler``): distributed, epoch-seeded, area-weighted windows.
* :class:`GeoTiffDataset`: reads a window; a sample is the dict ``{"image": FloatTensor[C,h,w] (raw values
  divided by ``scale``), "mask": BoolTensor[h,w] (True = valid), "gsd": float (metres, mean of x and y),
  "crs": str, "bounds": (minx, miny, maxx, maxy) in the file's CRS, "path": str}``.
* :class:`GeoTiffPretrainDataset`: turns windows into the pretraining 4-tuple.

Relative resolution. The model's positional embedding takes a *relative* scale ``res`` (not metres). For
GeoTIFF configs the crop-derived res of the pretraining transform is multiplied by
``relative_res(gsd, reference_gsd) = gsd / reference_gsd``::

    target_res = (crop_side - 1) / T * base_resolution * gsd / reference_gsd
    input_res  = target_res * T / input_size

so pixels twice as large on the ground as the reference get twice the res. Without ``reference_gsd`` the
factor is 1 (the original NAIP/Sentinel-2 behaviour, which ignored the real GSD). At evaluation time a user
who wants real GSD can pass ``relative_res(gsd_m, reference_gsd_m)`` as ``input_res``.

Valid mask: with a nodata value (``data.nodata`` overriding the file's own) a pixel is invalid when *all*
selected bands equal it; without one, GDAL's dataset mask (alpha band / internal mask) is used. NaNs are
always invalid.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import DataError
from .geo_index import (RasterInfo, build_tile_index, find_rasters, ground_sample_distance, load_aoi,
                        read_raster_info)
from .geo_sampler import DistributedRandomWindowSampler, WindowDrawer, WindowSpec

PathLike = Union[str, os.PathLike]

__all__ = ["GeoTiffDataset", "GeoTiffPretrainDataset", "DistributedRandomWindowSampler", "WindowSpec",
           "build_tile_index", "load_aoi", "read_raster_info", "find_rasters", "ground_sample_distance",
           "relative_res", "RasterInfo"]


def relative_res(gsd, reference_gsd: float):
    """Model-relative resolution of a ground sample distance: ``gsd / reference_gsd`` (both in metres).

    Works on floats and tensors. ``reference_gsd`` is the GSD that should map to res 1 (e.g. 0.6 for NAIP,
    10 for Sentinel-2 10 m bands).
    """
    if reference_gsd is None or float(reference_gsd) <= 0:
        raise ValueError(f"reference_gsd must be a positive number of metres, got {reference_gsd!r}")
    return gsd / float(reference_gsd)


def _window_bounds(transform, row: int, col: int, height: int, width: int) -> Tuple[float, float, float, float]:
    """(minx, miny, maxx, maxy) of a pixel window in the raster's CRS (handles any affine transform)."""
    xs, ys = [], []
    for r, c in ((row, col), (row, col + width), (row + height, col), (row + height, col + width)):
        x, y = transform @ (c, r)
        xs.append(x)
        ys.append(y)
    return float(min(xs)), float(min(ys)), float(max(xs)), float(max(ys))


class GeoTiffDataset(Dataset):
    """Windows of a set of GeoTIFFs (folder, glob, file or list; or a prebuilt tile index).

    Indexing: ``dataset[WindowSpec(tile, row, col, h, w)]`` reads that window (what
    :class:`DistributedRandomWindowSampler` yields); ``dataset[i]`` with an int reads a random window drawn
    deterministically from ``(seed, i)``, so the dataset also works with ordinary samplers.

    Args:
        source: folder / file / list of files, or a GeoDataFrame from :func:`build_tile_index`.
        window_size: side (px) of the windows drawn for int indexes and by :meth:`make_sampler`.
        bands: 1-based band indexes to read (default: all bands).
        nodata: nodata value overriding the files' own.
        scale: raw values are divided by it (e.g. 255 for 8-bit imagery, 10000 for Sentinel-2 L2A DNs).
        aoi: area-of-interest vector file (or shapely geometry in the index CRS).
        length: nominal length (``len(dataset)``); default: number of tiles.
        seed: seed of int-indexed windows.
        glob: file pattern under a folder.
        expected_bands: band count every file must have when ``bands`` is not given.
        verify: read every file's last row at start-up (truncated files fail early, by name).
    """

    def __init__(self, source, window_size: int = 256, bands: Optional[Sequence[int]] = None,
                 nodata: Optional[float] = None, scale: float = 1.0, aoi=None, length: Optional[int] = None,
                 seed: int = 0, glob: Optional[str] = None, expected_bands: Optional[int] = None,
                 verify: bool = True) -> None:
        import geopandas as gpd

        if isinstance(source, gpd.GeoDataFrame):
            self.tile_index = source
        else:
            self.tile_index = build_tile_index(source, glob=glob, aoi=aoi, bands=bands,
                                               expected_bands=expected_bands, verify=verify)
        self.window_size = int(window_size)
        self.bands = [int(b) for b in bands] if bands else None
        self.nodata = None if nodata is None else float(nodata)
        self.scale = float(scale)
        self.seed = int(seed)
        self.length = int(length) if length else len(self.tile_index)
        self.num_bands = len(self.bands) if self.bands else int(self.tile_index["count"].iloc[0])
        self._paths = list(self.tile_index["path"])
        self._gsd = [float(g) for g in self.tile_index["gsd"]]
        self._crs = [str(c) for c in self.tile_index["crs"]]
        self.tile_shapes = [(int(h), int(w)) for h, w in zip(self.tile_index["height"], self.tile_index["width"])]
        if not any(h >= self.window_size and w >= self.window_size for h, w in self.tile_shapes):
            biggest = max(self.tile_shapes, key=lambda hw: hw[0] * hw[1])
            raise DataError(f"{self._paths[0] if len(self._paths) == 1 else source}: no raster can hold a "
                            f"{self.window_size}x{self.window_size} px window (largest is {biggest[0]}x{biggest[1]} "
                            f"px); use a smaller data.size")
        self._drawer: Optional[WindowDrawer] = None
        self._handles: Dict[str, object] = {}
        self._pid = os.getpid()

    # -- pickling for DataLoader workers: never ship open GDAL handles
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state

    def __len__(self) -> int:
        return self.length

    def make_sampler(self, length: Optional[int] = None, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                     shuffle: bool = True) -> DistributedRandomWindowSampler:
        """A :class:`DistributedRandomWindowSampler` over this dataset's tiles and window size."""
        return DistributedRandomWindowSampler(self.tile_index, self.window_size, length or self.length,
                                              num_replicas=num_replicas, rank=rank, seed=seed, shuffle=shuffle)

    def window_for_index(self, i: int) -> WindowSpec:
        """The deterministic random window of integer index ``i``."""
        if self._drawer is None:
            self._drawer = WindowDrawer(self.tile_index, self.window_size)
        return self._drawer.draw(1, np.random.default_rng([self.seed, int(i), 7]))[0]

    def _open(self, path: str):
        import rasterio
        from rasterio.errors import RasterioError

        if self._pid != os.getpid():  # forked worker: do not reuse the parent's handles
            self._handles, self._pid = {}, os.getpid()
        src = self._handles.get(path)
        if src is None:
            if len(self._handles) >= 64:
                for h in self._handles.values():
                    h.close()
                self._handles = {}
            try:
                src = rasterio.open(path)
            except RasterioError as exc:
                raise DataError(f"{path}: not a readable raster (corrupt or not a GeoTIFF?): {exc}") from None
            self._handles[path] = src
        return src

    def read_window(self, spec: WindowSpec) -> dict:
        """Read one window; see the module docstring for the sample dict."""
        from rasterio.enums import MaskFlags
        from rasterio.errors import RasterioError
        from rasterio.windows import Window

        tile, row, col, height, width = (int(v) for v in spec)
        path = self._paths[tile]
        src = self._open(path)
        if row < 0 or col < 0 or row + height > src.height or col + width > src.width:
            raise DataError(f"{path}: window rows {row}:{row + height}, cols {col}:{col + width} is outside the "
                            f"raster ({src.height} x {src.width} px)")
        window = Window(col, row, width, height)
        indexes = self.bands or list(range(1, src.count + 1))
        if max(indexes) > src.count:
            raise DataError(f"{path}: has {src.count} band(s) but bands={indexes} needs at least {max(indexes)}")
        try:
            arr = src.read(indexes=indexes, window=window)
            nodata = self.nodata if self.nodata is not None else src.nodata
            if nodata is not None:
                valid = ~np.all(arr == nodata, axis=0)
            elif MaskFlags.all_valid not in src.mask_flag_enums[0]:  # alpha band or internal mask
                valid = src.dataset_mask(window=window) > 0
            else:
                valid = np.ones(arr.shape[1:], dtype=bool)
        except RasterioError as exc:
            raise DataError(f"{path}: failed to read window rows {row}:{row + height}, cols {col}:{col + width} "
                            f"(truncated or corrupt file?): {exc}") from None
        image = arr.astype(np.float32)
        if np.issubdtype(arr.dtype, np.floating):
            valid &= ~np.any(np.isnan(image), axis=0)
        if self.scale != 1.0:
            image /= self.scale
        return {
            "image": torch.from_numpy(image),
            "mask": torch.from_numpy(np.ascontiguousarray(valid)),
            "gsd": self._gsd[tile],
            "crs": self._crs[tile],
            "bounds": _window_bounds(src.transform, row, col, height, width),
            "path": path,
        }

    def __getitem__(self, idx) -> dict:
        if isinstance(idx, (int, np.integer)):
            if not -self.length <= idx < self.length:
                raise IndexError(f"index {idx} out of range for a dataset of length {self.length}")
            idx = self.window_for_index(int(idx) % self.length)
        return self.read_window(WindowSpec(*idx))


class GeoTiffPretrainDataset(Dataset):
    """Pretraining view of a :class:`GeoTiffDataset`: items ``(img, input_res, target, target_res)``.

    Per window: invalid pixels are set to the band mean (so they are 0 after normalisation), the
    pretraining transform (normalisation, flip, square random resized crop from the whole window) runs,
    and both res values are multiplied by ``gsd / reference_gsd`` (factor 1 without ``reference_gsd``).
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
        rng = np.random.default_rng([self.geo.seed, spec.tile, spec.row, spec.col, 11])
        h, w = self.geo.tile_shapes[spec.tile]
        best = sample
        for _ in range(self.max_redraws):
            if float(sample["mask"].float().mean()) >= self.min_valid:
                return sample
            row = int(rng.integers(0, h - spec.height + 1))
            col = int(rng.integers(0, w - spec.width + 1))
            sample = self.geo.read_window(WindowSpec(spec.tile, row, col, spec.height, spec.width))
            if sample["mask"].float().mean() > best["mask"].float().mean():
                best = sample
        return sample if float(sample["mask"].float().mean()) >= self.min_valid else best

    def __getitem__(self, idx):
        sample = self._read(idx)
        img = torch.where(sample["mask"][None], sample["image"], self.mean)
        img = torch.nan_to_num(img)
        inp, input_res, target, target_res = self.transform(img)
        if self.reference_gsd:
            factor = float(relative_res(sample["gsd"], self.reference_gsd))
            input_res, target_res = input_res * factor, target_res * factor
        return inp, input_res, target, target_res
