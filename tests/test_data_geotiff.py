"""GeoTIFF datasets: GSD/CRS, bounds, nodata masks, band counts, AOI, window sampler, pretraining view."""
import math

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from shapely.geometry import Point, box
from torch.utils.data import DataLoader

from dataloaders.builders import build_pretrain_dataset, build_pretrain_sampler
from dataloaders.errors import DataError
from dataloaders.geotiff import (DistributedRandomWindowSampler, GeoTiffDataset, GeoTiffPretrainDataset, WindowSpec,
                                 build_tile_index, read_raster_info, relative_res)
from dataloaders.synthetic import make_geotiff_folder, write_geotiff
from dataloaders.transforms import PretrainTransform


def test_projected_gsd_crs_and_bounds(tmp_path):
    make_geotiff_folder(tmp_path, n=2, bands=3, size=64, gsd=0.6, crs="EPSG:32610")
    info = read_raster_info(tmp_path / "tile_001.tif")
    assert info.crs == "EPSG:32610" and not info.geographic
    # ground metres: the 0.6 m grid near the UTM central meridian, divided by its point scale 0.9996
    assert info.gsd_x == pytest.approx(0.6 / 0.9996, rel=1e-5) and info.gsd_y == pytest.approx(0.6 / 0.9996, rel=1e-5)
    ds = GeoTiffDataset(tmp_path, window_size=16)
    s = ds[WindowSpec(1, 10, 20, 16, 16)]
    assert s["gsd"] == pytest.approx(0.6 / 0.9996, rel=1e-5) and s["crs"] == "EPSG:32610"
    assert s["path"].endswith("tile_001.tif")
    x0, y0 = 500000 + 64 * 0.6, 4200000
    assert s["bounds"] == pytest.approx((x0 + 20 * 0.6, y0 - 26 * 0.6, x0 + 36 * 0.6, y0 - 10 * 0.6))
    with rasterio.open(tmp_path / "tile_001.tif") as src:
        raw = src.read(window=rasterio.windows.Window(20, 10, 16, 16)).astype(np.float32)
    assert s["image"].dtype == torch.float32 and torch.equal(s["image"], torch.from_numpy(raw))


def test_feet_crs_gsd_in_metres(tmp_path):
    make_geotiff_folder(tmp_path, n=1, size=32, gsd=2.0, crs="EPSG:2227", origin=(6000000.0, 2000000.0))
    info = read_raster_info(tmp_path / "tile_000.tif")
    assert info.gsd == pytest.approx(2.0 * 1200 / 3937, rel=1e-4)  # US survey feet (state plane scale ~1 - 5e-5)
    assert info.gsd != pytest.approx(2.0, rel=0.1)


def test_geographic_gsd_is_geodesic_metres(tmp_path):
    make_geotiff_folder(tmp_path, n=1, bands=3, size=64, gsd=1e-5, crs="EPSG:4326", origin=(-122.0, 37.0))
    info = read_raster_info(tmp_path / "tile_000.tif")
    assert info.geographic and info.crs == "EPSG:4326"
    lat = math.radians(37.0 - 32 * 1e-5)
    sphere = 6371008.8 * math.radians(1e-5)
    assert info.gsd_x == pytest.approx(sphere * math.cos(lat), rel=0.01)  # ~0.89 m
    assert info.gsd_y == pytest.approx(sphere, rel=0.01)  # ~1.11 m
    s = GeoTiffDataset(tmp_path, window_size=8)[0]
    assert s["gsd"] == pytest.approx((info.gsd_x + info.gsd_y) / 2) and s["crs"] == "EPSG:4326"


