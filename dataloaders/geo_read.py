"""Reading one output grid (a window) from the files of one or more tiles: plain, decimated or warped.

:class:`GridReader` fills ``image[C, h, w]`` and a per-band valid mask ``valid[C, h, w]`` for a destination
grid ``(crs, transform, h, w)`` from a list of tiles of the index, first tile first (later tiles only fill
pixels still invalid, as ``rasterio.merge``'s ``first`` method).

One pixel, one value: a pixel of a tile's read grid gets the value (and validity) of GDAL's warp of the whole
scene onto the whole grid with ``resampling``, whatever window reads it. Per file:

* *aligned*: same CRS, same cell, whole-pixel offset -> a plain windowed read (what any warp gives there);
* *warped*: anything else (another CRS, another cell) -> the source pixels the window needs plus the kernel's
  reach (:func:`source_window`), read window-sized, invalid ones set to NaN, warped by GDAL
  (:func:`warp_array`) with an exact transformer, a kernel scale fixed per file (:func:`warp_scale`) and
  deterministic ties (:func:`warp_grid`). The same file of neighbouring tiles on the same source pixel grid
  (``mosaic``) is merged into that source window first, so a window across tiles equals the warp of the
  merged mosaic (no seams);
* *decimated* (``gsd_range`` reads only, by design): same CRS, the window inside the file ->
  ``read(out_shape=...)`` with the ``downsampling`` method: GDAL's decimated read (overviews where they fit),
  in the file's data type. The window lies on the tile's grid coarsened by the factor, so it equals that part
  of the whole file's decimated read (except where GDAL rounds a window to whole overview pixels: an overview
  factor that does not divide the window's origin). Windows across files are warped with ``downsampling``.

Validity per band: not the band's nodata (config override or the file's own, per band), not NaN, inside
a file's footprint, and not masked by an internal mask / alpha band. Read errors become one-line
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


# Reach of each resampling kernel in source pixels at scale 1 (GDAL's radii; footprint methods such as
# average/mode/min/max cover the destination pixel's footprint: 1, widened by the scale like the others).
_KERNEL_RADIUS = {"nearest": 1, "bilinear": 1, "cubic": 2, "cubic_spline": 2, "lanczos": 3}
# GDAL's approximate transformer interpolates coordinates along each chunk's scanlines (error up to the
# tolerance, in source pixels, default 0.125), so a pixel's source position depended on the window. 1e-9 px
# makes every coordinate exact to rounding (WarpedVRT cannot take 0); it costs ~2x on reprojected warps.
WARP_TOLERANCE = 1e-9
WARP_OPTIONS = {"UNIFIED_SRC_NODATA": "NO"}  # each band's own nodata
# Where a destination pixel centre falls exactly on a source pixel edge (nearest: every pixel of an aligned 2x
# coarser grid) or exactly on a source centre next to the source's edge (cubic/lanczos: full kernel or GDAL's
# bilinear fallback), rounding noise of the coordinates (~1e-9 px, which changes with the window's origin)
# would decide. For these kernel methods GDAL is handed the grid shifted TIE_SHIFT pixels right/down: ties
# always go the same way, and values move by at most TIE_SHIFT times the local gradient. Footprint methods
# (average, mode, min, max, ...) are not shifted: GDAL ignores slivers below its own epsilon, and a shifted
# footprint would take in a 1e-6 sliver of the neighbouring pixel.
TIE_SHIFT = 1e-6
_KERNEL_METHODS = ("nearest", "bilinear", "cubic", "cubic_spline", "lanczos")


def warp_grid(transform, method: str):
    """The destination affine handed to GDAL for ``method``: ``transform``, shifted by :data:`TIE_SHIFT` pixels
    right and down for the kernel methods (deterministic ties)."""
    from affine import Affine

    t = Affine(*tuple(transform)[:6])
    return t @ Affine.translation(TIE_SHIFT, TIE_SHIFT) if method in _KERNEL_METHODS else t


def source_window(src_crs: str, src_transform, dst_crs: str, dst_transform, height: int, width: int,
                  method: str, samples: int = 16) -> Optional[Tuple[int, int, int, int]]:
    """``(row0, row1, col0, col1)`` source pixels (of the grid ``src_transform``, unclipped) that a warp of the
    ``height x width`` destination grid with ``method`` reads: the destination edges (``samples`` points per
    side) mapped to source pixels, widened by the kernel's radius times the source pixels per destination
    pixel, plus one pixel. None when the grid cannot be expressed in the source CRS."""
    from affine import Affine
    from rasterio.warp import transform as transform_points

    t = Affine(*tuple(dst_transform)[:6])
    steps = np.linspace(0.0, 1.0, samples + 1)
    cols = np.concatenate([steps * width, np.full_like(steps, width), steps * width, np.zeros_like(steps)])
    rows = np.concatenate([np.zeros_like(steps), steps * height, np.full_like(steps, height), steps * height])
    xs, ys = t.a * cols + t.b * rows + t.c, t.d * cols + t.e * rows + t.f
    if src_crs != dst_crs:
        try:
            xs, ys = transform_points(dst_crs, src_crs, xs, ys)
        except _gdal_errors():
            return None
        xs, ys = np.asarray(xs), np.asarray(ys)
        keep = np.isfinite(xs) & np.isfinite(ys)
        if not keep.any():
            return None
        xs, ys = xs[keep], ys[keep]
    inv = ~Affine(*tuple(src_transform)[:6])
    sc, sr = inv.a * xs + inv.b * ys + inv.c, inv.d * xs + inv.e * ys + inv.f
    scale = max((sc.max() - sc.min()) / width, (sr.max() - sr.min()) / height, 1.0)
    reach = int(math.ceil(_KERNEL_RADIUS.get(method, 1) * scale)) + 1
    return (int(math.floor(sr.min())) - reach, int(math.ceil(sr.max())) + reach,
            int(math.floor(sc.min())) - reach, int(math.ceil(sc.max())) + reach)


def warp_scale(src_crs: str, src_transform, src_width: int, src_height: int, dst_crs: str, dst_transform
               ) -> Tuple[float, float]:
    """``(XSCALE, YSCALE)``: destination pixels per source pixel along the destination axes, measured at the
    source file's centre and rounded to 3 significant digits.

    GDAL sizes a downsampling kernel by this scale (warp options ``XSCALE``/``YSCALE``); by default it
    estimates it per warped chunk (source window size / destination window size), which makes a pixel's value
    depend on the chunk, i.e. on the window. Fixed per file and destination cell, it does not (the rounding
    also gives neighbouring tiles of a mosaic the same scale).
    """
    from affine import Affine
    from rasterio.warp import transform as transform_points

    st, dt = Affine(*tuple(src_transform)[:6]), Affine(*tuple(dst_transform)[:6])
    x, y = st @ (src_width / 2.0, src_height / 2.0)
    if src_crs != dst_crs:
        (x,), (y,) = transform_points(src_crs, dst_crs, [x], [y])
    xs = [x, x + dt.a, x + dt.b]
    ys = [y, y + dt.d, y + dt.e]
    if src_crs != dst_crs:
        xs, ys = transform_points(dst_crs, src_crs, xs, ys)
    inv = ~st
    px = [inv @ p for p in zip(xs, ys)]
    scales = []
    for k in (1, 2):
        steps = math.hypot(px[k][0] - px[0][0], px[k][1] - px[0][1])  # source pixels per destination pixel
        scales.append(float(f"{1.0 / steps:.3g}") if steps > 0 and math.isfinite(steps) else 1.0)
    return scales[0], scales[1]


def warp_array(src: np.ndarray, src_transform, src_crs: str, dst_crs: str, dst_transform, height: int, width: int,
               method: str, scale: Tuple[float, float]) -> np.ndarray:
    """``float32[C, height, width]``: GDAL's warp of ``src`` (``float32[C, H, W]``, NaN = invalid) onto the grid,
    NaN where nothing valid lands. Exact transformer (:data:`WARP_TOLERANCE`), fixed kernel ``scale``
    (:func:`warp_scale`), per-band nodata, deterministic ties (:func:`warp_grid`). Memory: the size of ``src``.
    """
    from rasterio.io import MemoryFile
    from rasterio.vrt import WarpedVRT

    profile = dict(driver="GTiff", width=src.shape[2], height=src.shape[1], count=src.shape[0], dtype="float32",
                   crs=src_crs, transform=src_transform, nodata=float("nan"))
    with MemoryFile() as mem:
        with mem.open(**profile) as ds:
            ds.write(src)
        with mem.open() as ds, WarpedVRT(ds, crs=dst_crs, transform=warp_grid(dst_transform, method), width=width,
                                          height=height, dtype="float32", src_nodata=float("nan"),
                                          nodata=float("nan"), resampling=_resampling(method),
                                          tolerance=WARP_TOLERANCE, XSCALE=scale[0], YSCALE=scale[1],
                                          **WARP_OPTIONS) as vrt:
            return vrt.read()


def _same_grid(a, b) -> bool:
    """Do the files ``a`` and ``b`` (RasterInfo) lie on one pixel grid (same CRS and cell, whole-pixel offset)?"""
    from affine import Affine

    if a.crs != b.crs or any(abs(x - y) > _EPS * max(abs(x), 1e-12) for x, y in
                             zip((a.transform[i] for i in (0, 1, 3, 4)), (b.transform[i] for i in (0, 1, 3, 4)))):
        return False
    col, row = ~Affine(*a.transform) @ (b.transform[2], b.transform[5])
    return abs(col - round(col)) < 1e-4 and abs(row - round(row)) < 1e-4


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
        self.tile_gsd = [float(g) for g in index["gsd"]]
        self.resampling = resampling
        self.downsampling = downsampling
        self.max_open = int(max_open)
        self._handles: Dict[str, object] = {}
        self._mask_flags: Dict[str, Tuple[bool, ...]] = {}
        self._pid = os.getpid()

    def reach(self, tile: int, decimated: bool = False) -> int:
        """Read-grid pixels around a window whose source pixels a warp of the window may use (kernel radius
        times the coarsest file's pixels per read-grid pixel, plus 2): a mosaic window must read every tile
        within this margin to equal the warp of the merged mosaic."""
        method = self.downsampling if decimated else self.resampling
        coarse = max(max(i.gsd for i in self.infos[tile]) / self.tile_gsd[tile], 1.0)
        return int(math.ceil(_KERNEL_RADIUS.get(method, 1) * coarse)) + 2

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
        method = self.downsampling if decimated else self.resampling
        done = set()  # (tile, file slot) pairs already read (merged into an earlier warp)
        for t in tiles:
            channel = 0
            for k, (path, bands, info) in enumerate(zip(self.files[t], self.file_bands[t], self.infos[t])):
                sl = slice(channel, channel + len(bands))
                channel += len(bands)
                if (t, k) in done or valid[sl].all():
                    continue
                try:
                    arr, ok = self._read_file(tiles, t, k, crs, transform, height, width, decimated, method, done)
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

    # -- one file (or one file slot of a mosaic of same-grid tiles) onto the destination grid
    def _read_file(self, tiles, t: int, k: int, crs, transform, height: int, width: int, decimated: bool,
                   method: str, done: set):
        from affine import Affine

        path, bands, info = self.files[t][k], self.file_bands[t][k], self.infos[t][k]
        nodata = self._slot_nodata(t, k)
        done.add((t, k))
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
                if decimated and inside:
                    return self._read_decimated(path, bands, nodata, row0, col0, height * sy, width * sx, height,
                                                width)
        # the same file slot of the other tiles on the same source grid: warped together, as one mosaic
        members = [(t, k)] + [(u, k) for u in tiles if u != t and (u, k) not in done
                              and k < len(self.infos[u]) and _same_grid(self.infos[u][k], info)]
        done.update(members)
        return self._read_warped(members, crs, transform, height, width, method)

    def _slot_nodata(self, t: int, k: int) -> Tuple[Optional[float], ...]:
        start = sum(len(b) for b in self.file_bands[t][:k])
        return self.nodata[t][start:start + len(self.file_bands[t][k])]

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

    def _read_warped(self, members, crs, transform, height: int, width: int, method: str):
        """Warp the source pixels of ``members`` (``(tile, file slot)`` pairs on one source pixel grid, the
        first one's file defining it) that the destination grid needs, merged first-valid-first, onto the grid.

        The source window is the destination window's extent in source pixels plus the resampling kernel's
        reach (:func:`source_window`), clipped to the members' extent, so every destination pixel sees the
        same source pixels (and the same edges) as a warp of the whole scene: the value of a pixel does not
        depend on the window. Invalid source pixels (nodata, NaN, masks, no file) are NaN, GDAL's source
        nodata; destination pixels that receive nothing stay NaN (invalid).
        """
        from affine import Affine
        t0, k0 = members[0]
        info = self.infos[t0][k0]
        n = len(self.file_bands[t0][k0])
        out = np.full((n, height, width), np.nan, dtype=np.float32)
        src_t = Affine(*info.transform)
        offsets, boxes = [], []
        for t, k in members:  # each member's whole-pixel offset on the first's grid, and its extent there
            col, row = ~src_t @ (self.infos[t][k].transform[2], self.infos[t][k].transform[5])
            col, row = int(round(col)), int(round(row))
            offsets.append((row, col))
            boxes.append((row, row + self.infos[t][k].height, col, col + self.infos[t][k].width))
        extent = (min(b[0] for b in boxes), max(b[1] for b in boxes), min(b[2] for b in boxes),
                  max(b[3] for b in boxes))
        win = source_window(info.crs, src_t, crs, Affine(*tuple(transform)[:6]), height, width, method)
        if win is None:
            return out, np.zeros(out.shape, dtype=bool)
        r0, r1 = max(win[0], extent[0]), min(win[1], extent[1])
        c0, c1 = max(win[2], extent[2]), min(win[3], extent[3])
        if r1 <= r0 or c1 <= c0:
            return out, np.zeros(out.shape, dtype=bool)
        src = np.full((n, r1 - r0, c1 - c0), np.nan, dtype=np.float32)
        for (t, k), (row, col) in zip(members, offsets):
            path, bands, inf = self.files[t][k], self.file_bands[t][k], self.infos[t][k]
            arr, ok = self._read_aligned(path, inf, bands, self._slot_nodata(t, k), r0 - row, c0 - col,
                                         r1 - r0, c1 - c0)
            np.copyto(src, arr, where=ok & np.isnan(src))
        if np.isnan(src).all():
            return out, np.zeros(out.shape, dtype=bool)
        scale = warp_scale(info.crs, src_t, info.width, info.height, crs, transform)
        out = warp_array(src, src_t @ Affine.translation(c0, r0), info.crs, crs, transform, height, width, method,
                         scale)
        return out, ~np.isnan(out)
