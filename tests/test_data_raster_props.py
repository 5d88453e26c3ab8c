"""Property tests of the raster readers: one pixel, one value.

For random small rasters, read grids (native, ``target_gsd``, another CRS), resampling methods, nodata layouts
and windows, every window equals GDAL's warp of the whole scene onto the tile's read grid
(``raster_reference.whole_scene_warp``) on its pixels and masks, so overlapping windows agree on shared pixels.
``gsd_range`` reads equal GDAL's decimated read of the whole file (the exception by design: ``downsampling``).
Segmentation labels burnt on windows equal the labels burnt on the whole tile grid.

Tolerance: ``nearest`` must be bit-exact; other methods agree to 5e-3 DN on values up to 3000: float32 rounding
of the kernel sums (a few ulp, 2.4e-4 each at 3000) and, against plain reads of aligned windows, the reader's
1e-6 px tie shift (``geo_read.TIE_SHIFT``) times a step of up to 3000 DN between neighbours.
"""
import itertools
import tempfile
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from affine import Affine
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from rasterio.enums import Resampling
from rasterio.features import rasterize
from shapely.geometry import Polygon

from dataloaders.geotiff import GeoTiffDataset, WindowSpec
from dataloaders.seg_labels import VectorLabels
from dataloaders.seg_sources import GeoVectorSource
from raster_reference import compare_windows, fake_values, whole_scene_warp, write_tile

PROPS = settings(max_examples=30, deadline=None, derandomize=True, database=None, phases=(Phase.explicit, Phase.generate),
                 suppress_health_check=[HealthCheck.too_slow])  # no shrinking: a failure reports its example at once
METHODS = ["nearest", "bilinear", "cubic", "average"]
NODATA = ["none", "file", "per_band"]  # no nodata (footprint only); the file's 0; data.nodata per band
UTM = "EPSG:32633"


def _tol(method: str) -> float:
    return 0.0 if method == "nearest" else 5e-3


def _values(layout: str, h: int, w: int, seed: int):
    """``(array[3, h, w], file nodata, data.nodata)`` of a nodata layout."""
    if layout == "none":
        return fake_values(3, h, w, seed), None, None
    arr = fake_values(3, h, w, seed, nodata=0, holes=4)
    if layout == "file":
        return arr, 0, None
    arr[1][arr[1] == 0] = 3001  # band 2 marks its holes with 3001, band 3 has no nodata at all
    arr[2][arr[2] == 0] = 1
    return arr, None, [0, 3001, None]


def _windows(data, ds, tile: int, n: int, pad: int = 0):
    h, w = ds.tile_shapes[tile]
    out = []
    for _ in range(n):
        size = data.draw(st.integers(4, min(24, h, w)), label="size")
        row = data.draw(st.integers(-pad, h + pad - size), label="row")
        col = data.draw(st.integers(-pad, w + pad - size), label="col")
        out.append(WindowSpec(tile, row, col, size, size))
    return out


def _check(ds, windows, method, pad=0, mosaic_tiles=None, nodata_mode="any"):
    ref, ok = whole_scene_warp(ds, windows[0].tile, method, pad=pad, mosaic_tiles=mosaic_tiles)
    r = compare_windows(ds, windows, ref, ok, pad=pad, nodata_mode=nodata_mode)
    assert r["mask_vs_ref"] == 0 and r["mask_between"] == 0, r
    assert r["max_vs_ref"] <= _tol(method) and r["max_between"] <= _tol(method), r
    return r


# ---------------------------------------------------------------------------- same CRS, target_gsd
@PROPS
@given(data=st.data(), cell=st.sampled_from([0.15, 0.5, 10.0]), ratio=st.sampled_from([0.75, 1.0, 1.5, 2.0, 2.5, 3.0]),
       method=st.sampled_from(METHODS), layout=st.sampled_from(NODATA), mode=st.sampled_from(["any", "all"]),
       shift=st.integers(0, 7))
def test_target_gsd_windows_equal_the_whole_scene_warp(data, cell, ratio, method, layout, mode, shift):
    if method == "average" and layout != "none" and cell == 0.15:
        # not covered: average footprints whose edges fall exactly on source edges at a cell that binary floats
        # cannot hold; the window's coordinates' rounding (1e-9 px) then decides whether a sliver of a valid
        # neighbour makes an otherwise-nodata pixel valid (values agree)
        cell = 0.5
    arr, file_nd, nodata = _values(layout, 72, 80, shift)
    with tempfile.TemporaryDirectory() as tmp:
        write_tile(Path(tmp) / "t.tif", arr, Affine(cell, 0, 500000 + shift * cell, 0, -cell, 4200000 - 3 * cell),
                   "EPSG:32610", nodata=file_nd)
        ds = GeoTiffDataset(tmp, window_size=4, target_gsd=cell * ratio, resampling=method, nodata=nodata,
                            nodata_mode=mode, index_cache=False)
        _check(ds, _windows(data, ds, 0, 5), method, nodata_mode=mode)