def test_nodata_mask_from_file_and_override(tmp_path):
    make_geotiff_folder(tmp_path, n=1, size=32, nodata=0)
    ds = GeoTiffDataset(tmp_path, window_size=16)
    mask = ds[WindowSpec(0, 0, 0, 16, 16)]["mask"]
    rows, cols = np.indices((16, 16))
    assert mask.dtype == torch.bool and torch.equal(mask, torch.from_numpy((rows + cols) >= 8))
    # override: a value that occurs in the data becomes nodata
    s = ds[WindowSpec(0, 16, 16, 16, 16)]
    value = float(s["image"][:, 5, 5].max())
    band_vals = s["image"][:, 5, 5]
    ds2 = GeoTiffDataset(tmp_path, window_size=16, nodata=value)
    s2 = ds2[WindowSpec(0, 16, 16, 16, 16)]
    assert bool((band_vals == value).any()) and not bool((band_vals == value).all())
    assert not s2["mask"][5, 5]  # default nodata_mode "any": nodata in one band makes the pixel invalid
    assert torch.equal(s2["mask"], ~(s["image"] == value).any(0))
    assert torch.equal(s2["band_mask"], s["image"] != value)
    ds3 = GeoTiffDataset(tmp_path, window_size=16, nodata=value, nodata_mode="all")
    m3 = ds3[WindowSpec(0, 16, 16, 16, 16)]["mask"]
    assert bool(m3[5, 5]) and torch.equal(m3, ~(s["image"] == value).all(0))


def test_float_nan_is_invalid(tmp_path):
    arr = np.random.default_rng(0).random((2, 16, 16)).astype(np.float32)
    arr[:, 3, 4] = np.nan
    write_geotiff(tmp_path / "f.tif", arr, Affine(1.0, 0.0, 0, 0.0, -1.0, 100), "EPSG:32633")
    s = GeoTiffDataset(tmp_path, window_size=16)[WindowSpec(0, 0, 0, 16, 16)]
    assert not s["mask"][3, 4] and s["mask"].sum() == 255


@pytest.mark.parametrize("bands,dtype", [(6, "uint16"), (13, "int16"), (4, "uint8"), (5, "float32")])
def test_multiband_any_dtype(tmp_path, bands, dtype):
    make_geotiff_folder(tmp_path, n=1, bands=bands, size=32, dtype=dtype, nodata=None)
    ds = GeoTiffDataset(tmp_path, window_size=16, scale=2.0)
    s = ds[0]
    assert ds.num_bands == bands and s["image"].shape == (bands, 16, 16) and s["image"].dtype == torch.float32
    assert bool(s["mask"].all())
    sel = GeoTiffDataset(tmp_path, window_size=16, bands=[bands, 1])
    w = WindowSpec(0, 4, 4, 16, 16)
    full, two = GeoTiffDataset(tmp_path, window_size=16)[w]["image"], sel[w]["image"]
    assert torch.equal(two, full[[bands - 1, 0]])
    torch.testing.assert_close(ds[w]["image"], full / 2.0)


def _aoi_file(tmp_path, geom_utm, suffix):
    path = tmp_path / f"aoi{suffix}"
    gpd.GeoDataFrame(geometry=[geom_utm], crs="EPSG:32610").to_crs("EPSG:4326").to_file(path)
    return path


@pytest.mark.parametrize("suffix", [".geojson", ".gpkg"])
def test_aoi_restricts_tiles_and_window_centres(tmp_path, suffix):
    make_geotiff_folder(tmp_path / "tiles", n=3, size=64, gsd=1.0, nodata=None)
    aoi_geom = box(500064 + 4, 4200000 - 40, 500064 + 30, 4200000 - 2)  # inside tile 1 only
    aoi = _aoi_file(tmp_path, aoi_geom, suffix)
    index = build_tile_index(tmp_path / "tiles", aoi=aoi)
    assert [p.rsplit("/", 1)[1] for p in index["path"]] == ["tile_001.tif"]
    assert index.crs.to_epsg() == 32610
    assert index["area_m2"].iloc[0] == pytest.approx(aoi_geom.area, rel=0.02)
    ds = GeoTiffDataset(tmp_path / "tiles", window_size=16, aoi=aoi)
    sampler = ds.make_sampler(length=40)
    for w in sampler:
        s = ds[w]
        minx, miny, maxx, maxy = s["bounds"]
        assert aoi_geom.buffer(0.5).contains(Point((minx + maxx) / 2, (miny + maxy) / 2))
        assert 0 <= w.row <= 48 and 0 <= w.col <= 48


