"""main_predict.py beyond tests/test_inference.py: polygons built strip by strip (equal to the whole map's),
Web Mercator and band-file rasters, the COG layout checked byte by byte (tests/cog_layout.py), ``--mosaic`` tiles
equal to the whole raster cropped (no seams), the training dtype, and the hint of ``main_segment.py --predict``."""
from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely
import torch
from affine import Affine
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from rasterio.features import shapes
from shapely.geometry import shape

import main_predict
from tests.cli import one_error_line
from tests.cog_layout import cog_problems, read_ifds
from tests.raster_reference import fake_values, write_tile
from tests.test_inference import SIZE, UTM, predict_args, segmenter, world  # noqa: F401 (module fixtures)
from util.seg_outputs import polygonize_prediction, polygonize_strips

PROPS = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                 phases=(Phase.explicit, Phase.generate), suppress_health_check=[HealthCheck.too_slow])
CLASSES = ["background", "a", "b", "c"]
GRID = Affine(0.3, 0.0, 500000.0, 0.0, -0.3, 4200000.0)  # 0.3 m: not a binary fraction


# ------------------------------------------------------------------------------------------ polygons in strips
def reference_regions(pred: np.ndarray, transform: Affine, simplify: float) -> list[tuple[int, shapely.Geometry]]:
    """Independent of util.seg_outputs: GDAL's polygons of the whole map at once (4-connectivity), each region
    simplified as a whole (normalised first: a ring's simplification depends on where it starts)."""
    out = []
    for geom, value in shapes(pred, mask=pred > 0, connectivity=4, transform=transform):
        poly = shapely.normalize(shape(geom).simplify(0))
        if simplify > 0:
            poly = poly.simplify(simplify, preserve_topology=True)
        out.append((int(value), poly))
    return out


def strips_of(pred: np.ndarray, height: int):
    return ((r, pred[r:r + height]) for r in range(0, pred.shape[0], height))


def assert_same_regions(gdf, expected: list[tuple[int, shapely.Geometry]]) -> None:
    """The rows of ``gdf`` are exactly the ``expected`` regions (any order): class, class name, area, geometry
    (the same vertices once normalised)."""
    key = lambda g: shapely.to_wkb(shapely.normalize(g))  # noqa: E731
    got = sorted((int(c), key(g)) for c, g in zip(gdf["class_id"], gdf.geometry))
    want = sorted((c, key(g)) for c, g in expected)
    assert got == want
    assert list(gdf["class"]) == [CLASSES[c] for c in gdf["class_id"]]
    np.testing.assert_array_equal(gdf["area"].to_numpy(), gdf.geometry.area.to_numpy())
    assert all(g.geom_type == "Polygon" and g.is_valid for g in gdf.geometry)


def test_strip_polygons_equal_the_whole_maps_on_rings_two_boundaries_and_diagonals():
    pred = np.zeros((13, 12), np.uint8)
    pred[1:10, 1:8] = 1
    pred[3:7, 3:6] = 0  # a ring whose hole and shell cross strip boundaries
    pred[4:6, 4] = 2  # an island in the hole
    pred[0:13, 9] = 3  # a column touching every boundary
    pred[11, 0], pred[12, 1], pred[10, 1] = 2, 2, 2  # diagonal-only neighbours: three regions, not one
    pred[11:13, 3:8] = np.array([[1, 0, 1, 0, 1], [1, 1, 1, 1, 1]])  # a comb: several pieces above, one below
    whole_gdf = polygonize_prediction(pred, GRID, "EPSG:32610", CLASSES)
    assert len(whole_gdf) == 7 and whole_gdf.crs.to_epsg() == 32610  # ring, island, column, 3 diagonal, comb
    for simplify in (0.0, 0.45):
        expected = reference_regions(pred, GRID, simplify)
        whole = polygonize_prediction(pred, GRID, "EPSG:32610", CLASSES, simplify)
        assert_same_regions(whole, expected)
        for height in (1, 2, 3, 4, 5, 12):
            strips = polygonize_strips(strips_of(pred, height), GRID, "EPSG:32610", CLASSES, simplify)
            assert_same_regions(strips, expected)
            # the same rows in the same order as the map polygonised whole
            assert list(strips["class_id"]) == list(whole["class_id"])
            assert all(a.equals_exact(b, 0) for a, b in zip(strips.geometry, whole.geometry))
    ring = whole_gdf[whole_gdf["class_id"] == 1].geometry.iloc[0]
    assert len(ring.interiors) == 1 and ring.area == pytest.approx((63 - 12) * 0.09)
    with pytest.raises(ValueError, match="strips must follow one another"):
        polygonize_strips([(0, pred[:4]), (5, pred[5:])], GRID, None, CLASSES)