# ------------------------------------------------------------------------------------ reprojection
_SOURCES = {  # CRS -> (transform of a ~10 m, 64 x 72 px raster near 45 N, 15 E)
    UTM: Affine(10, 0, 500000, 0, -10, 4985000),
    "EPSG:3857": Affine(14, 0, 1669792, 0, -14, 5621521),
    "EPSG:4326": Affine(1.3e-4, 0, 15.0, 0, -1.0e-4, 45.0),
}


@PROPS
@given(data=st.data(), src_crs=st.sampled_from(sorted(_SOURCES)), dst_crs=st.sampled_from([UTM, "EPSG:3857"]),
       gsd=st.sampled_from([7.0, 10.0, 20.0, 30.0]), method=st.sampled_from(METHODS),
       layout=st.sampled_from(NODATA), seed=st.integers(0, 100))
def test_reprojected_windows_equal_the_whole_scene_warp(data, src_crs, dst_crs, gsd, method, layout, seed):
    if src_crs == dst_crs:
        dst_crs = "EPSG:4326" if dst_crs == UTM else UTM
    arr, file_nd, nodata = _values(layout, 64, 72, seed)
    with tempfile.TemporaryDirectory() as tmp:
        write_tile(Path(tmp) / "t.tif", arr.astype("float32"), _SOURCES[src_crs], src_crs, nodata=file_nd)
        ds = GeoTiffDataset(tmp, window_size=4, crs=dst_crs, target_gsd=gsd, resampling=method, nodata=nodata,
                            index_cache=False)
        r = _check(ds, _windows(data, ds, 0, 5), method)
        assert r["valid"] > 0


# ------------------------------------------------------------------------- band-per-file scenes
@PROPS
@given(data=st.data(), crs=st.sampled_from([None, "EPSG:3857"]), gsd=st.sampled_from([None, 20.0]),
       method=st.sampled_from(METHODS), nodata=st.booleans(), seed=st.integers(0, 100))
def test_band_file_scene_windows_equal_the_whole_scene_warp(data, crs, gsd, method, nodata, seed):
    with tempfile.TemporaryDirectory() as tmp:
        for k, (name, cell) in enumerate((("B02", 10.0), ("B05", 20.0), ("B01", 60.0))):
            n = int(960 / cell)
            arr = fake_values(1, n, n, seed + k, nodata=0 if nodata else None, holes=2)
            write_tile(Path(tmp) / f"T33UUP_{name}.tif", arr, Affine(cell, 0, 600000, 0, -cell, 5000040), UTM,
                       nodata=0 if nodata else None)
        ds = GeoTiffDataset(tmp, window_size=4, band_files=["*_B02.tif", "*_B05.tif", "*_B01.tif"], crs=crs,
                            target_gsd=gsd, resampling=method, index_cache=False)
        _check(ds, _windows(data, ds, 0, 5), method)


# ----------------------------------------------------------------------------------- mosaics
@PROPS
@given(data=st.data(), src_crs=st.sampled_from([UTM, "EPSG:3857"]), warp=st.booleans(),
       method=st.sampled_from(METHODS), seed=st.integers(0, 100))
def test_mosaic_windows_equal_the_warp_of_the_merged_mosaic(data, src_crs, warp, method, seed):
    """2 x 2 tiles without nodata: windows across seams, anchored on any tile, equal the whole mosaic's warp
    (no zero-filled seams, pixels beyond the collection invalid)."""
    full = fake_values(2, 64, 64, seed)
    origin = _SOURCES[src_crs]
    with tempfile.TemporaryDirectory() as tmp:
        for i, j in itertools.product(range(2), range(2)):
            write_tile(Path(tmp) / f"t{i}{j}.tif", full[:, 32 * i:32 * i + 32, 32 * j:32 * j + 32],
                       origin @ Affine.translation(32 * j, 32 * i), src_crs)
        other = UTM if src_crs == "EPSG:3857" else "EPSG:3857"
        ds = GeoTiffDataset(tmp, window_size=4, mosaic=True, resampling=method, index_cache=False,
                            **(dict(crs=other, target_gsd=12.0) if warp else {}))
        # windows of any tile (on that tile's grid: with a Mercator target_gsd each tile has its own cell),
        # hanging up to 12 px over the collection, against the merged mosaic warped onto that tile's grid
        windows = [w for _ in range(5) for w in _windows(data, ds, data.draw(st.integers(0, 3), label="tile"), 1, 12)]
        for tile in sorted({w.tile for w in windows}):
            _check(ds, [w for w in windows if w.tile == tile], method, pad=12, mosaic_tiles=range(4))


# --------------------------------------------------------------------- gsd_range (by design: decimated)
@PROPS
@given(data=st.data(), factor=st.sampled_from([2, 3, 4]), overviews=st.booleans(),
       method=st.sampled_from(["average", "nearest"]), seed=st.integers(0, 100))
