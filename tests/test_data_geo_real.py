"""Real-geodata layouts: ground GSD in any CRS, band-file scenes, reprojection, mosaics, multi-GSD reads,
per-band nodata, the shared header cache and one-line data errors. Every raster is tiny and written here."""
import math
import multiprocessing as mp
import os

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from pyproj import Geod, Transformer
from rasterio.enums import Resampling
from rasterio.merge import merge
from rasterio.warp import reproject
from torch.utils.data import DataLoader

from dataloaders import geo_index
from dataloaders.builders import build_pretrain_dataset
from dataloaders.errors import DataError
from dataloaders.geotiff import GeoTiffDataset, GeoTiffPretrainDataset, WindowSpec, build_tile_index
from dataloaders.synthetic import write_geotiff
from dataloaders.transforms import PretrainTransform
from raster_reference import whole_scene_warp

WGS84 = Geod(ellps="WGS84")


def _ramp(bands, h, w, seed=0, dtype=np.uint16):
    """Smooth + noisy positive values (never 0), so resampling differences would show."""
    rng = np.random.default_rng(seed)
    rows, cols = np.indices((h, w))
    out = [100 + 7 * rows + 3 * cols + 50 * b + rng.integers(0, 20, (h, w)) for b in range(bands)]
    return np.stack(out).astype(dtype)


def _geodesic_px(crs, transform, width, row):
    """Ground metres per pixel along row ``row``: geodesic length of the whole row / width (test's own way)."""
    to_ll = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    (x0, y0), (x1, y1) = transform @ (0, row), transform @ (width, row)
    lon, lat = to_ll.transform([x0, x1], [y0, y1])
    return WGS84.inv(lon[0], lat[0], lon[1], lat[1])[2] / width


# ---------------------------------------------------------------------------------------------------- 1. GSD
@pytest.mark.parametrize("lat", [0.0, 40.0, 60.0])
def test_web_mercator_gsd_is_ground_distance(tmp_path, lat):
    to_merc = Transformer.from_crs("EPSG:4326", "EPSG:3857", always_xy=True)
    x, y = to_merc.transform(10.0, lat)
    transform = Affine(10.0, 0, x, 0, -10.0, y + 320)  # 10 projected "metres", centred at latitude `lat`
    write_geotiff(tmp_path / "merc.tif", _ramp(3, 64, 64), transform, "EPSG:3857")
    ds = GeoTiffDataset(tmp_path, window_size=16, reference_gsd=5.0, index_cache=False)
    s = ds[WindowSpec(0, 24, 24, 16, 16)]
    expected_x = _geodesic_px("EPSG:3857", transform, 64, 32)
    # along y: geodesic length of the centre column / height
    to_ll = Transformer.from_crs("EPSG:3857", "EPSG:4326", always_xy=True)
    lon, la = to_ll.transform([x + 320, x + 320], [y + 320, y - 320])
    expected_y = WGS84.inv(lon[0], la[0], lon[1], la[1])[2] / 64
    assert s["gsd_xy"][0] == pytest.approx(expected_x, rel=0.01)
    assert s["gsd_xy"][1] == pytest.approx(expected_y, rel=0.01)
    assert s["gsd"] == pytest.approx(10.0 * math.cos(math.radians(lat)), rel=0.01)  # not the projected 10 m
    assert s["res"] == pytest.approx(s["gsd"] / 5.0)
    assert ds.tile_index["gsd"].iloc[0] == pytest.approx(s["gsd"], rel=1e-3)


def test_gsd_is_per_window_in_a_large_lonlat_tile(tmp_path):
    transform = Affine(0.1, 0, 10.0, 0, -0.1, 70.0)  # 0.1 degree pixels from 70 N to 63.6 N
    write_geotiff(tmp_path / "ll.tif", _ramp(1, 64, 64), transform, "EPSG:4326")
    ds = GeoTiffDataset(tmp_path, window_size=8, index_cache=False)
    north, south = ds[WindowSpec(0, 0, 0, 8, 8)], ds[WindowSpec(0, 56, 0, 8, 8)]
    for s, row in ((north, 4), (south, 60)):
        assert s["gsd_xy"][0] == pytest.approx(_geodesic_px("EPSG:4326", transform, 64, row), rel=0.005)
    assert north["gsd_xy"][0] < 0.9 * south["gsd_xy"][0]  # anisotropic, and shrinking towards the pole
    assert north["gsd_xy"][1] == pytest.approx(south["gsd_xy"][1], rel=0.01)  # ~11.1 km per 0.1 deg of latitude
    assert north["gsd"] == pytest.approx(sum(north["gsd_xy"]) / 2)