def test_aoi_outside_all_tiles_is_an_error(tmp_path):
    make_geotiff_folder(tmp_path / "tiles", n=1, size=32)
    aoi = _aoi_file(tmp_path, box(400000, 4100000, 400100, 4100100), ".geojson")
    with pytest.raises(DataError, match="aoi.geojson"):
        build_tile_index(tmp_path / "tiles", aoi=aoi)


def _mixed_tiles(tmp_path):
    data = np.ones((1, 128, 128), np.uint8)
    write_geotiff(tmp_path / "big.tif", data, Affine(1.0, 0.0, 0, 0.0, -1.0, 1000), "EPSG:32633")
    write_geotiff(tmp_path / "small.tif", data[:, :64, :64], Affine(1.0, 0.0, 500, 0.0, -1.0, 1000), "EPSG:32633")
    write_geotiff(tmp_path / "tiny.tif", data[:, :8, :8], Affine(1.0, 0.0, 900, 0.0, -1.0, 1000), "EPSG:32633")
    return GeoTiffDataset(tmp_path, window_size=16)


def test_sampler_area_weighted_windows_inside_tiles(tmp_path):
    ds = _mixed_tiles(tmp_path)
    names = [p.rsplit("/", 1)[1] for p in ds.tile_index["path"]]
    windows = ds.make_sampler(length=2000).windows(0)
    counts = np.bincount([w.tile for w in windows], minlength=3)
    assert counts[names.index("tiny.tif")] == 0  # smaller than the window
    frac_big = counts[names.index("big.tif")] / 2000
    assert frac_big == pytest.approx(0.8, abs=0.04)  # 128² vs 64² px at the same GSD
    shapes = ds.tile_shapes
    assert all(0 <= w.row and w.row + 16 <= shapes[w.tile][0] and 0 <= w.col and w.col + 16 <= shapes[w.tile][1]
               for w in windows)


def test_sampler_deterministic_per_epoch_and_disjoint_across_ranks(tmp_path):
    make_geotiff_folder(tmp_path, n=3, size=64, nodata=None)
    index = build_tile_index(tmp_path)
    a = DistributedRandomWindowSampler(index, 16, length=30, seed=5)
    b = DistributedRandomWindowSampler(index, 16, length=30, seed=5)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b) and len(list(a)) == 30
    b.set_epoch(3)
    assert list(a) != list(b)
    c = DistributedRandomWindowSampler(index, 16, length=30, seed=6)
    c.set_epoch(2)
    assert list(c) != list(a)
    ranks = []
    for r in range(3):
        s = DistributedRandomWindowSampler(index, 16, length=30, num_replicas=3, rank=r, seed=5)
        s.set_epoch(2)
        ranks.append(list(s))
        assert len(s) == 10 and len(ranks[-1]) == 10
    for i in range(3):
        for j in range(i + 1, 3):
            assert set(ranks[i]).isdisjoint(ranks[j])
    assert sorted(sum(ranks, [])) == sorted(list(a))  # the ranks split one global sequence
    fixed = DistributedRandomWindowSampler(index, 16, length=30, seed=5, shuffle=False)
    first = list(fixed)
    fixed.set_epoch(7)
    assert list(fixed) == first


def test_relative_res():
    assert relative_res(0.6, 0.3) == pytest.approx(2.0)
    torch.testing.assert_close(relative_res(torch.tensor([10.0, 20.0]), 10.0), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError):
        relative_res(1.0, 0)


