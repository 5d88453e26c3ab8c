"""Segmentation data: polygons (EPSG:4326) rasterised on UTM windows, ignore pixels, holes and multipolygons,
mask pairs, configs, the synthetic building scenes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dataloaders.config import ConfigError, load_seg_config
from dataloaders.errors import DataError, MissingDataError
from dataloaders.seg_labels import VectorLabels
from dataloaders.seg_sources import GeoVectorSource, MaskPairSource
from dataloaders.segmentation import SegmentationDataset, TileShardSampler, grid_windows, seg_collate

UTM = "EPSG:32633"
X0, Y0 = 500000.0, 5000000.0  # top-left corner of the 10 x 10 px, 1 m raster


def px_box(c0, r0, c1, r1):
    """A rectangle given in (fractional) pixel offsets of the test raster, in UTM metres."""
    from shapely.geometry import box

    return box(X0 + c0, Y0 - r1, X0 + c1, Y0 - r0)


def labels_4326(geoms, tmp_path, name="labels.geojson", **columns):
    import geopandas as gpd

    gdf = gpd.GeoDataFrame(columns, geometry=list(geoms), crs=UTM).to_crs("EPSG:4326")
    path = tmp_path / name
    path.write_text(gdf.to_json())
    return path


def utm_raster(tmp_path, nodata_row=None):
    from affine import Affine

    from dataloaders.geotiff import GeoTiffDataset
    from dataloaders.synthetic import write_geotiff

    data = np.full((1, 10, 10), 100, dtype=np.uint8)
    if nodata_row is not None:
        data[:, nodata_row] = 0
    path = write_geotiff(tmp_path / "r.tif", data, Affine(1.0, 0, X0, 0, -1.0, Y0), UTM, nodata=0, dtype="uint8")
    return GeoTiffDataset(path, window_size=1)


def burn(tmp_path, geoms, all_touched=False, window=(0, 0, 10, 10), columns=None, **labels_kw):
    labels = VectorLabels(labels_4326(geoms, tmp_path, **(columns or {})), **labels_kw)
    src = GeoVectorSource(utm_raster(tmp_path), labels, all_touched)
    return src.read(0, *window)[2]


def test_rectangle_in_4326_over_utm_raster(tmp_path):
    # x 2.25..5.25 px, y 3.25..7.25 px: centres of cols 2-4 and rows 3-6 inside -> 3 x 4 = 12 px;
    # touched: cols 2-5, rows 3-7 -> 4 x 5 = 20 px
    rect = px_box(2.25, 3.25, 5.25, 7.25)
    centre = burn(tmp_path, [rect])
    assert centre.sum() == 12 and centre[3:7, 2:5].all()
    touched = burn(tmp_path, [rect], all_touched=True)
    assert touched.sum() == 20 and touched[3:8, 2:6].all()
    # a window of the same raster: the window transform puts the same pixels in place
    part = burn(tmp_path, [rect], window=(2, 1, 6, 6))
    assert np.array_equal(part, centre[2:8, 1:7])


def test_holes_and_multipolygons(tmp_path):
    from shapely.geometry import MultiPolygon, Polygon

    outer = px_box(0.25, 0.25, 8.25, 8.25)
    hole = px_box(3.25, 3.25, 5.25, 5.25)
    donut = Polygon(outer.exterior.coords, [hole.exterior.coords])
    mask = burn(tmp_path, [donut])
    assert mask.sum() == 64 - 4 and mask[3:5, 3:5].sum() == 0
    multi = MultiPolygon([px_box(0.25, 0.25, 2.25, 2.25), px_box(6.25, 6.25, 9.25, 9.25)])
    mask = burn(tmp_path, [multi])
    assert mask.sum() == 4 + 9 and mask[:2, :2].all() and mask[6:9, 6:9].all()


def test_class_column_and_overlap_order(tmp_path):
    a, b = px_box(0.25, 0.25, 4.25, 4.25), px_box(2.25, 2.25, 6.25, 6.25)
    mask = burn(tmp_path, [a, b], classes=["house", "shed"], class_column="kind",
                columns={"kind": ["house", "shed"]})
    assert (mask == 1).sum() == 16 - 4 and (mask == 2).sum() == 16  # the later polygon wins the overlap
    with pytest.raises(DataError, match="not in data.classes"):
        VectorLabels(labels_4326([a], tmp_path, kind=["garage"]), classes=["house"], class_column="kind")
    with pytest.raises(DataError, match="no column 'typ'"):
        VectorLabels(labels_4326([a], tmp_path, kind=["house"]), classes=["house"], class_column="typ")
    with pytest.raises(MissingDataError):
        VectorLabels(tmp_path / "nope.gpkg")


def test_nodata_pixels_are_ignored(tmp_path):
    rect = px_box(2.25, 3.25, 5.25, 7.25)
    geo = utm_raster(tmp_path, nodata_row=4)
    src = GeoVectorSource(geo, VectorLabels(labels_4326([rect], tmp_path)))
    ds = SegmentationDataset(src, mean=[100 / 255], std=[0.1], size=10, ignore_index=255)
    sample = ds[0]
    mask = sample["mask"]
    assert (mask == 255).sum() == 10 and (mask[4] == 255).all()
    assert (mask == 1).sum() == 12 - 3
    assert sample["image"][0, 4].abs().sum() == 0  # invalid pixels are set to the mean (0 after normalising)
    assert sample["crs"] == UTM and sample["transform"] == (1.0, 0.0, X0, 0.0, -1.0, Y0)


def test_grid_windows_cover_tiles_and_shard_by_tile():
    wins = grid_windows([(10, 25), (5, 5)], 8)
    first = [w for w in wins if w.tile == 0]
    assert {(w.row, w.col) for w in first} == {(r, c) for r in (0, 2) for c in (0, 8, 16, 17)}
    assert [(w.row, w.col) for w in wins if w.tile == 1] == [(0, 0)]
    s0, s1 = TileShardSampler(wins, 2, 0), TileShardSampler(wins, 2, 1)
    assert sorted(list(s0) + list(s1)) == list(range(len(wins)))
    assert {wins[i].tile for i in s1} == {1}


def test_mask_pairs_and_padding(tmp_path):
    from PIL import Image

    (tmp_path / "img").mkdir()
    (tmp_path / "msk").mkdir()
    img = np.zeros((6, 6, 3), dtype=np.uint8)
    img[1:3, 1:4] = 200
    mask = np.zeros((6, 6), dtype=np.uint8)
    mask[1:3, 1:4] = 255
    mask[5, 5] = 7  # not a listed value -> ignored
    Image.fromarray(img).save(tmp_path / "img" / "a.png")
    Image.fromarray(mask).save(tmp_path / "msk" / "a.png")
    src = MaskPairSource(tmp_path / "img", tmp_path / "msk", num_classes=2, scale=255.0, mask_values=[0, 255])
    ds = SegmentationDataset(src, mean=[0.5] * 3, std=[0.5] * 3, size=8)
    sample = seg_collate([ds[0]])
    m = sample["mask"][0]
    assert m.shape == (8, 8) and (m == 1).sum() == 6 and m[5, 5] == 255
    assert (m[6:] == 255).all() and (m[:, 6:] == 255).all()  # padding is ignored
    assert sample["image"].shape == (1, 3, 8, 8) and sample["res"].tolist() == [1.0]
    Image.fromarray(mask).save(tmp_path / "msk" / "b_other.png")
    Image.fromarray(img).save(tmp_path / "img" / "b.png")
    with pytest.raises(DataError, match="no mask for image"):
        MaskPairSource(tmp_path / "img", tmp_path / "msk", num_classes=2)


def test_seg_config_validation(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  type: geotiff\n  img_dir: t\n  val_img_dir: v\n  labels: b.geojson\n"
                   "  mean: [0.5]\n  std: [0.2]\n")
    d = load_seg_config(cfg)["data"]
    assert d["val_labels"] == d["labels"] == str(tmp_path / "b.geojson")
    assert d["classes"] == ["building"] and d["ignore_index"] == 255 and d["all_touched"] is False
    assert load_seg_config(cfg, overrides=["data.all_touched=true"])["data"]["all_touched"] is True
    with pytest.raises(ConfigError, match="override 'data.colour=1': unknown key"):
        load_seg_config(cfg, overrides=["data.colour=1"])
    cfg.write_text(cfg.read_text() + "  colour: red\n")
    with pytest.raises(ConfigError, match="data.colour: unknown key"):
        load_seg_config(cfg)
    cfg.write_text("data:\n  type: masks\n  img_dir: t\n  val_img_dir: v\n  mean: [0.5]\n  std: [0.2]\n")
    with pytest.raises(ConfigError, match="data.mask_dir: required"):
        load_seg_config(cfg)
    with pytest.raises(ConfigError, match="data.all_touched: not valid for type 'masks'"):
        load_seg_config(cfg, overrides=["data.all_touched=true"])


@pytest.mark.parametrize("extra, override, needle", [
    ("  colour: red\n", None, "data.colour: unknown key; allowed keys: "),
    ("  size: ten\n", None, "data.size: expected an integer, got 'ten' (str)"),
    ("  std: [0.2, 0.2]\n", None, "data.std: expected 1 values (as many as data.mean), got 2"),
    ("  bands: [0]\n", None, "data.bands: expected 1-based band indexes (>= 1), got [0]"),
    ("  scale: 0\n", None, "data.scale: expected a positive number, got 0.0"),
    ("  mean: [120.0]\n  scale: 255\n", None, "data.mean: [120.0] look like 0-255 units"),
    ("", "data.size=[1, 2", "override 'data.size=[1, 2': value is not valid YAML"),
    ("", "data.colour=1", "override 'data.colour=1': unknown key data.colour; allowed keys: "),
])
def test_seg_and_dataset_configs_share_one_parser_and_its_messages(tmp_path, extra, override, needle):
    """The same fault in a segmentation config and in a GeoTIFF dataset config: the same check, the same line."""
    from dataloaders.config import load_config

    seg, geo = tmp_path / "seg.yaml", tmp_path / "geo.yaml"
    seg.write_text("data:\n  type: geotiff\n  img_dir: t\n  val_img_dir: v\n  labels: b.geojson\n  mean: [0.5]\n"
                   "  std: [0.2]\n" + extra)
    geo.write_text("data:\n  type: geotiff\n  img_dir: t\n  mean: [0.5]\n  std: [0.2]\n" + extra)
    overrides = [override] if override else None
    for path, load in ((seg, load_seg_config), (geo, load_config)):
        with pytest.raises(ConfigError) as err:
            load(path, overrides=overrides)
        assert str(err.value).startswith(f"{path}: ") and needle in str(err.value), str(err.value)


def test_seg_schema_type_and_class_names(tmp_path):
    cfg = tmp_path / "c.yaml"
    body = "data:\n  type: {}\n  img_dir: t\n  val_img_dir: v\n  labels: b.geojson\n  mean: [0.5]\n  std: [0.2]\n"
    cfg.write_text(body.format("fmow"))
    with pytest.raises(ConfigError, match=r"data.type: expected one of geotiff, masks \(case-insensitive\), "
                                          r"got 'fmow'"):
        load_seg_config(cfg)
    cfg.write_text(body.format("GeoTIFF") + "  classes: roof\n")
    assert load_seg_config(cfg)["data"]["classes"] == ["roof"]  # one name is a list of one class
    with pytest.raises(ConfigError, match="data.classes: expected a non-empty list of class names"):
        load_seg_config(cfg, overrides=["data.classes=[]"])


def test_synthetic_scenes_labels_match_the_drawn_roofs(tmp_path):
    from dataloaders.seg_synthetic import make_building_scenes
    from dataloaders.segmentation import build_seg_datasets

    out = make_building_scenes(tmp_path, n_train=2, n_val=1, size=64)
    cfg = load_seg_config(out["config"])
    train, val, classes = build_seg_datasets(cfg, input_size=64)
    assert classes == ["background", "building"]
    # the label rasterised from the EPSG:4326 polygons equals the drawn mask (boxes on pixel edges: allow
    # a few edge pixels that the round trip through degrees can move)
    for i in range(len(val)):
        s = val[i]
        truth = torch.from_numpy(out["masks"][s["path"]].astype(np.int64))
        assert (s["mask"] != truth).sum() <= 0.01 * truth.numel()
    sampler = train.make_sampler(seed=0)
    batch = seg_collate([train[w] for w in list(sampler)[:4]])
    assert batch["image"].shape == (4, 3, 64, 64) and batch["mask"].dtype == torch.int64
    assert set(batch["mask"].unique().tolist()) <= {0, 1, 255}
    # res = base_resolution * window / input * ground gsd / reference_gsd (0.5 m pixels, reference 0.5 m)
    assert torch.allclose(batch["res"], torch.ones(4), atol=2e-3)
    half = build_seg_datasets(load_seg_config(out["config"], overrides=["data.reference_gsd=0.25"]), input_size=32)[0]
    assert half[list(sampler)[0]]["res"] == pytest.approx(2 * 2.0, rel=2e-3)  # 64 px shown at 32 px, 2x gsd


def test_label_folder_spacenet_style(tmp_path):
    """One GeoJSON per tile (some empty, as SpaceNet ships them), read as one label set."""
    import geopandas as gpd

    folder = tmp_path / "geojson"
    folder.mkdir()
    labels_4326([px_box(2.25, 3.25, 5.25, 7.25)], tmp_path, name="geojson/a.geojson")
    labels_4326([px_box(6.25, 6.25, 9.25, 9.25)], tmp_path, name="geojson/b.geojson")
    (folder / "empty.geojson").write_text(gpd.GeoDataFrame(geometry=[], crs="EPSG:4326").to_json())
    labels = VectorLabels(folder)
    assert len(labels) == 2
    src = GeoVectorSource(utm_raster(tmp_path), labels)
    assert src.read(0, 0, 0, 10, 10)[2].sum() == 12 + 9


@pytest.mark.parametrize("name", ["seg_spacenet.yaml", "seg_masks.yaml"])
def test_shipped_seg_configs_validate(name, tmp_path):
    from pathlib import Path

    cfg = load_seg_config(Path(__file__).resolve().parent.parent / "config" / name, data_root=tmp_path)
    assert cfg["data"]["img_dir"] == str(tmp_path / "train" / "images")


def test_crop_scale_augmentation_scales_res_and_keeps_labels_aligned(tmp_path):
    """A bright square and its label, cropped and resized together; res follows the crop side."""
    from affine import Affine

    from dataloaders.geotiff import GeoTiffDataset
    from dataloaders.synthetic import write_geotiff

    data = np.full((1, 32, 32), 10, dtype=np.uint8)
    data[:, 8:24, 8:24] = 250
    path = write_geotiff(tmp_path / "sq.tif", data, Affine(1.0, 0, X0, 0, -1.0, Y0), UTM, dtype="uint8")
    labels = VectorLabels(labels_4326([px_box(8, 8, 24, 24)], tmp_path))
    src = GeoVectorSource(GeoTiffDataset(path, window_size=1), labels)
    ds = SegmentationDataset(src, mean=[0.5], std=[0.5], size=32, input_size=16, train=True, length=8,
                             crop_scale=(0.5, 0.5))
    from dataloaders.geo_sampler import WindowSpec

    sample = ds[WindowSpec(0, 0, 0, 32, 32)]
    assert sample["image"].shape == (1, 16, 16) and sample["res"] == pytest.approx(1.0)  # 16 px crop at 16 px
    bright = sample["image"][0] > (130 - 0.5) / 0.5  # roof 250, ground 10 (no scale), mid-grey threshold
    assert torch.equal(bright, sample["mask"] == 1)
    full = SegmentationDataset(src, mean=[0.5], std=[0.5], size=32, input_size=16, train=True, length=8)
    assert full[WindowSpec(0, 0, 0, 32, 32)]["res"] == pytest.approx(2.0)  # the whole 32 px window at 16 px
    with pytest.raises(ValueError, match="crop_scale"):
        SegmentationDataset(src, mean=[0.5], std=[0.5], size=32, crop_scale=(0.5, 1.5))


# ------------------------------------------------------------------ the GeoTIFF reader's options in seg configs
def seg_config(tmp_path, geoms, **keys):
    """A geotiff segmentation config over ``tmp_path/tiles`` (train = val) with polygons given in UTM metres."""
    import yaml

    labels_4326(geoms, tmp_path)
    data = {"type": "geotiff", "img_dir": "tiles", "val_img_dir": "tiles", "labels": "labels.geojson",
            "mean": [0.0], "std": [1.0], "size": 16, "length": 4, **keys}
    path = tmp_path / "seg.yaml"
    path.write_text(yaml.safe_dump({"data": data}))
    return load_seg_config(path)


def square_tile(tmp_path, name, shape, square, value=250, x0=X0, bands=1):
    """A 1 m UTM tile (top-left at ``x0``, Y0) of 10s with a bright ``square`` (r0, c0, r1, c1) of ``value``."""
    from affine import Affine

    from dataloaders.synthetic import write_geotiff

    data = np.full((bands,) + tuple(shape), 10, dtype=np.uint8)
    r0, c0, r1, c1 = square
    data[:, r0:r1, c0:c1] = value
    (tmp_path / "tiles").mkdir(exist_ok=True)
    return write_geotiff(tmp_path / "tiles" / name, data, Affine(1.0, 0, x0, 0, -1.0, Y0), UTM, nodata=0,
                         dtype="uint8")


def test_seg_config_takes_the_geotiff_keys_with_their_checks(tmp_path):
    cfg = seg_config(tmp_path, [], crs="EPSG:32632", target_gsd=2, resampling="nearest", mosaic=True,
                     gsd_range=[1, 4], nodata=[0], nodata_mode="all", index_cache=False)["data"]
    assert (cfg["crs"], cfg["target_gsd"], cfg["resampling"], cfg["mosaic"], cfg["gsd_range"], cfg["nodata"],
            cfg["nodata_mode"], cfg["index_cache"]) == ("EPSG:32632", 2.0, "nearest", True, [1.0, 4.0], [0.0],
                                                          "all", False)
    for keys, message in (({"gsd_range": [4, 1]}, r"data.gsd_range: expected \[min, max\]"),
                          ({"resampling": "sharpest"}, "data.resampling: expected one of"),
                          ({"crs": "EPSG:999999"}, "data.crs: not a CRS"),
                          ({"nodata": [0, 0]}, "data.nodata: expected one value or 1"),
                          ({"band_files": ["*_B1.tif"], "glob": "*.tif"}, "data.glob: not valid together with "
                                                                         "data.band_files"),
                          ({"mosaic": "yes"}, "data.mosaic: expected true or false")):
        with pytest.raises(ConfigError, match=message):
            seg_config(tmp_path, [], **keys)
    (tmp_path / "m.yaml").write_text("data:\n  type: masks\n  img_dir: t\n  mask_dir: m\n  val_img_dir: t\n"
                                     "  val_mask_dir: m\n  mean: [0.5]\n  std: [0.2]\n  crs: EPSG:4326\n")
    with pytest.raises(ConfigError, match="data.crs: not valid for type 'masks'"):
        load_seg_config(tmp_path / "m.yaml")


def test_labels_follow_a_crs_reprojection(tmp_path):
    """A 1 m tile of UTM 33N read in UTM 32N (rotated ~3 degrees, 2 m cells): the burnt square sits on the warped
    bright square, in the read CRS, and res follows the read GSD."""
    from dataloaders.segmentation import build_seg_datasets

    square_tile(tmp_path, "a.tif", (64, 64), (20, 20, 44, 44))
    cfg = seg_config(tmp_path, [px_box(20, 20, 44, 44)], crs="EPSG:32632", target_gsd=2.0, resampling="nearest",
                     size=32, reference_gsd=1.0)
    train, val, _ = build_seg_datasets(cfg, input_size=32)
    sample = val[0]
    assert sample["crs"] == "EPSG:32632" and sample["transform"][0] == pytest.approx(2.0)
    bright, label = sample["image"][0] > 130, sample["mask"] == 1
    assert 100 <= int(label.sum()) <= 188  # 12 x 12 cells of 2 m, up to a rotated edge more or less
    assert int((bright != label).sum()) <= 30  # only rotated edge pixels may differ
    assert int((label & ~bright).sum()) <= 15 and int((bright & ~label).sum()) <= 15
    assert sample["res"] == pytest.approx(2.0, rel=0.01)  # 2 m cells, reference_gsd 1 m


def test_labels_follow_a_gsd_range_decimated_read(tmp_path):
    """gsd_range [2g, 2g] on a 1 m (g metres on the ground) two-band scene (band_files): a 16 px
    window covers 32 m, read decimated; the burnt square is the decimated bright square pixel for pixel and res doubles."""
    from dataloaders.geo_sampler import WindowSpec
    from dataloaders.segmentation import build_seg_datasets

    for band in (1, 2):
        square_tile(tmp_path, f"s_B{band}.tif", (64, 64), (16, 16, 32, 32), value=200 + band)
    geoms = [px_box(16, 16, 32, 32)]
    keys = dict(reference_gsd=1.0, band_files=["*_B1.tif", "*_B2.tif"], mean=[0.0, 0.0], std=[1.0, 1.0])
    native = build_seg_datasets(seg_config(tmp_path, geoms, **keys), input_size=16)[0].source.geo._gsd[0]
    assert native == pytest.approx(1.0 / 0.9996)  # ground metres of a 1 m cell on the central meridian
    cfg = seg_config(tmp_path, geoms, gsd_range=[2 * native, 2 * native], **keys)  # read at 2 x the tile's GSD
    train, val, _ = build_seg_datasets(cfg, input_size=16)
    # centre (24, 24): the read covers rows/cols 8..40 (the expected mask is symmetric: random flips keep it)
    sample = train[WindowSpec(0, 16, 16, 16, 16)]
    assert sample["transform"][0] == pytest.approx(2.0) and sample["transform"][2] == pytest.approx(X0 + 8)
    expected = torch.zeros(16, 16, dtype=torch.long)
    expected[4:12, 4:12] = 1
    assert torch.equal(sample["mask"], expected)
    assert torch.equal(sample["image"][0] > 100, expected == 1) and torch.equal(sample["image"][1] > 100,
                                                                                expected == 1)
    assert sample["res"] == pytest.approx(2.0, rel=0.01)
    # evaluation reads the tiles on their own 1 m grid (the engine rescales windows itself): window (16, 16) is the
    # square exactly
    plain = val[[tuple(w)[1:3] for w in val.windows].index((16, 16))]
    assert plain["res"] == pytest.approx(1.0, rel=0.01) and plain["transform"][0] == 1.0
    assert bool((plain["mask"] == 1).all()) and bool((plain["image"] > 100).all())


def test_mosaic_window_gets_labels_from_both_tiles(tmp_path):
    """Two 16 px tiles side by side; a mosaic window straddling them reads both and burns both tiles' polygons."""
    from dataloaders.geo_sampler import WindowSpec
    from dataloaders.segmentation import build_seg_datasets, seg_collate

    square_tile(tmp_path, "a.tif", (16, 16), (4, 10, 8, 14), value=100)
    square_tile(tmp_path, "b.tif", (16, 16), (4, 2, 8, 6), value=200, x0=X0 + 16)
    cfg = seg_config(tmp_path, [px_box(10, 4, 14, 8), px_box(18, 4, 22, 8)], mosaic=True, size=16)
    train, _, _ = build_seg_datasets(cfg, input_size=16)
    tile_a = [str(p) for p in train.source.paths].index(str(tmp_path / "tiles" / "a.tif"))
    # columns 8..24: half in a, half in b; rows 2..18 (the source read: no training flips)
    image, valid, label, meta = train.source.read(tile_a, 2, 8, 16, 16)
    mask = torch.from_numpy(np.where(valid, label, 255).astype(np.int64))
    image = torch.from_numpy(image[0])
    expected = torch.zeros(16, 16, dtype=torch.long)
    expected[2:6, 2:6] = 1   # a's square (cols 10..14)
    expected[2:6, 10:14] = 1  # b's square (global cols 18..22)
    expected[14:] = 255  # rows 16..18 lie below both tiles: outside the collection -> ignored
    assert torch.equal(mask, expected)
    assert (image[2:6, 2:6] == 100).all() and (image[2:6, 10:14] == 200).all()
    sample = train[WindowSpec(tile_a, 2, 8, 16, 16)]  # the dataset keeps the whole window (flipped at random)
    assert sample["height"] == sample["width"] == 16 and int((sample["mask"] == 1).sum()) == 32
    assert int((sample["mask"] == 255).sum()) == 32
    # the sampler of a mosaic config draws windows that may cross tile edges; they come back whole
    windows = list(train.make_sampler(seed=0))
    batch = seg_collate([train[w] for w in windows])
    assert batch["mask"].shape == (4, 16, 16)