# ------------------------------------------------------------------------------------ 2. band-file scenes
def _s2_scene(folder, seed=0, nodata=None, scene="T33UUP_20240101", x0=600000.0):
    """Three single-band files at 10, 20 and 60 m on one UTM footprint (1920 m a side)."""
    y0 = 5000040.0
    for name, gsd in (("B02", 10.0), ("B05", 20.0), ("B01", 60.0)):
        n = int(1920 / gsd)
        write_geotiff(folder / f"{scene}_{name}.tif", _ramp(1, n, n, seed + int(gsd)),
                      Affine(gsd, 0, x0, 0, -gsd, y0), "EPSG:32633", nodata=nodata)
    return folder


BANDS = ["*_B02.tif", "*_B05.tif", "*_B01.tif"]


def test_band_files_are_stacked_on_the_finest_grid_as_gdal_resamples_each_band(tmp_path):
    for k in range(2):
        _s2_scene(tmp_path / f"scene{k}", seed=k)
    ds = GeoTiffDataset(tmp_path, window_size=32, band_files=BANDS, scene_glob="scene*", resampling="bilinear",
                        index_cache=False)
    index = ds.tile_index
    assert len(index) == 2 and list(index["count"]) == [3, 3] and bool(index["warped"].iloc[0])
    assert index["width"].iloc[0] == 192 and index["transform"].iloc[0][0] == 10.0  # the 10 m grid
    spec = WindowSpec(1, 50, 70, 32, 32)
    s = ds[spec]
    assert s["image"].shape == (3, 32, 32) and bool(s["mask"].all())
    window_t = Affine(*s["transform"])
    assert window_t == Affine(10, 0, 600000 + 700, 0, -10, 5000040 - 500)
    for band, name in enumerate(["B02", "B05", "B01"]):
        with rasterio.open(tmp_path / "scene1" / f"T33UUP_20240101_{name}.tif") as src:
            dst = np.zeros((32, 32), np.float32)
            reproject(src.read(1).astype(np.float32), dst, src_transform=src.transform, src_crs=src.crs,
                      dst_transform=window_t, dst_crs=src.crs, resampling=Resampling.bilinear)
        np.testing.assert_allclose(s["image"][band].numpy(), dst, rtol=0, atol=1e-3)
    with rasterio.open(tmp_path / "scene1" / "T33UUP_20240101_B02.tif") as src:  # 10 m band untouched
        raw = src.read(1, window=rasterio.windows.Window(70, 50, 32, 32)).astype(np.float32)
    assert torch.equal(s["image"][0], torch.from_numpy(raw))
    assert s["gsd"] == pytest.approx(10.0, rel=2e-3) and s["path"].endswith("scene1/T33UUP_20240101")
    coarse = GeoTiffDataset(tmp_path, window_size=16, band_files=BANDS, scene_glob="scene*", target_gsd=20.0,
                            index_cache=False)
    assert coarse.tile_index["width"].iloc[0] == 96 and coarse[WindowSpec(0, 5, 5, 16, 16)]["gsd"] == pytest.approx(
        20.0, rel=2e-3)


def test_flat_folder_of_scenes_and_scene_errors(tmp_path):
    flat = tmp_path / "flat"
    _s2_scene(flat, scene="T33UUP_20240101")
    _s2_scene(flat, scene="T33UUP_20240111", seed=3, x0=601920.0)  # a second scene in the same folder
    index = build_tile_index(flat, band_files=BANDS, index_cache=False)
    assert [os.path.basename(p) for p in index["path"]] == ["T33UUP_20240101", "T33UUP_20240111"]
    assert all(len(f) == 3 and len({os.path.basename(x)[:15] for x in f}) == 1 for f in index["files"])
    (flat / "T33UUP_20240121_B02.tif").write_bytes((flat / "T33UUP_20240101_B02.tif").read_bytes())
    with pytest.raises(DataError, match=r"T33UUP_20240121: no band file matching '\*_B05.tif'"):
        build_tile_index(flat, band_files=BANDS, index_cache=False)
    _s2_scene(tmp_path / "nested" / "a")
    _s2_scene(tmp_path / "nested" / "b")
    with pytest.raises(DataError, match=r"both match band pattern '\*\*/\*_B02.tif'.*scene_glob"):
        build_tile_index(tmp_path / "nested", band_files=["**/" + b for b in BANDS], index_cache=False)
    assert len(build_tile_index(tmp_path / "nested", band_files=BANDS, scene_glob="*", index_cache=False)) == 2


