#!/usr/bin/env python
"""Raster window reads: windows/s of every read path of ``dataloaders.geotiff``, and tile-index build time.

    python bench/bench_geodata.py [--size 256] [--reps 40] [--files 200]

Prints one JSON object. Read paths (``size`` px windows of uint16 rasters written to a temporary folder first,
so the OS page cache holds them: these are CPU costs, not disk costs):

* ``raw_rasterio``: ``src.read(window=...)`` of the same windows from an open dataset (the floor);
* ``native``: a multi-band GeoTIFF on its own grid (plain windowed read + mask + per-window ground GSD);
* ``scene_10_20_60``: Sentinel-2-like band files at 10/20/60 m stacked on the 10 m grid (two bands warped);
* ``reprojected``: a UTM raster read in another UTM zone at the same cell (every band warped);
* ``mosaic_4_tiles``: a window over the corner of four tiles;
* ``gsd_4x`` / ``gsd_4x_overviews``: windows read at 4x the GSD without / with overviews.

``index_cold_s`` / ``index_cached_s``: building the tile index of ``files`` small GeoTIFFs without / with the
header cache. Timings are wall-clock medians over ``reps`` windows on a shared machine: noisy.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _write(path, arr, transform, crs, **kw):
    import rasterio

    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", width=arr.shape[2], height=arr.shape[1], count=arr.shape[0],
                       dtype=arr.dtype.name, crs=crs, transform=transform, tiled=True, blockxsize=256,
                       blockysize=256, **kw) as dst:
        dst.write(arr)


def _data(bands, n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(1, 3000, (bands, n, n), dtype=np.uint16)


def _per_window_s(fn, specs):
    times = []
    for spec in specs:
        t0 = time.perf_counter()
        fn(spec)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--files", type=int, default=200)
    args = parser.parse_args()

    import rasterio
    from affine import Affine
    from rasterio.enums import Resampling
    from rasterio.windows import Window

    from dataloaders.geo_index import build_tile_index
    from dataloaders.geotiff import GeoTiffDataset, WindowSpec

    size, n = args.size, 4 * args.size
    out = {"size": size, "reps": args.reps}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t10 = Affine(10, 0, 600000, 0, -10, 5000040)
        _write(tmp / "native" / "a.tif", _data(4, n), t10, "EPSG:32633")
        for name, gsd in (("B02", 10), ("B05", 20), ("B01", 60)):
            _write(tmp / "scene" / f"T33UUP_{name}.tif", _data(1, n * 10 // gsd), Affine(gsd, 0, 600000, 0, -gsd,
                                                                                            5000040), "EPSG:32633")
        for i in range(2):
            for j in range(2):
                _write(tmp / "mosaic" / f"t{i}{j}.tif", _data(4, n // 2, 4 * i + j),
                       t10 @ Affine.translation(j * n // 2, i * n // 2), "EPSG:32633")
        _write(tmp / "ovr" / "a.tif", _data(4, n), t10, "EPSG:32633")
        with rasterio.open(tmp / "ovr" / "a.tif", "r+") as dst:
            dst.build_overviews([2, 4], Resampling.average)

        rng = np.random.default_rng(0)
        hi = n - size
        specs = [WindowSpec(0, int(r), int(c), size, size) for r, c in rng.integers(0, hi, (args.reps, 2))]
        with rasterio.open(tmp / "native" / "a.tif") as src:
            out["raw_rasterio_ms"] = 1e3 * _per_window_s(
                lambda s: src.read(window=Window(s.col, s.row, size, size)), specs)
        cases = {
            "native": GeoTiffDataset(tmp / "native", window_size=size, index_cache=False),
            "scene_10_20_60": GeoTiffDataset(tmp / "scene", window_size=size, band_files=["*_B02.tif", "*_B05.tif",
                                                                                           "*_B01.tif"],
                                             index_cache=False),
            "reprojected": GeoTiffDataset(tmp / "native", window_size=size, crs="EPSG:32632", target_gsd=10.0,
                                          index_cache=False),
            "gsd_4x": GeoTiffDataset(tmp / "native", window_size=size // 4, gsd_range=[40.0, 40.0],
                                     index_cache=False),
            "gsd_4x_overviews": GeoTiffDataset(tmp / "ovr", window_size=size // 4, gsd_range=[40.0, 40.0],
                                               index_cache=False),
        }
        for name, ds in cases.items():
            h, w = ds.tile_shapes[0]
            win = ds.window_size
            sp = [WindowSpec(0, int(r * (h - win) / hi), int(c * (w - win) / hi), win, win) for _, r, c, _, _ in specs]
            out[f"{name}_ms"] = 1e3 * _per_window_s(ds.read_window, sp)
        mosaic = GeoTiffDataset(tmp / "mosaic", window_size=size, mosaic=True, index_cache=False)
        corner = [WindowSpec(0, n // 2 - size // 2 + k % 7, n // 2 - size // 2 + k % 5, size, size)
                  for k in range(args.reps)]
        out["mosaic_4_tiles_ms"] = 1e3 * _per_window_s(mosaic.read_window, corner)
        for k in (f"{c}_ms" for c in list(cases) + ["mosaic_4_tiles"]):
            out[k.replace("_ms", "_windows_per_s")] = round(1e3 / out[k], 1)

        for i in range(args.files):
            _write(tmp / "many" / f"t{i:04d}.tif", _data(1, 64, i), Affine(1, 0, 64 * i, 0, -1, 64), "EPSG:32633")
        cache = tmp / "cache.json"
        t0 = time.perf_counter()
        build_tile_index(tmp / "many", index_cache=cache)
        out["index_cold_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        build_tile_index(tmp / "many", index_cache=cache)
        out["index_cached_s"] = time.perf_counter() - t0
        out["index_files"] = args.files
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}, indent=1))


if __name__ == "__main__":
    main()