def test_gsd_range_windows_equal_the_decimated_read_of_the_whole_file(data, factor, overviews, method, seed):
    """Windows on the file's grid coarsened by the factor equal that part of the whole file's decimated read
    (overviews where GDAL uses them). Not covered: overviews whose factor does not divide the window's
    origin (factor 3 over 2x overviews), where GDAL rounds the window to whole overview pixels."""
    overviews = overviews and factor != 3
    arr = fake_values(2, 96, 96, seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_tile(Path(tmp) / "t.tif", arr, Affine(1, 0, 500000, 0, -1, 4200000), "EPSG:32610")
        if overviews:
            with rasterio.open(path, "r+") as dst:
                dst.build_overviews([2, 4], Resampling.average)
        with rasterio.open(path) as src:
            whole = src.read(out_shape=(2, 96 // factor, 96 // factor), resampling=Resampling[method])
        probe = GeoTiffDataset(path, window_size=8, index_cache=False)
        gsd = probe.tile_index["gsd"].iloc[0] * factor
        ds = GeoTiffDataset(path, window_size=8, gsd_range=[gsd, gsd], downsampling=method, index_cache=False)
        for _ in range(4):
            size = data.draw(st.integers(2, 96 // factor - 1), label="size")
            row = data.draw(st.integers(0, 96 - size), label="row")
            col = data.draw(st.integers(0, 96 - size), label="col")
            s = ds[WindowSpec(0, row, col, size, size)]
            t = Affine(*s["transform"])
            assert t.a == pytest.approx(factor)  # the drawn factor
            c0, r0 = t.c - 500000, 4200000 - t.f
            assert c0 % factor == 0 and r0 % factor == 0  # on the whole file's decimated grid
            r, c = int(r0) // factor, int(c0) // factor
            np.testing.assert_array_equal(s["image"].numpy(), whole[:, r:r + size, c:c + size])


# ----------------------------------------------------------------------------- segmentation labels
@pytest.mark.parametrize("grid", ["native", "target_gsd", "crs", "gsd_range"])
@settings(PROPS, max_examples=10)
@given(data=st.data(), seed=st.integers(0, 1000))
def test_segmentation_labels_do_not_depend_on_the_window(grid, data, seed):
    """Labels of any window equal the labels burnt on the whole read grid (for ``gsd_range``: the tile's grid
    coarsened by the factor, 2 here)."""
    rng = np.random.default_rng(seed)
    t = Affine(0.5, 0, 500000.25, 0, -0.5, 4200000.0)
    polys = []
    for _ in range(6):
        x, y = 500000.25 + rng.uniform(0, 40), 4200000.0 - rng.uniform(0, 40)
        a, b = rng.uniform(2, 12, 2)
        polys.append(Polygon([(x, y), (x + a, y + rng.uniform(-2, 2)), (x + a, y - b), (x + rng.uniform(-2, 2), y - b)]))
    with tempfile.TemporaryDirectory() as tmp:
        write_tile(Path(tmp) / "img" / "t.tif", fake_values(1, 96, 96, seed), t, "EPSG:32610")
        labels = VectorLabels(gpd.GeoDataFrame(geometry=polys, crs="EPSG:32610"))
        f = 2 if grid == "gsd_range" else 1
        if grid == "gsd_range":
            gsd = GeoTiffDataset(Path(tmp) / "img", window_size=4, index_cache=False).tile_index["gsd"].iloc[0]
        kw = {"native": {}, "target_gsd": dict(target_gsd=0.7), "crs": dict(crs="EPSG:3857", target_gsd=0.6),
              "gsd_range": dict(gsd_range=[2 * gsd, 2 * gsd]) if f == 2 else {}}[grid]
        geo = GeoTiffDataset(Path(tmp) / "img", window_size=4, index_cache=False, **kw)
        source = GeoVectorSource(geo, labels)
        index = geo.tile_index
        grid_t = Affine(*index["transform"].iloc[0]) @ Affine.scale(f)
        whole = rasterize(zip(labels.in_crs(index["crs"].iloc[0]).geometry, labels.gdf["value"]),
                          out_shape=(int(index["height"].iloc[0]) // f, int(index["width"].iloc[0]) // f),
                          transform=grid_t, fill=0, dtype="uint8")
        assert whole.any()
        for spec in _windows(data, geo, 0, 6):
            if f > 1 and spec.height * f > 96:
                continue
            _, _, label, meta = source.read(spec.tile, spec.row, spec.col, spec.height, spec.width)
            col, row = (round(v) for v in ~grid_t @ (meta["transform"][2], meta["transform"][5]))
            assert Affine(*meta["transform"]).almost_equals(grid_t @ Affine.translation(col, row))  # on the grid
            np.testing.assert_array_equal(label, whole[row:row + spec.height, col:col + spec.width])