# -------------------------------------------------------------------------------------- 3. reprojection
def test_mixed_crs_collection_reads_warped_windows_with_ground_gsd(tmp_path):
    # one tile in UTM 32N, one in UTM 33N, one in lon/lat; read together in UTM 33N at 10 m
    write_geotiff(tmp_path / "a_32632.tif", _ramp(2, 64, 64, 1), Affine(10, 0, 800000, 0, -10, 5200000), "EPSG:32632")
    write_geotiff(tmp_path / "b_32633.tif", _ramp(2, 64, 64, 2), Affine(10, 0, 300000, 0, -10, 5200000), "EPSG:32633")
    write_geotiff(tmp_path / "c_4326.tif", _ramp(2, 64, 64, 3), Affine(1e-4, 0, 15.0, 0, -1e-4, 47.0), "EPSG:4326")
    ds = GeoTiffDataset(tmp_path, window_size=16, crs="EPSG:32633", target_gsd=10.0, index_cache=False)
    index = ds.tile_index
    assert index.crs.to_epsg() == 32633 and set(index["crs"]) == {"EPSG:32633"}
    assert set(index["native_crs"]) == {"EPSG:32632", "EPSG:32633", "EPSG:4326"}
    for t, name in enumerate(index["path"]):
        s = ds[WindowSpec(t, 20, 20, 16, 16)]
        window_t = Affine(*s["transform"])
        assert s["crs"] == "EPSG:32633" and window_t.a == 10.0 and window_t.e == -10.0
        cx, cy = window_t * (8, 8)
        lon, lat = Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True).transform(
            [cx - 5, cx + 5], [cy, cy])
        assert s["gsd_xy"][0] == pytest.approx(WGS84.inv(lon[0], lat[0], lon[1], lat[1])[2], rel=1e-3)
        # GDAL's (exact-transformer) warp of the whole file onto the tile's whole grid: the window is a part of it
        expected, expected_ok = whole_scene_warp(ds, t, "bilinear")
        expected, expected_ok = expected[:, 20:36, 20:36], expected_ok[:, 20:36, 20:36]
        valid = s["mask"].numpy()
        assert valid.mean() > 0.5 and np.array_equal(s["band_mask"].numpy(), expected_ok)
        np.testing.assert_allclose(s["image"].numpy()[:, valid], expected[:, valid], atol=1e-3)
    native = GeoTiffDataset(tmp_path, window_size=16, index_cache=False)  # each tile in its own CRS
    assert list(native.tile_index["crs"]) == ["EPSG:32632", "EPSG:32633", "EPSG:4326"]


# ------------------------------------------------------------------------------------------- 4. mosaics
def test_window_across_four_tiles_equals_the_mosaic(tmp_path):
    full = _ramp(3, 64, 64, 5)
    origin = Affine(2.0, 0, 500000, 0, -2.0, 4200000)
    for i in range(2):
        for j in range(2):
            write_geotiff(tmp_path / "tiles" / f"t{i}{j}.tif", full[:, 32 * i:32 * i + 32, 32 * j:32 * j + 32],
                          origin @ Affine.translation(32 * j, 32 * i), "EPSG:32610", nodata=0)
    srcs = [rasterio.open(tmp_path / "tiles" / f"t{i}{j}.tif") for i in range(2) for j in range(2)]
    mosaic, mosaic_t = merge(srcs)
    for s in srcs:
        s.close()
    assert mosaic_t == origin and np.array_equal(mosaic, full)
    write_geotiff(tmp_path / "one" / "mosaic.tif", mosaic, mosaic_t, "EPSG:32610", nodata=0)

    tiles = GeoTiffDataset(tmp_path / "tiles", window_size=48, mosaic=True, index_cache=False)
    one = GeoTiffDataset(tmp_path / "one", window_size=48, index_cache=False)
    assert tiles.tile_shapes[0] == (32, 32)  # the window is larger than any tile
    a = tiles[WindowSpec(0, 10, 12, 48, 48)]  # from the top-left tile, over all four
    b = one[WindowSpec(0, 10, 12, 48, 48)]
    assert torch.equal(a["image"], b["image"]) and bool(a["mask"].all())
    assert a["transform"] == b["transform"] and a["bounds"] == pytest.approx(b["bounds"])
    c = tiles[WindowSpec(3, -22, -20, 48, 48)]  # same ground window, anchored on the bottom-right tile
    assert torch.equal(c["image"], b["image"])
    edge = tiles[WindowSpec(3, 10, 10, 48, 48)]  # hangs over the collection's edge: that part is invalid
    assert edge["mask"][:22, :22].all() and not edge["mask"][22:, :].any() and not edge["mask"][:, 22:].any()
    with pytest.raises(DataError, match="no raster can hold a 48x48 px window"):
        GeoTiffDataset(tmp_path / "tiles", window_size=48, index_cache=False)
    # a 2x GSD read across the four tiles (warped, averaged) equals the decimated read of the mosaic
    g = one.tile_index["gsd"].iloc[0]
    tiles2 = GeoTiffDataset(tmp_path / "tiles", window_size=16, mosaic=True, gsd_range=[2 * g] * 2, index_cache=False)
    one2 = GeoTiffDataset(tmp_path / "one", window_size=16, gsd_range=[2 * g] * 2, index_cache=False)
    a2, b2 = tiles2[WindowSpec(0, 24, 24, 16, 16)], one2[WindowSpec(0, 24, 24, 16, 16)]
    assert a2["transform"] == b2["transform"] and Affine(*a2["transform"]).a == 4.0
    block = full[:, 16:48, 16:48].astype(np.float64).reshape(3, 16, 2, 16, 2).mean(axis=(2, 4))
    np.testing.assert_allclose(a2["image"].numpy(), block, rtol=1e-6)  # warped in float32
    np.testing.assert_allclose(b2["image"].numpy(), block, atol=0.5)  # GDAL's decimated read: in the file's uint16