def _geo_cfg(img_dir, **extra):
    d = {"type": "geotiff", "img_dir": str(img_dir), "bands": [1, 2, 3, 4, 5, 6], "mean": [0.3] * 6,
         "std": [0.2] * 6, "scale": 3000.0, "size": 32, "length": 8}
    d.update(extra)
    return {"data": d}


def test_pretraining_view_six_bands_and_gsd_scaled_res(tmp_path):
    make_geotiff_folder(tmp_path, n=2, bands=6, size=64, gsd=2.0)
    out = {}
    for ref in (2.0, 1.0):
        cfg = _geo_cfg(tmp_path, reference_gsd=ref)
        ds = build_pretrain_dataset(cfg, input_size=16, target_size=32)
        sampler = build_pretrain_sampler(ds, cfg, num_replicas=1, rank=0, seed=0)
        window = next(iter(sampler))
        torch.manual_seed(0)
        out[ref] = ds[window]
    inp, in_res, tgt, t_res = out[2.0]
    assert inp.shape == (6, 16, 16) and tgt.shape == (6, 32, 32)
    assert t_res.item() <= 31 / 32 * 2.5 + 1e-6 and in_res.item() == pytest.approx(2 * t_res.item())
    torch.testing.assert_close(out[1.0][1], 2 * in_res)  # gsd / reference_gsd = 2 instead of 1
    torch.testing.assert_close(out[1.0][3], 2 * t_res)
    torch.testing.assert_close(out[1.0][2], tgt)


def test_pretraining_loader_with_workers_and_nodata_fill(tmp_path):
    make_geotiff_folder(tmp_path, n=2, bands=6, size=64, gsd=2.0, nodata=0)
    cfg = _geo_cfg(tmp_path, min_valid=1.0)
    ds = build_pretrain_dataset(cfg, input_size=16, target_size=32)
    sampler = build_pretrain_sampler(ds, cfg, num_replicas=2, rank=1, seed=0)
    sampler.set_epoch(1)
    batches = list(DataLoader(ds, batch_size=2, sampler=sampler, num_workers=2))
    assert len(batches) == 2
    imgs, in_res, tgts, t_res = batches[0]
    assert imgs.shape == (2, 6, 16, 16) and tgts.shape == (2, 6, 32, 32) and t_res.shape == (2,)
    assert torch.isfinite(imgs).all() and torch.isfinite(tgts).all()
    # nodata pixels are set to the band mean, i.e. 0 after normalisation; valid pixels are (x/scale-mean)/std
    tf = PretrainTransform(16, [0.3] * 6, [0.2] * 6, target_size=32, scale=(1.0, 1.0), random_crop=False,
                           hflip_p=0.0)  # full 32 px crop resized to 32 px = identity
    view = GeoTiffPretrainDataset(ds.geo, tf, [0.3] * 6)
    w = WindowSpec(0, 0, 0, 32, 32)
    raw = ds.geo[w]
    _, _, tgt, _ = view[w]
    invalid = ~raw["mask"]
    assert invalid.sum() > 0
    assert torch.all(tgt[:, invalid] == 0)
    torch.testing.assert_close(tgt[:, ~invalid], (raw["image"][:, ~invalid] - 0.3) / 0.2, atol=1e-5, rtol=1e-5)


def test_geotiff_dataset_int_index_deterministic(tmp_path):
    make_geotiff_folder(tmp_path, n=2, size=48, nodata=None)
    a, b = GeoTiffDataset(tmp_path, window_size=16, seed=1), GeoTiffDataset(tmp_path, window_size=16, seed=1)
    assert len(a) == 2
    assert a.window_for_index(1) == b.window_for_index(1)
    assert torch.equal(a[1]["image"], b[1]["image"])
    assert [a.window_for_index(i) for i in range(5)] != [GeoTiffDataset(tmp_path, 16, seed=2).window_for_index(i)
                                                         for i in range(5)]