@PROPS
@given(arrays(np.uint8, st.tuples(st.integers(2, 12), st.integers(1, 12)), elements=st.integers(0, 3),
              fill=st.nothing()),  # every pixel drawn: no mostly-empty maps
       st.integers(1, 6), st.booleans(), st.sampled_from([0.0, 0.4]))
def test_strip_polygons_equal_the_whole_maps_property(pred, height, blocky, simplify):
    if blocky:  # larger regions: more of them cross boundaries
        pred = np.kron(pred, np.ones((2, 2), np.uint8))
    got = polygonize_strips(strips_of(pred, height), GRID, None, CLASSES, simplify)
    assert_same_regions(got, reference_regions(pred, GRID, simplify))


# ----------------------------------------------------------------------------- polygons and COGs of a real run
def test_predicted_polygons_and_cog_layout(world, segmenter, tmp_path):  # noqa: F811
    """The class map is polygonised from its 4 finished strips of 24 rows (the stride); the GeoPackage holds the
    polygons of the whole map. Both COGs (--blocksize 64) pass the byte-level layout check; a tiled GeoTIFF with
    overviews added after its data does not, nor does GDAL's COG of 32 px tiles (its overviews get 128 px tiles:
    hence --blocksize 32 is refused)."""
    import geopandas as gpd

    main_predict.main(main_predict.get_args_parser().parse_args(predict_args(
        segmenter[1], world["utm"], tmp_path, "--probabilities", "--polygons", "--simplify", "0.8",
        "--blocksize", "64")))
    with rasterio.open(tmp_path / "utm_pred.tif") as src:
        classes, transform, crs = src.read(1), src.transform, src.crs
    gdf = gpd.read_file(tmp_path / "utm_pred.gpkg")
    assert gdf.crs == crs and list(gdf.columns) == ["class_id", "class", "area", "geometry"]
    expected = reference_regions(classes, transform, 0.8)
    crossing = [g for _, g in reference_regions(classes, transform, 0.0)
                if (4200000.0 - g.bounds[3]) // 24 != (4200000.0 - g.bounds[1] - 1) // 24]
    assert len(crossing) >= 3  # regions cut by the strips
    assert_same_regions(gdf, expected)  # the checkpoint's classes: background, a, b

    for name, bands in (("utm_pred.tif", 1), ("utm_prob.tif", 3)):
        path = tmp_path / name
        assert cog_problems(path) == [], name
        ifds, _ = read_ifds(path)
        assert [(i.get(257), i.get(256)) for i in ifds] == [(96, 128), (48, 64)]  # halved until it fits a tile
        assert all(i.get(322) == i.get(323) == 64 and i.get(277, 1) == bands for i in ifds)
    plain = tmp_path / "plain.tif"  # not cloud-optimised: overviews built after the data
    with rasterio.open(plain, "w", driver="GTiff", width=128, height=96, count=1, dtype="uint8", tiled=True,
                       blockxsize=16, blockysize=16, crs=crs, transform=transform) as dst:
        dst.write(classes[None])
    with rasterio.open(plain, "r+") as dst:
        dst.build_overviews([2, 4])
    problems = cog_problems(plain)
    assert "an IFD comes after image data" in problems and any("come before data of its overview" in p
                                                               for p in problems), problems
    small = tmp_path / "small_tiles.tif"  # what --blocksize 32 would give
    main_predict.write_cog(small, {"width": 128, "height": 96, "count": 1, "dtype": "uint8", "crs": crs,
                                   "transform": transform}, lambda dst: dst.write(classes[None]), "MODE", 32)
    assert cog_problems(small) == ["IFD 1: tiles of 128 x 128 px, the full image's are 32 x 32",
                                   "IFD 2: tiles of 128 x 128 px, the full image's are 32 x 32"]


# --------------------------------------------------------------------------- Web Mercator and band-file scenes
def trained_at(ckpt: Path, out: Path, **data) -> Path:
    """A copy of the segmentation checkpoint ``ckpt`` whose training data config is ``data``."""
    saved = torch.load(ckpt, weights_only=False)
    saved["data"] = dict(data)
    torch.save(saved, out)
    return out


def read_pred(path: Path):
    with rasterio.open(path) as src:
        return src.read(1), src.transform, src.crs, src.nodata


def test_web_mercator_source_is_predicted_on_a_ground_gsd_grid(segmenter, tmp_path):  # noqa: F811
    """A Web Mercator raster (~0.8 m ground pixels at 50 N) and a checkpoint trained at 1.6 m: the class map is on
    the reader's read grid at 1.6 *ground* metres (about 2.5 Mercator metres), nodata stays nodata, and its first
    window's pixels are the model's own forward on the reader's window."""
    from pyproj import Geod, Transformer

    from dataloaders.geotiff import GeoTiffDataset, WindowSpec
    from util.gsd import window_res
    from util.weights import IMAGENET_MEAN, IMAGENET_STD

    model, ckpt = segmenter
    merc = Affine(1.25, 0.0, 1113194.9, 0.0, -1.25, 6446275.8)
    arr = fake_values(3, 128, 128, seed=5, nodata=0, holes=2)
    src = write_tile(tmp_path / "merc.tif", arr, merc, "EPSG:3857", nodata=0)
    typed = trained_at(ckpt, tmp_path / "seg_1p6.pth", target_gsd=1.6, reference_gsd=1.6)
    main_predict.main(main_predict.get_args_parser().parse_args(predict_args(typed, src, tmp_path / "out")))
    pred, transform, crs, nodata = read_pred(tmp_path / "out" / "merc_pred.tif")
    ds = GeoTiffDataset(str(src), window_size=SIZE, target_gsd=1.6, reference_gsd=1.6, scale=3000.0,
                        index_cache=False)
    assert crs.to_epsg() == 3857 and nodata == 255
    assert tuple(transform)[:6] == tuple(ds.tile_index["transform"].iloc[0])[:6]
    assert pred.shape == ds.tile_shapes[0]
    # 1.6 m on the ground, measured on the ellipsoid across the middle pixel of the grid
    to_lonlat = Transformer.from_crs("EPSG:3857", "EPSG:4326", always_xy=True)
    r, c = pred.shape[0] // 2, pred.shape[1] // 2
    corners = [to_lonlat.transform(*(transform @ (c + dc, r + dr))) for dc, dr in ((0, 0), (1, 0), (0, 1))]
    geod = Geod(ellps="WGS84")
    gx = geod.inv(*corners[0], *corners[1])[2]
    gy = geod.inv(*corners[0], *corners[2])[2]
    assert gx == pytest.approx(1.6, rel=1e-2) and gy == pytest.approx(1.6, rel=1e-2)
    assert transform.a == pytest.approx(2.5, rel=0.05)  # Mercator metres, not ground metres
    # nodata: a read-grid pixel is nodata where the reader's mask says so, a class elsewhere
    whole = ds.read_window(WindowSpec(0, 0, 0, *pred.shape))
    valid = whole["mask"].numpy()
    assert (~valid).any() and (pred[~valid] == 255).all() and (pred[valid] < 3).all()
    # the top-left 24 x 24 px are covered by the first window only (stride 24): its own forward
    s = ds.read_window(WindowSpec(0, 0, 0, SIZE, SIZE))
    x = (s["image"] - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    x = torch.where(s["mask"][None], x, torch.zeros(()))
    res = window_res(SIZE, SIZE, 1.0) * s["res"]
    assert s["res"] == pytest.approx(1.0, rel=1e-2)
    with torch.no_grad():
        direct = model(x[None].float(), torch.tensor([res])).argmax(1)[0].numpy()
    own = np.where(s["mask"].numpy(), direct, 255)[:24, :24]
    np.testing.assert_array_equal(pred[:24, :24], own)


def test_band_files_at_10_and_20_m_equal_the_stacked_raster(segmenter, tmp_path):  # noqa: F811
    """A scene of three single-band files (10 m, 20 m, 20 m; a nodata hole in one 20 m band) and a checkpoint
    trained at 10 m: the class map is on the 10 m file's grid and equals the map of the same pixels stacked in one
    10 m file (20 m bands repeated 2 x 2: nearest resampling), nodata included."""
    ckpt = trained_at(segmenter[1], tmp_path / "seg_10m.pth", target_gsd=10.0, reference_gsd=10.0)
    t10 = Affine(10.0, 0.0, 600000.0, 0.0, -10.0, 5000000.0)
    b1 = fake_values(1, 64, 64, seed=6)
    b23 = fake_values(2, 32, 32, seed=7)
    b23[1, 5:9, 20:27] = 0  # a hole (nodata 0) in band 3
    scene = tmp_path / "scenes" / "T1"
    write_tile(scene / "T1_B1.tif", b1, t10, "EPSG:32633", nodata=0)
    write_tile(scene / "T1_B2.tif", b23[:1], t10 @ Affine.scale(2.0), "EPSG:32633", nodata=0)
    write_tile(scene / "T1_B3.tif", b23[1:], t10 @ Affine.scale(2.0), "EPSG:32633", nodata=0)
    stacked = np.concatenate([b1, np.kron(b23, np.ones((1, 2, 2), b23.dtype))])
    write_tile(tmp_path / "T1.tif", stacked, t10, "EPSG:32633", nodata=0)
    common = ("--resampling", "nearest")
    main_predict.main(main_predict.get_args_parser().parse_args(predict_args(
        ckpt, tmp_path / "scenes", tmp_path / "bands", "--band_files", "*_B1.tif", "*_B2.tif", "*_B3.tif",
        "--scene_glob", "*", *common)))
    main_predict.main(main_predict.get_args_parser().parse_args(predict_args(
        ckpt, tmp_path / "T1.tif", tmp_path / "one", *common)))
    bands = read_pred(tmp_path / "bands" / "T1_pred.tif")
    one = read_pred(tmp_path / "one" / "T1_pred.tif")
    assert bands[1] == t10 and bands[2].to_epsg() == 32633 and bands[3] == 255 and bands[0].shape == (64, 64)
    assert bands[1:] == one[1:]
    np.testing.assert_array_equal(bands[0], one[0])
    hole = np.zeros((64, 64), bool)
    hole[10:18, 40:54] = True
    assert (bands[0][hole] == 255).all() and (bands[0][~hole] < 3).all()


# ------------------------------------------------------------------------------------ mosaics: no seams at tile edges
def tiles_of(arr: np.ndarray, folder: Path, rows: list[int], cols: list[int], skip=()) -> dict[str, tuple]:
    """``arr`` cut at ``rows`` x ``cols`` into tiles on its UTM grid: ``{stem: (row0, row1, col0, col1)}``."""
    out = {}
    for i, (r0, r1) in enumerate(zip(rows, rows[1:])):
        for j, (c0, c1) in enumerate(zip(cols, cols[1:])):
            if (i, j) not in skip:
                write_tile(folder / f"t{i}{j}.tif", arr[:, r0:r1, c0:c1], UTM @ Affine.translation(c0, r0),
                           "EPSG:32610")
                out[f"t{i}{j}"] = (r0, r1, c0, c1)
    return out


def test_mosaic_windows_continue_past_edges_with_a_neighbour(tmp_path):
    from inference.tiling import axis_starts, mosaic_margin, neighbour_sides, open_scene

    assert mosaic_margin(32, 24) == 24 and mosaic_margin(32, 32) == 0 and mosaic_margin(32, 8) == 24
    assert axis_starts(72, 32, 24) == [0, 24, 40]  # inside: the last window moved back
    assert axis_starts(72, 32, 24, before=True) == [-24, 0, 24, 40]
    assert axis_starts(72, 32, 24, after=True) == [0, 24, 48]  # on the stride grid, past the end
    assert axis_starts(72, 32, 24, True, True) == [-24, 0, 24, 48]
    assert axis_starts(20, 32, 24, before=True) == [-24, -12] and axis_starts(20, 32, 24, after=True) == [0]
    assert axis_starts(20, 32, 24) == [] and axis_starts(64, 32, 32, True, True) == [0, 32]
    arr = fake_values(1, 40, 60, seed=10)
    three = tiles_of(arr, tmp_path / "three", [0, 20, 40], [0, 30, 60], skip={(1, 1)})
    ds = open_scene(sorted(str(tmp_path / "three" / f"{t}.tif") for t in three), None, 16, mosaic=True)
    sides = {Path(p).stem: neighbour_sides(ds, t) for t, p in enumerate(ds.tile_index["path"])}
    # (top, bottom, left, right): edge lines and corners shared with a missing tile's neighbours do not count
    assert sides == {"t00": (False, True, False, True), "t01": (False, False, True, False),
                     "t10": (True, False, False, False)}
    diagonal = tiles_of(arr, tmp_path / "diagonal", [0, 20, 40], [0, 30, 60], skip={(0, 1), (1, 0)})
    ds = open_scene(sorted(str(tmp_path / "diagonal" / f"{t}.tif") for t in diagonal), None, 16, mosaic=True)
    assert [neighbour_sides(ds, t) for t in range(2)] == [(False,) * 4] * 2


def test_mosaic_tiles_equal_the_whole_raster_cropped(segmenter, tmp_path, monkeypatch):  # noqa: F811
    """A 120 x 144 px raster cut into 2 x 2 tiles on its grid at row 72 and column 72 (multiples of the 24 px
    stride, so the tiles' windows lie on the whole raster's window grid). With --mosaic each tile's blended class
    probabilities equal the whole raster's cropped to the tile, and so do its class map (where the whole map's two
    best classes are not tied) and its georeferencing. Without --mosaic the pixels along the inner tile edges
    differ (their windows stop at the edge), while the pixels whose windows are those of the whole raster agree."""
    from inference.tiling import axis_starts

    arr = fake_values(3, 120, 144, seed=9)
    whole_src = write_tile(tmp_path / "whole.tif", arr, UTM, "EPSG:32610")
    tiles = tiles_of(arr, tmp_path / "tiles", [0, 72, 120], [0, 72, 144])
    blend = main_predict.blend_strip

    def run(source: Path, out: str, *extra: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{stem: (blended probabilities [K, h, w] float32, class map [h, w])}`` of one in-process run."""
        strips: list = []

        def spy(*a, **kw):
            strips.append(blend(*a, **kw))  # one process: each tile's strips in order, tile after tile
            return strips[-1]
        monkeypatch.setattr(main_predict, "blend_strip", spy)
        result = main_predict.main(main_predict.get_args_parser().parse_args(predict_args(
            segmenter[1], source, tmp_path / out, *extra)))
        got = {}
        for path in result["outputs"]:
            with rasterio.open(path) as src:
                pred = src.read(1)
                assert src.crs.to_epsg() == 32610
                stem = Path(path).stem[:-len("_pred")]
                r0, r1, c0, c1 = tiles.get(stem, (0, 120, 0, 144))
                assert src.transform == UTM @ Affine.translation(c0, r0) and pred.shape == (r1 - r0, c1 - c0)
            n = -(-pred.shape[0] // 24)  # strips of one stride
            got[stem] = (np.concatenate([p for p, _ in strips[:n]], axis=1), pred)
            del strips[:n]
        assert not strips
        return got

    whole_probs, whole_pred = run(whole_src, "whole")["whole"]
    top2 = np.sort(whole_probs, axis=0)[-2:]
    clear = top2[1] - top2[0] > 1e-3  # not a tie: the arg-max cannot flip with float noise
    assert clear.mean() > 0.95 and len(np.unique(whole_pred)) == 3
    mosaic = run(tmp_path / "tiles", "mosaic", "--mosaic")
    plain = run(tmp_path / "tiles", "plain")
    assert sorted(mosaic) == sorted(plain) == sorted(tiles)
    edge_differs = []
    for stem, (r0, r1, c0, c1) in tiles.items():
        crop = whole_probs[:, r0:r1, c0:c1]
        np.testing.assert_allclose(mosaic[stem][0], crop, rtol=0, atol=1e-5)
        ok = clear[r0:r1, c0:c1]
        np.testing.assert_array_equal(mosaic[stem][1][ok], whole_pred[r0:r1, c0:c1][ok])
        # without --mosaic: equal where each axis has the whole raster's windows, different along inner edges
        same = [np.array([{s + o for s in axis_starts(n, 32, 24) if s <= i - o < s + 32}
                          == {s for s in axis_starts(total, 32, 24) if s <= i < s + 32} for i in range(o, o + n)])
                for o, n, total in ((r0, r1 - r0, 120), (c0, c1 - c0, 144))]
        coincide = same[0][:, None] & same[1][None, :]
        assert coincide.any() and not coincide.all()
        np.testing.assert_allclose(plain[stem][0][:, coincide], crop[:, coincide], rtol=0, atol=1e-5)
        inner = np.zeros(crop.shape[1:], bool)  # the row / column next to each edge shared with another tile
        inner[-1 if r0 == 0 else 0, :] = True
        inner[:, -1 if c0 == 0 else 0] = True
        edge_differs.append(np.abs(plain[stem][0] - crop)[:, inner].max())
    assert min(edge_differs) > 0.01, edge_differs


# ------------------------------------------------------------------------------------------- refused runs
def test_a_raster_of_another_dtype_than_the_training_data_is_refused(segmenter, tmp_path, capsys):  # noqa: F811
    rgb8 = write_tile(tmp_path / "rgb8.tif", (fake_values(3, 64, 64, seed=8) // 12).astype(np.uint8), UTM,
                      "EPSG:32610")
    for where in ("data", "args"):  # the data config or the saved args record it (any depth)
        saved = torch.load(segmenter[1], weights_only=False)
        if where == "data":
            saved["data"] = {"target_gsd": 1.0, "raster_dtype": "uint16"}
        else:
            saved["args"] = {**saved["args"], "data": {"raster_dtype": "uint16"}}
        ckpt = tmp_path / f"typed_{where}.pth"
        torch.save(saved, ckpt)
        out = tmp_path / f"out_{where}"
        line = one_error_line(capsys, main_predict.main, main_predict.get_args_parser(),
                              predict_args(ckpt, rgb8, out))
        assert "pixels of dtype uint8, but the checkpoint was trained on uint16 rasters" in line, line
        assert not out.exists()
    # the dtype it records: predicted
    saved["args"]["data"]["raster_dtype"] = "uint8"
    torch.save(saved, tmp_path / "uint8.pth")
    main_predict.main(main_predict.get_args_parser().parse_args(predict_args(tmp_path / "uint8.pth", rgb8,
                                                                             tmp_path / "ok")))
    assert (tmp_path / "ok" / "rgb8_pred.tif").is_file()


def test_main_segment_predict_names_the_main_predict_command(tmp_path, capsys):
    import main_segment

    argv = ["--predict", "scene one.tif", "tiles/*.tif", "--resume", "ckpt.pth", "--output_dir",
            str(tmp_path / "preds"), "--probabilities"]
    line = one_error_line(capsys, main_segment.main, main_segment.get_args_parser(), argv)
    command = line.split("sibling launcher: ", 1)[1]
    assert command == (f"python main_predict.py --input 'scene one.tif' 'tiles/*.tif' --resume ckpt.pth "
                       f"--output_dir {tmp_path / 'preds'} --probabilities")
    parsed = main_predict.get_args_parser().parse_args(shlex.split(command)[2:])  # a valid main_predict command
    assert parsed.input == ["scene one.tif", "tiles/*.tif"] and parsed.resume == "ckpt.pth" and parsed.probabilities
    assert not (tmp_path / "preds").exists()
    line = one_error_line(capsys, main_segment.main, main_segment.get_args_parser(),
                          ["--resume", "c.pth", "--predict", "a.tif"])  # flags before --predict, placeholders
    assert line.endswith("python main_predict.py --input a.tif --resume c.pth --output_dir OUTPUT_DIR"), line