def test_mosaic_sampler_keeps_area_weights_and_rank_disjointness(tmp_path):
    write_geotiff(tmp_path / "big.tif", _ramp(1, 40, 40), Affine(1, 0, 0, 0, -1, 1000), "EPSG:32633")
    write_geotiff(tmp_path / "small.tif", _ramp(1, 20, 20), Affine(1, 0, 40, 0, -1, 1000), "EPSG:32633")
    ds = GeoTiffDataset(tmp_path, window_size=32, mosaic=True, index_cache=False)
    windows = ds.make_sampler(length=3000).windows(0)
    names = [os.path.basename(p) for p in ds.tile_index["path"]]
    counts = np.bincount([w.tile for w in windows], minlength=2)
    assert counts[names.index("big.tif")] / 3000 == pytest.approx(0.8, abs=0.03)  # 40² vs 20² m²
    for w in windows:  # centres inside their tile
        h, wd = ds.tile_shapes[w.tile]
        assert 0 <= w.row + 16 < h and 0 <= w.col + 16 < wd
    ranks = [list(ds.make_sampler(length=30, num_replicas=3, rank=r, seed=1)) for r in range(3)]
    assert all(len(r) == 10 for r in ranks) and sorted(sum(ranks, [])) == sorted(
        ds.make_sampler(length=30, seed=1).windows(0))
    assert not set(ranks[0]) & set(ranks[1]) and not set(ranks[1]) & set(ranks[2])


# ------------------------------------------------------------------------------------ 5. multi-GSD reads
@pytest.mark.parametrize("overviews", [False, True])
def test_gsd_range_reads_at_2x_and_4x(tmp_path, overviews):
    arr = _ramp(2, 128, 128, 7).astype(np.float32)
    path = write_geotiff(tmp_path / "r.tif", arr, Affine(1.0, 0, 500000, 0, -1.0, 4200000), "EPSG:32610")
    if overviews:
        with rasterio.open(path, "r+") as dst:
            dst.build_overviews([2, 4], Resampling.average)
        assert geo_index.read_raster_info(path).overviews == 2
    native = GeoTiffDataset(path, window_size=16, reference_gsd=1.0, index_cache=False)[WindowSpec(0, 56, 56, 16, 16)]
    for f in (2, 4):
        ds = GeoTiffDataset(path, window_size=16, gsd_range=[f * native["gsd"]] * 2, reference_gsd=1.0,
                            index_cache=False)
        s = ds[WindowSpec(0, 56, 56, 16, 16)]
        assert s["res"] == pytest.approx(f * native["res"], rel=1e-6) and s["gsd"] == pytest.approx(f * native["gsd"])
        r0 = 64 - 8 * f  # same centre, f times the ground per side
        block = arr[:, r0:r0 + 16 * f, r0:r0 + 16 * f].reshape(2, 16, f, 16, f).mean(axis=(2, 4))
        np.testing.assert_allclose(s["image"].numpy(), block, rtol=1e-5)
        assert Affine(*s["transform"]).a == f
    ds = GeoTiffDataset(path, window_size=16, gsd_range=[1.0, 10.0], index_cache=False)
    gsds = [ds[w]["gsd"] for w in ds.make_sampler(length=40).windows(0)]
    assert min(gsds) >= native["gsd"] * 0.999 and max(gsds) <= 10.0 * 1.001 and np.std(gsds) > 1.0


