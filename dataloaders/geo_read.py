"""Reading one output grid (a window) from the files of one or more tiles: plain, decimated or warped.

:class:`GridReader` fills ``image[C, h, w]`` and a per-band valid mask ``valid[C, h, w]`` for a destination
grid ``(crs, transform, h, w)`` from a list of tiles of the index, first tile first (later tiles only fill
pixels still invalid, as ``rasterio.merge``'s ``first`` method). Per file it takes the cheapest exact path:

* *aligned*: same CRS, same cell, whole-pixel offset -> a plain windowed read of the overlap (bit-exact);
* *decimated*: same CRS, cell an integer-or-not multiple of the file's and the window inside the file ->
  ``read(out_shape=...)`` with the ``downsampling`` method: GDAL uses the file's overviews (COGs) when they
  fit, else reads the full-resolution pixels and resamples, in the file's data type (as overviews are
  stored: integer files give rounded averages);
* *warped*: anything else (another CRS, another cell, a partial overlap at a coarser cell) ->
  ``rasterio.vrt.WarpedVRT`` onto the destination grid with the ``resampling`` method (``downsampling`` for
  ``gsd_range`` reads), computed in float32; nothing is written.

Validity per band: not the band's nodata (config override or the file's own, per band), not NaN, inside
the file's footprint, and not masked by an internal mask / alpha band. Read errors become one-line
:class:`DataError` messages naming the file.
"""
from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import DataError

RESAMPLING_METHODS = ("nearest", "bilinear", "cubic", "cubic_spline", "lanczos", "average", "mode", "min", "max",
                      "med", "q1", "q3", "sum", "rms")
NODATA_MODES = ("any", "all")  # a pixel is invalid when any / all of its bands are invalid
_EPS = 1e-6


def _resampling(name: str):
    from rasterio.enums import Resampling

    return Resampling[name]


def _gdal_errors() -> tuple:
    from rasterio._err import CPLE_BaseError
    from rasterio.errors import RasterioError

    return RasterioError, CPLE_BaseError


def _cause(exc: BaseException) -> str:
    """The most specific one-line message of an exception chain (rasterio wraps GDAL's error)."""
    seen = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    for e in reversed(seen):
        text = " ".join(str(e).split())
        if text and "see previous exception" not in text.lower():
            return text
    return " ".join(str(seen[0]).split())


def _invalid_of(arr: np.ndarray, nodata: Optional[float]) -> np.ndarray:
    """Pixels of one band equal to ``nodata`` (NaN-aware) or NaN."""
    invalid = np.zeros(arr.shape, dtype=bool)
    if np.issubdtype(arr.dtype, np.floating):
        invalid |= np.isnan(arr)
    if nodata is not None:
        invalid |= np.isnan(arr) if math.isnan(nodata) else (arr == nodata)
    return invalid


