"""Fake rasters for the reader property tests, and the independent reference they are compared with.

The reference of a tile is GDAL's warp of the *whole* scene (every file of the tile, or of every tile of a
mosaic merged first-valid-first on their common source grid) onto the tile's *whole* read grid, with
a GDAL ``WarpedVRT`` read whole and the reader's documented warp options (exact transformer, per-band
nodata, the kernel scale fixed per file, nearest ties to the right/lower pixel). It never uses the reader's code paths: files are read whole, invalid
source pixels (nodata, NaN) become NaN, the warp's NaN output marks invalid pixels.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import rasterio
from affine import Affine
from rasterio.enums import Resampling
from rasterio.io import MemoryFile
from rasterio.vrt import WarpedVRT

from dataloaders.geo_read import WARP_OPTIONS, WARP_TOLERANCE, warp_grid, warp_scale
from dataloaders.synthetic import write_geotiff


def fake_values(bands: int, h: int, w: int, seed: int, nodata: Optional[float] = None,
                holes: int = 0, dtype: str = "uint16") -> np.ndarray:
    """``[bands, h, w]`` smooth + noisy values in 1..3000 (never 0); with ``nodata``, ``holes`` random
    rectangles per band hold ``nodata`` (different places in each band)."""
    rng = np.random.default_rng(seed)
    rows, cols = np.indices((h, w))
    out = []
    for b in range(bands):
        fx, fy = rng.uniform(0.05, 0.4, 2)
        band = 1500 + 700 * np.sin(fx * cols + b) * np.cos(fy * rows) + 5 * rows + rng.integers(0, 200, (h, w))
        band = np.clip(band, 1, 3000)
        if nodata is not None:
            for _ in range(holes):
                r, c = rng.integers(0, h), rng.integers(0, w)
                band[r:r + rng.integers(1, h // 4 + 2), c:c + rng.integers(1, w // 4 + 2)] = nodata
        out.append(band)
    return np.stack(out).astype(dtype)


def write_tile(path, array: np.ndarray, transform: Affine, crs: str, nodata=None) -> Path:
    """Write a fake tile (see :func:`dataloaders.synthetic.write_geotiff`)."""
    return write_geotiff(path, array, transform, crs, nodata=nodata)


def _merged_source(files: Sequence[Tuple[str, Sequence[int], Sequence[Optional[float]]]]):
    """``(array[C, H, W] float32 with NaN = invalid, transform, crs)`` of files on one pixel grid, merged on
    the bounding box of them all, the first valid value winning (``rasterio.merge``'s ``first``)."""
    infos = []
    for path, bands, nodata in files:
        with rasterio.open(path) as src:
            arr = src.read(list(bands)).astype(np.float32)
            for k, nd in enumerate(nodata):
                if nd is not None:
                    arr[k][arr[k] == nd] = np.nan
            infos.append((arr, src.transform, str(src.crs)))
    t0 = infos[0][1]
    boxes = []
    for arr, t, _ in infos:
        col, row = ~t0 @ (t.c, t.f)
        col, row = int(round(col)), int(round(row))
        boxes.append((row, col, arr.shape[1], arr.shape[2]))
    r0, c0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    r1, c1 = max(b[0] + b[2] for b in boxes), max(b[1] + b[3] for b in boxes)
    merged = np.full((infos[0][0].shape[0], r1 - r0, c1 - c0), np.nan, np.float32)
    for (arr, _, _), (row, col, h, w) in zip(infos, boxes):
        part = merged[:, row - r0:row - r0 + h, col - c0:col - c0 + w]
        np.copyto(part, arr, where=np.isnan(part))
    return merged, t0 @ Affine.translation(c0, r0), infos[0][2]


def whole_scene_warp(ds, tile: int, method: str, pad: int = 0, mosaic_tiles: Optional[Sequence[int]] = None
                     ) -> Tuple[np.ndarray, np.ndarray]:
    """``(image[C, H + 2 pad, W + 2 pad], valid)``: the whole scene of ``tile`` of a ``GeoTiffDataset``
    (with ``mosaic_tiles``: those tiles, ``tile`` first) warped onto the tile's read grid grown by ``pad``
    pixels on every side, with ``method``; invalid = NaN out of GDAL."""
    index = ds.tile_index
    crs = index["crs"].iloc[tile]
    grid = Affine(*index["transform"].iloc[tile]) @ Affine.translation(-pad, -pad)
    h, w = int(index["height"].iloc[tile]) + 2 * pad, int(index["width"].iloc[tile]) + 2 * pad
    tiles = [tile] + [t for t in (mosaic_tiles or []) if t != tile]
    planes = []
    for k, bands in enumerate(index["file_bands"].iloc[tile]):
        files = []
        for t in tiles:
            start = sum(len(b) for b in index["file_bands"].iloc[t][:k])
            nodata = index["nodata"].iloc[t][start:start + len(bands)]
            files.append((index["files"].iloc[t][k], index["file_bands"].iloc[t][k], nodata))
        src, src_t, src_crs = _merged_source(files)
        first = index["infos"].iloc[tile][k]
        scale = warp_scale(first.crs, first.transform, first.width, first.height, crs, grid)
        with MemoryFile() as mem:
            with mem.open(driver="GTiff", width=src.shape[2], height=src.shape[1], count=src.shape[0],
                          dtype="float32", crs=src_crs, transform=src_t, nodata=float("nan")) as ds:
                ds.write(src)
            with mem.open() as ds, WarpedVRT(ds, crs=crs, transform=warp_grid(grid, method), width=w, height=h,
                                              dtype="float32", src_nodata=float("nan"), nodata=float("nan"),
                                              resampling=Resampling[method], tolerance=WARP_TOLERANCE,
                                              XSCALE=scale[0], YSCALE=scale[1], **WARP_OPTIONS) as vrt:
                dst = vrt.read()
        planes.append(dst)
    image = np.concatenate(planes)
    return image, ~np.isnan(image)


def compare_windows(ds, windows, ref: np.ndarray, ref_valid: np.ndarray, pad: int = 0,
                    nodata_mode: str = "any") -> Dict[str, float]:
    """Read ``windows`` (WindowSpecs) and compare them with each other and with the reference grid.

    A window's pixel (i, j) is the reference's (row + i + pad, col + j + pad). Returns
    ``max_between`` (largest difference of two windows on a shared pixel valid in both), ``max_vs_ref``
    (largest difference from the reference on pixels valid in both), ``mask_between`` and ``mask_vs_ref``
    (band-valid flags, and pixel-valid flags of ``nodata_mode``, that disagree), and ``valid`` (valid band
    values compared).
    """
    c = ref.shape[0]
    seen = np.full(ref.shape, np.nan, np.float64)
    seen_mask = np.full(ref.shape, -1, np.int8)
    out = {"max_between": 0.0, "max_vs_ref": 0.0, "mask_between": 0, "mask_vs_ref": 0, "valid": 0}
    for spec in windows:
        s = ds[spec]
        img, ok = s["image"].numpy().astype(np.float64), s["band_mask"].numpy()
        rs = slice(spec.row + pad, spec.row + pad + spec.height)
        cs = slice(spec.col + pad, spec.col + pad + spec.width)
        r_img, r_ok = ref[:, rs, cs], ref_valid[:, rs, cs]
        assert r_img.shape == (c, spec.height, spec.width), "window outside the reference grid"
        both = ok & r_ok
        pixel_ok = r_ok.all(0) if nodata_mode == "any" else r_ok.any(0)
        out["mask_vs_ref"] += int((ok != r_ok).sum()) + int((s["mask"].numpy() != pixel_ok).sum())
        out["valid"] += int(both.sum())
        if both.any():
            out["max_vs_ref"] = max(out["max_vs_ref"], float(np.abs(img - r_img)[both].max()))
        prev, prev_ok = seen[:, rs, cs], seen_mask[:, rs, cs]
        known = prev_ok >= 0
        out["mask_between"] += int((known & (prev_ok != ok)).sum())
        shared = known & (prev_ok == 1) & ok
        if shared.any():
            out["max_between"] = max(out["max_between"], float(np.abs(prev - img)[shared].max()))
        new = ~known
        prev[new] = np.where(ok, img, np.nan)[new]
        prev_ok[new] = ok[new]
    return out