def test_gsd_range_reads_come_from_the_overviews(tmp_path):
    arr = np.random.default_rng(0).random((2, 128, 128)).astype(np.float32)
    path = write_geotiff(tmp_path / "r.tif", arr, Affine(1.0, 0, 500000, 0, -1.0, 4200000), "EPSG:32610")
    with rasterio.open(path, "r+") as dst:
        dst.build_overviews([2, 4], Resampling.nearest)  # overviews that differ from an average
    gsd = geo_index.read_raster_info(path).gsd
    s = GeoTiffDataset(path, window_size=16, gsd_range=[4 * gsd] * 2, index_cache=False)[WindowSpec(0, 56, 56, 16, 16)]
    with rasterio.open(path, overview_level=1) as ovr:  # the 4x level, 32 x 32 px
        expected = ovr.read(window=rasterio.windows.Window(8, 8, 16, 16))
    np.testing.assert_array_equal(s["image"].numpy(), expected)
    block = arr[:, 32:96, 32:96].reshape(2, 16, 4, 16, 4).mean(axis=(2, 4))
    assert np.abs(s["image"].numpy() - block).max() > 0.1


# ----------------------------------------------------------------------------------------- 6. nodata
def test_nodata_in_one_band_makes_the_pixel_invalid(tmp_path):
    arr = _ramp(3, 16, 16)
    arr[1, 3, 4] = 0  # nodata in band 2 only
    arr[:, 9, 9] = 0  # in every band
    arr[2, 5, 6] = 120
    write_geotiff(tmp_path / "a.tif", arr, Affine(1, 0, 0, 0, -1, 100), "EPSG:32633", nodata=0)
    ds = GeoTiffDataset(tmp_path, window_size=16, index_cache=False)
    s = ds[WindowSpec(0, 0, 0, 16, 16)]
    assert not s["mask"][3, 4] and not s["mask"][9, 9] and int(s["mask"].sum()) == 254
    assert s["band_mask"][:, 3, 4].tolist() == [True, False, True]
    tf = PretrainTransform(8, [100.0] * 3, [10.0] * 3, target_size=16, scale=(1.0, 1.0), random_crop=False,
                           hflip_p=0.0)
    view = GeoTiffPretrainDataset(ds, tf, [100.0] * 3)
    _, _, target, _ = view[WindowSpec(0, 0, 0, 16, 16)]
    assert torch.all(target[:, 3, 4] == 0) and torch.all(target[:, 9, 9] == 0)  # mean-filled: 0 after norm
    per_band = GeoTiffDataset(tmp_path, window_size=16, nodata=[None, 0, 120], index_cache=False)  # None: file's
    m = per_band[WindowSpec(0, 0, 0, 16, 16)]
    assert torch.equal(m["band_mask"][2], torch.from_numpy(arr[2] != 120))
    assert torch.equal(m["band_mask"][0], torch.from_numpy(arr[0] != 0))
    assert not m["mask"][3, 4] and not m["mask"][5, 6] and not m["mask"][9, 9] and int(m["mask"].sum()) == 253
    # scenes: every band file has its own nodata
    _s2_scene(tmp_path / "s2" / "scene", nodata=65535)
    with rasterio.open(tmp_path / "s2" / "scene" / "T33UUP_20240101_B05.tif", "r+") as dst:
        dst.write(np.full((1, 2, 2), 65535, np.uint16), window=rasterio.windows.Window(10, 10, 2, 2))
    sc = GeoTiffDataset(tmp_path / "s2", window_size=32, band_files=BANDS, scene_glob="*", resampling="nearest",
                        index_cache=False)
    w = sc[WindowSpec(0, 10, 10, 32, 32)]
    assert not w["mask"][10:14, 10:14].any() and w["band_mask"][0, 10:14, 10:14].all()
    assert int((~w["mask"]).sum()) == 16
    cfg = {"data": {"type": "geotiff", "img_dir": str(tmp_path / "s2"), "band_files": BANDS, "scene_glob": "*",
                    "mean": [200.0] * 3, "std": [50.0] * 3, "size": 32, "length": 4, "min_valid": 1.0,
                    "index_cache": False}}
    pre = build_pretrain_dataset(cfg, input_size=16, target_size=32)
    assert float(pre._read(WindowSpec(0, 10, 10, 32, 32))["mask"].float().mean()) == 1.0  # redrawn