class GridReader:
    """Reads destination grids from the tiles of a tile index; one instance per process (handles are cached).

    Args:
        index: the tile index (GeoDataFrame of :func:`~dataloaders.geo_index.build_tile_index`).
        resampling: method of warped reads (rasterio ``Resampling`` name).
        downsampling: method of decimated reads (``gsd_range``).
        max_open: open file handles kept per process.
    """

    def __init__(self, index, resampling: str = "bilinear", downsampling: str = "average", max_open: int = 64):
        self.files: List[Tuple[str, ...]] = [tuple(f) for f in index["files"]]
        self.file_bands = [tuple(tuple(b) for b in fb) for fb in index["file_bands"]]
        self.infos = [tuple(i) for i in index["infos"]]
        self.nodata = [tuple(n) for n in index["nodata"]]
        self.resampling = resampling
        self.downsampling = downsampling
        self.max_open = int(max_open)
        self._handles: Dict[str, object] = {}
        self._mask_flags: Dict[str, Tuple[bool, ...]] = {}
        self._pid = os.getpid()

    def __getstate__(self):  # never ship open GDAL handles to DataLoader workers
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state

    def open(self, path: str):
        """A cached read handle of ``path`` in this process."""
        import rasterio
        from rasterio.errors import RasterioError

        if self._pid != os.getpid():  # forked worker: do not reuse the parent's handles
            self._handles, self._pid = {}, os.getpid()
        src = self._handles.get(path)
        if src is None:
            if len(self._handles) >= self.max_open:
                for h in self._handles.values():
                    h.close()
                self._handles = {}
            try:
                src = rasterio.open(path)
            except RasterioError as exc:
                raise DataError(f"{path}: not a readable raster (corrupt or not a GeoTIFF?): {exc}") from None
            self._handles[path] = src
        return src

    def read(self, tiles: Sequence[int], crs: str, transform, height: int, width: int, dtype=np.float32,
             decimated: bool = False) -> Tuple[np.ndarray, np.ndarray]:
        """``(image[C,h,w] float32, valid[C,h,w] bool)`` of the grid, filled from ``tiles`` in order.

        ``decimated``: the grid is a coarser read of the tiles (``gsd_range``): warps that have to happen
        anyway (a window across files, another CRS) use the ``downsampling`` method too.
        """
        count = sum(len(b) for b in self.file_bands[tiles[0]])
        image = np.zeros((count, height, width), dtype=dtype)
        valid = np.zeros((count, height, width), dtype=bool)
        for t in tiles:
            channel = 0
            for path, bands, info in zip(self.files[t], self.file_bands[t], self.infos[t]):
                nodata = self.nodata[t][channel:channel + len(bands)]
                sl = slice(channel, channel + len(bands))
                channel += len(bands)
                if valid[sl].all():
                    continue
                try:
                    arr, ok = self._read_file(path, info, bands, nodata, crs, transform, height, width, decimated)
                except _gdal_errors() as exc:
                    raise DataError(f"{path}: failed to read window ({width}x{height} px) "
                                    f"(truncated or corrupt file?): {_cause(exc)}") from None
                if t == tiles[0]:  # first tile: nothing to merge with
                    image[sl] = arr
                    valid[sl] = ok
                else:
                    np.copyto(image[sl], arr, where=ok & ~valid[sl])
                    valid[sl] |= ok
        return image, valid

    # -- one file onto the destination grid
    def _read_file(self, path: str, info, bands, nodata, crs, transform, height: int, width: int,
                   decimated: bool = False):
        from affine import Affine

        if info.crs == crs:
            # destination pixel -> file pixel: a pure scale + offset when the grids share orientation
            m = ~Affine(*info.transform) @ Affine(*tuple(transform)[:6])
            if abs(m.b) < _EPS and abs(m.d) < _EPS and m.a > 1 - _EPS and m.e > 1 - _EPS:
                sx, sy, col0, row0 = m.a, m.e, m.c, m.f
                whole = abs(col0 - round(col0)) < _EPS and abs(row0 - round(row0)) < _EPS
                if abs(sx - 1) < _EPS and abs(sy - 1) < _EPS and whole:
                    return self._read_aligned(path, info, bands, nodata, int(round(row0)), int(round(col0)),
                                              height, width)
                inside = (col0 > -_EPS and row0 > -_EPS and col0 + width * sx < info.width + _EPS
                          and row0 + height * sy < info.height + _EPS)
                if inside:
                    return self._read_decimated(path, bands, nodata, row0, col0, height * sy, width * sx, height,
                                                width)
        method = self.downsampling if decimated else self.resampling
        return self._read_warped(path, bands, nodata, crs, transform, height, width, method)

    def _masked_bands(self, src) -> Tuple[bool, ...]:
        """Per band: does GDAL hold a mask (internal mask, alpha band, nodata) for it? (cached per file)."""
        flags = self._mask_flags.get(src.name)
        if flags is None:
            from rasterio.enums import MaskFlags

            flags = tuple(MaskFlags.all_valid not in f for f in src.mask_flag_enums)
            self._mask_flags[src.name] = flags
        return flags

    def _masks(self, src, bands, nodata, arr, **read_kw) -> np.ndarray:
        ok = np.empty(arr.shape, dtype=bool)
        masked = self._masked_bands(src)
        for k, (band, nd) in enumerate(zip(bands, nodata)):
            np.logical_not(_invalid_of(arr[k], nd), out=ok[k])
            if nd is None and masked[band - 1]:
                ok[k] &= src.read_masks(band, **read_kw) > 0  # internal mask or alpha band
        return ok

    def _read_aligned(self, path, info, bands, nodata, row0, col0, height, width):
        from rasterio.windows import Window

        r0, r1 = max(row0, 0), min(row0 + height, info.height)
        c0, c1 = max(col0, 0), min(col0 + width, info.width)
        if (r0, r1, c0, c1) == (row0, row0 + height, col0, col0 + width):  # inside the file: no copy
            src = self.open(path)
            window = Window(c0, r0, width, height)
            part = src.read(indexes=list(bands), window=window)
            return part.astype(np.float32, copy=False), self._masks(src, bands, nodata, part, window=window)
        arr = np.zeros((len(bands), height, width), dtype=np.float32)
        ok = np.zeros(arr.shape, dtype=bool)
        if r1 <= r0 or c1 <= c0:
            return arr, ok
        src = self.open(path)
        window = Window(c0, r0, c1 - c0, r1 - r0)
        part = src.read(indexes=list(bands), window=window)
        dst = (slice(None), slice(r0 - row0, r1 - row0), slice(c0 - col0, c1 - col0))
        arr[dst] = part
        ok[dst] = self._masks(src, bands, nodata, part, window=window)
        return arr, ok

    def _read_decimated(self, path, bands, nodata, row0, col0, src_h, src_w, height, width):
        from rasterio.windows import Window

        src = self.open(path)
        window = Window(col0, row0, src_w, src_h)
        method = _resampling(self.downsampling)
        arr = src.read(indexes=list(bands), window=window, out_shape=(len(bands), height, width), resampling=method)
        ok = self._masks(src, bands, nodata, arr, window=window, out_shape=(height, width), resampling=method)
        return arr.astype(np.float32, copy=False), ok

    def _read_warped(self, path, bands, nodata, crs, transform, height, width, method: str):
        from affine import Affine
        from rasterio.vrt import WarpedVRT

        src = self.open(path)
        arr = np.zeros((len(bands), height, width), dtype=np.float32)
        ok = np.zeros(arr.shape, dtype=bool)
        groups: Dict[object, List[int]] = {}
        for k, nd in enumerate(nodata):  # WarpedVRT takes one source nodata: one VRT per distinct value
            key = "nan" if nd is not None and math.isnan(nd) else nd
            groups.setdefault(key, []).append(k)
        for key, ks in groups.items():
            nd = None if key is None else (float("nan") if key == "nan" else float(key))
            opts = dict(crs=crs, transform=Affine(*tuple(transform)[:6]), width=width, height=height, dtype="float32",
                        resampling=_resampling(method))
            if nd is None:
                opts["add_alpha"] = True  # coverage (and the file's own masks) from the warped alpha band
            else:
                opts.update(src_nodata=nd, nodata=nd)
            with WarpedVRT(src, **opts) as vrt:
                sel = [bands[k] for k in ks]
                part = vrt.read(indexes=sel)
                if nd is None:
                    cover = vrt.dataset_mask() > 0
                    good = np.stack([cover & ~_invalid_of(p, None) for p in part])
                else:
                    good = np.stack([~_invalid_of(p, nd) for p in part]) & (vrt.read_masks(sel) > 0)
            arr[ks] = part
            ok[ks] = good
        return arr, ok