# ------------------------------------------------------------------------ header cache, one-line errors
def _counting_reader(log):
    real = geo_index._read_header

    def wrapped(path, verify):
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()} {path}\n")
        return real(path, verify)

    return wrapped


def _build(source):
    build_tile_index(source)


def test_header_cache_is_built_once_and_shared(tmp_path, monkeypatch):
    for i in range(3):
        write_geotiff(tmp_path / "d" / f"t{i}.tif", _ramp(1, 8, 8), Affine(1, 0, 10 * i, 0, -1, 8), "EPSG:32633")
    log = tmp_path / "opens.log"
    monkeypatch.setattr(geo_index, "_read_header", _counting_reader(log))
    procs = [mp.get_context("fork").Process(target=_build, args=(tmp_path / "d",)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert len(log.read_text().splitlines()) == 3  # three "ranks", three files: each header read once
    assert (tmp_path / "d" / geo_index.CACHE_FILENAME).exists()
    index = build_tile_index(tmp_path / "d", glob="*")  # a catch-all glob does not pick up the cache files
    assert len(index) == 3 and len(log.read_text().splitlines()) == 3 and index["gsd"].iloc[0] == pytest.approx(1.0, rel=0.01)
    write_geotiff(tmp_path / "d" / "t1.tif", _ramp(2, 8, 8), Affine(1, 0, 10, 0, -1, 8), "EPSG:32633")
    os.utime(tmp_path / "d" / "t1.tif", ns=(1, 1))
    with pytest.raises(DataError, match="t1.tif: has 2 band"):  # changed file: re-read, not served stale
        build_tile_index(tmp_path / "d")
    assert len(log.read_text().splitlines()) == 4


def test_worker_data_error_is_one_line(tmp_path):
    path = write_geotiff(tmp_path / "t.tif", _ramp(1, 64, 64), Affine(1, 0, 0, 0, -1, 64), "EPSG:32633")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])
    ds = GeoTiffDataset(tmp_path, window_size=16, verify=False, index_cache=False)
    loader = DataLoader(ds, batch_size=1, sampler=[WindowSpec(0, 48, 0, 16, 16)], num_workers=1)
    batches = iter(loader)
    try:
        next(batches)
        text = None
    except DataError as exc:
        text = str(exc)
    finally:  # stop the worker now: collecting the iterator later costs a 5 s worker join
        getattr(batches, "_shutdown_workers", lambda: None)()
    assert text is not None
    assert "\n" not in text and "t.tif: failed to read window" in text and "DataLoader worker process 0" in text


def test_sample_transform_places_vector_labels(tmp_path):
    from rasterio.features import rasterize
    from shapely.geometry import box

    write_geotiff(tmp_path / "a.tif", _ramp(1, 32, 32), Affine(2, 0, 1000, 0, -2, 2000), "EPSG:32633")
    s = GeoTiffDataset(tmp_path, window_size=8, index_cache=False)[WindowSpec(0, 4, 6, 8, 8)]
    label = rasterize([box(1012, 1988, 1016, 1992)], out_shape=(8, 8), transform=Affine(*s["transform"]))
    assert np.argwhere(label).tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]


# ------------------------------------------------------------------ the documented layouts, end to end
REPO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "config")


def _write(path, arr, transform, crs, driver="GTiff", **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.asarray(arr)
    with rasterio.open(path, "w", driver=driver, width=arr.shape[2], height=arr.shape[1], count=arr.shape[0],
                       dtype=arr.dtype.name, crs=crs, transform=transform, **kw) as dst:
        dst.write(arr)


def _fake_layout(name, root):
    """Tiny fake data in the layout that ``config/<name>.yaml`` documents; returns config overrides."""
    t10 = Affine(10, 0, 600000, 0, -10, 5000040)
    if name == "sentinel2":
        for b in ("B02", "B03", "B04"):
            _write(root / "sentinel2" / "T33UUP" / f"T33UUP_20240101_{b}_10m.tif", _ramp(1, 32, 32), t10, "EPSG:32633")
        return []
    if name == "sentinel2_l2a_safe":
        img = root / "S2_L2A" / "S2B_MSIL2A_20240101T101329_T32TQM.SAFE" / "GRANULE" / "L2A_T32TQM" / "IMG_DATA"
        for b in ("B02", "B03", "B04", "B08"):
            _write(img / "R10m" / f"T32TQM_20240101T101329_{b}_10m.jp2", _ramp(1, 32, 32), t10, "EPSG:32632",
                   driver="JP2OpenJPEG", REVERSIBLE="YES", QUALITY=100)
        for b in ("B05", "B06", "B07", "B8A", "B11", "B12"):
            _write(img / "R20m" / f"T32TQM_20240101T101329_{b}_20m.jp2", _ramp(1, 16, 16),
                   Affine(20, 0, 600000, 0, -20, 5000040), "EPSG:32632", driver="JP2OpenJPEG", REVERSIBLE="YES",
                   QUALITY=100)
        return []
    if name == "landsat8_c2l2":
        scene = "LC08_L2SP_044034_20240101_20240110_02_T1"
        for b in range(2, 8):
            _write(root / "landsat" / scene / f"{scene}_SR_B{b}.TIF", _ramp(1, 24, 24),
                   Affine(30, 0, 500000, 0, -30, 4200000), "EPSG:32610")
        return []
    if name == "bigearthnet":
        bands = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12"]
        gsd = {"B01": 60, "B09": 60, "B05": 20, "B06": 20, "B07": 20, "B8A": 20, "B11": 20, "B12": 20}
        for i in range(2):
            for j in range(2):  # four contiguous 12 px patches (the real ones are 120 px)
                patch = f"S2A_MSIL2A_20170613T101031_{i}_{j}"
                for b in bands:
                    g = gsd.get(b, 10)
                    _write(root / "BigEarthNet-v1.0" / patch / f"{patch}_{b}.tif", _ramp(1, 120 // g, 120 // g),
                           Affine(g, 0, 600000 + 120 * j, 0, -g, 5000040 - 120 * i), "EPSG:32632")
        return ["data.size=16"]
    if name == "webmercator_tiles":
        x, y = Transformer.from_crs("EPSG:4326", "EPSG:3857", always_xy=True).transform(10.0, 40.0)
        for i in range(2):
            for j in range(2):
                _write(root / "tiles_z17" / "17" / f"{j}" / f"{i}.tif", _ramp(3, 16, 16, dtype=np.uint8),
                       Affine(1.19, 0, x + 16 * 1.19 * j, 0, -1.19, y - 16 * 1.19 * i), "EPSG:3857")
        return ["data.size=24"]
    if name == "mixed_crs":
        _write(root / "my_rasters" / "a.tif", _ramp(4, 32, 32, 1), Affine(10, 0, 800000, 0, -10, 5200000), "EPSG:32632")
        _write(root / "my_rasters" / "b.tif", _ramp(4, 32, 32, 2), Affine(10, 0, 300000, 0, -10, 5200000), "EPSG:32633")
        _write(root / "my_rasters" / "c.tif", _ramp(4, 32, 32, 3), Affine(1e-4, 0, 15.0, 0, -1e-4, 47.0), "EPSG:4326")
        return []
    if name == "cog_multiscale":
        path = root / "cogs" / "scene.tif"
        _write(path, _ramp(3, 128, 128), Affine(10, 0, 500000, 0, -10, 4200000), "EPSG:32610", tiled=True,
               blockxsize=64, blockysize=64)
        with rasterio.open(path, "r+") as dst:
            dst.build_overviews([2, 4], Resampling.average)
        return []
    raise AssertionError(name)


LAYOUTS = ["sentinel2", "sentinel2_l2a_safe", "landsat8_c2l2", "bigearthnet", "webmercator_tiles", "mixed_crs",
           "cog_multiscale"]


@pytest.mark.parametrize("name", LAYOUTS)
def test_documented_layout_configs_read_their_layout(tmp_path, name):
    from dataloaders.builders import build_pretrain_sampler
    from dataloaders.config import load_config

    overrides = _fake_layout(name, tmp_path)
    cfg = load_config(os.path.join(REPO_CONFIG, f"{name}.yaml"), data_root=tmp_path,
                      overrides=["data.length=4", "data.min_valid=0.0", "data.index_cache=false"] + overrides
                      + ([] if any(o.startswith("data.size") for o in overrides) else ["data.size=16"]))
    d = cfg["data"]
    ds = build_pretrain_dataset(cfg, input_size=8, target_size=16)
    geo = ds.geo
    window = next(iter(build_pretrain_sampler(ds, cfg)))
    sample = geo[window]
    assert sample["image"].shape == (len(d["mean"]), d["size"], d["size"])
    assert float(sample["mask"].float().mean()) > 0.2
    ref_gsd = {"webmercator_tiles": 1.19 * math.cos(math.radians(40.0))}.get(name, geo.tile_index["gsd"].iloc[0])
    if name == "cog_multiscale":
        assert 10.0 * 0.999 <= sample["gsd"] <= 80.0 * 1.001
    else:
        assert sample["gsd"] == pytest.approx(ref_gsd, rel=0.01)
    inp, in_res, tgt, t_res = ds[window]
    assert inp.shape == (len(d["mean"]), 8, 8) and torch.isfinite(tgt).all() and float(t_res) > 0


@pytest.mark.parametrize("extra,match", [
    ({"resampling": "bicubic"}, r"data.resampling: expected one of nearest, bilinear"),
    ({"band_files": ["*_B02.tif"], "bands": [1, 2, 3]}, r"data.bands: not valid together with data.band_files"),
    ({"scene_glob": "*"}, r"data.scene_glob: only used with data.band_files"),
    ({"gsd_range": [80, 10]}, r"data.gsd_range: expected \[min, max\]"),
    ({"crs": "EPSG:99999999"}, r"data.crs: not a CRS pyproj understands"),
    ({"mosaic": "yes"}, r"data.mosaic: expected true or false"),
    ({"nodata": [0, 0]}, r"data.nodata: expected one value or 3"),
    ({"nodata_mode": "some"}, r"data.nodata_mode: expected one of any, all"),
    ({"target_gsd": -5}, r"data.target_gsd: expected a positive number"),
])
def test_geo_config_errors_name_the_key(extra, match):
    from dataloaders.config import ConfigError, validate_config

    raw = {"data": {"type": "geotiff", "img_dir": "x", "mean": [0.0] * 3, "std": [1.0] * 3, **extra}}
    with pytest.raises(ConfigError, match=match):
        validate_config(raw, source="c.yaml")
    ok = validate_config({"data": {"type": "geotiff", "img_dir": "x", "mean": [0.0] * 3, "std": [1.0] * 3,
                                   "nodata": [0, None, 5], "index_cache": False, "mosaic": True}})["data"]
    assert ok["index_cache"] is False and ok["mosaic"] is True


def test_rotated_raster_reads_its_own_pixels(tmp_path):
    arr = _ramp(2, 32, 32)
    t = Affine.translation(500000, 4200000) @ Affine.rotation(20) @ Affine.scale(2, -2)
    write_geotiff(tmp_path / "rot.tif", arr, t, "EPSG:32610")
    s = GeoTiffDataset(tmp_path, window_size=8, index_cache=False)[WindowSpec(0, 3, 5, 8, 8)]
    assert torch.equal(s["image"], torch.from_numpy(arr[:, 3:11, 5:13].astype(np.float32)))
    assert s["gsd_xy"] == pytest.approx((2 / 0.9996, 2 / 0.9996), rel=1e-4)
    assert Affine(*s["transform"]) == t @ Affine.translation(5, 3)


def test_target_gsd_cells_per_crs(tmp_path):
    from dataloaders.geo_index import grid_cell

    x, y = Transformer.from_crs("EPSG:4326", "EPSG:3857", always_xy=True).transform(10.0, 60.0)
    cx, cy = grid_cell("EPSG:3857", 10.0, x, y)
    assert cx == pytest.approx(20.0, rel=0.01) and cy == pytest.approx(20.0, rel=0.01)  # ground metres: 1/cos 60
    assert grid_cell("EPSG:32633", 10.0, 500000, 5e6) == (10.0, 10.0)  # grid metres: UTM bands stay on 10 m
    assert grid_cell("EPSG:2227", 10.0, 6e6, 2e6)[0] == pytest.approx(10 / 0.3048006096, rel=1e-9)  # US feet
    dx, dy = grid_cell("EPSG:4326", 10.0, 10.0, 60.0)
    assert WGS84.inv(10.0, 60.0, 10.0 + dx, 60.0)[2] == pytest.approx(10.0, rel=1e-3)
    assert WGS84.inv(10.0, 60.0, 10.0, 60.0 + dy)[2] == pytest.approx(10.0, rel=1e-3)
    # a UTM raster read in Web Mercator at target_gsd 10 gets 10 m ground pixels
    write_geotiff(tmp_path / "u.tif", _ramp(1, 64, 64), Affine(10, 0, 500000, 0, -10, 6650000), "EPSG:32633")
    ds = GeoTiffDataset(tmp_path, window_size=16, crs="EPSG:3857", target_gsd=10.0, index_cache=False)
    h, w = ds.tile_shapes[0]
    assert ds[WindowSpec(0, h // 2 - 8, w // 2 - 8, 16, 16)]["gsd"] == pytest.approx(10.0, rel=0.01)
