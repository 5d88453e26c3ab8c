"""Bad input gives a clear error naming the culprit (file, and expected vs got where it applies)."""
import numpy as np
import pytest
from affine import Affine
from PIL import Image
from torch.utils.data import DataLoader

from dataloaders.builders import build_eval_datasets, build_pretrain_dataset
from dataloaders.errors import DataError, MissingDataError
from dataloaders.geotiff import GeoTiffDataset, WindowSpec, build_tile_index
from dataloaders.scenes import SceneDataset, load_pil_rgb, load_tensor_rgb
from dataloaders.synthetic import make_geotiff_folder, make_scene_folder, write_geotiff

RGB = {"mean": [0.5] * 3, "std": [0.2] * 3}


def test_missing_folder(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(MissingDataError) as err:
        build_pretrain_dataset({"data": {"type": "fmow", "img_dir": str(missing), **RGB}}, input_size=8)
    assert str(missing) in str(err.value) and "data.img_dir" in str(err.value)
    with pytest.raises(FileNotFoundError, match="nope"):
        build_eval_datasets("resisc", eval_path=missing)
    with pytest.raises(MissingDataError, match="nope"):
        GeoTiffDataset(missing)


def test_empty_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no class sub-folders"):
        build_pretrain_dataset({"data": {"type": "resisc", "img_dir": str(tmp_path / "empty"), **RGB}})
    (tmp_path / "noimg" / "classA").mkdir(parents=True)
    (tmp_path / "noimg" / "classA" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"noimg: no images"):
        build_eval_datasets("resisc", eval_path=tmp_path / "noimg")
    with pytest.raises(DataError, match=r"empty: no raster files"):
        GeoTiffDataset(tmp_path / "empty")
    (tmp_path / "list.txt").write_text("\n# nothing\n")
    with pytest.raises(DataError, match=r"list.txt: split list is empty"):
        build_eval_datasets("resisc", tmp_path / "list.txt", tmp_path / "list.txt")


@pytest.mark.parametrize("ext", ["jpg", "png"])
@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_corrupt_images_name_the_file(tmp_path, ext, kind):
    make_scene_folder(tmp_path, num_classes=1, per_class=2, size=32, ext=ext)
    bad = tmp_path / "class_00" / f"img_0001.{ext}"
    data = bad.read_bytes()
    bad.write_bytes(b"not an image at all" * 4 if kind == "garbage" else data[: len(data) // 2])
    for loader in (load_pil_rgb, load_tensor_rgb):
        with pytest.raises(DataError, match=f"img_0001.{ext}: cannot decode image"):
            loader(bad)
    assert load_tensor_rgb(tmp_path / "class_00" / f"img_0000.{ext}").shape == (3, 32, 32)


def test_corrupt_image_error_crosses_the_worker_boundary(tmp_path):
    make_scene_folder(tmp_path, num_classes=1, per_class=2, size=32, ext="jpg")
    (tmp_path / "class_00" / "img_0001.jpg").write_bytes(b"\xff\xd8\xff broken")
    ds = build_pretrain_dataset({"data": {"type": "resisc", "img_dir": str(tmp_path), **RGB}}, input_size=8)
    it = iter(DataLoader(ds, batch_size=2, num_workers=1))
    message, kind = "", None
    try:
        next(it)
    except Exception as exc:  # re-raised in the main process by the DataLoader
        message, kind = str(exc), type(exc)
    finally:
        if hasattr(it, "_shutdown_workers"):  # the error's traceback cycle keeps the iterator alive; without
            it._shutdown_workers()  # this, garbage collection later waits ~5 s for the idle worker
    assert kind is DataError and "img_0001.jpg: cannot decode image" in message


def test_missing_image_file(tmp_path):
    ds = SceneDataset([(str(tmp_path / "a" / "gone.png"), "a")], {"a": 0})
    with pytest.raises(MissingDataError, match="gone.png: image file not found"):
        ds[0]


def test_corrupt_geotiff_names_the_file(tmp_path):
    make_geotiff_folder(tmp_path, n=2, size=32)
    (tmp_path / "tile_001.tif").write_bytes(b"II*\x00garbage" * 10)
    with pytest.raises(DataError, match="tile_001.tif: not a readable raster"):
        build_tile_index(tmp_path)


def test_truncated_geotiff_names_the_file(tmp_path):
    make_geotiff_folder(tmp_path, n=1, size=64)
    path = tmp_path / "tile_000.tif"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])
    with pytest.raises(DataError, match="tile_000.tif: raster data cannot be read"):
        GeoTiffDataset(tmp_path, window_size=16)
    ds = GeoTiffDataset(tmp_path, window_size=16, verify=False)  # header is fine, data is not
    with pytest.raises(DataError, match="tile_000.tif: failed to read window"):
        ds[WindowSpec(0, 48, 0, 16, 16)]


def test_wrong_band_count(tmp_path):
    make_geotiff_folder(tmp_path / "four", n=1, bands=4, size=32)
    cfg = {"data": {"type": "geotiff", "img_dir": str(tmp_path / "four"), **RGB}}
    with pytest.raises(DataError, match=r"tile_000.tif: expected 3 band\(s\) \(as many as data.mean/std\), got 4"):
        build_pretrain_dataset(cfg, input_size=8)
    cfg6 = {"data": {"type": "geotiff", "img_dir": str(tmp_path / "four"), "bands": [1, 2, 3, 4, 5, 6],
                     "mean": [0.0] * 6, "std": [1.0] * 6}}
    with pytest.raises(DataError, match=r"tile_000.tif: has 4 band\(s\) but data.bands=\[1, 2, 3, 4, 5, 6\]"):
        build_pretrain_dataset(cfg6, input_size=8)
    make_geotiff_folder(tmp_path / "mixed", n=1, bands=3, size=32)
    write_geotiff(tmp_path / "mixed" / "z_odd.tif", np.ones((2, 32, 32), np.uint16), Affine(1, 0, 100, 0, -1, 200),
                  "EPSG:32610")
    with pytest.raises(DataError, match=r"z_odd.tif: has 2 band\(s\) but .*tile_000.tif has 3"):
        build_tile_index(tmp_path / "mixed")


def test_geotiff_without_crs_or_geotransform(tmp_path):
    arr = np.ones((1, 16, 16), np.uint8)
    write_geotiff(tmp_path / "nocrs.tif", arr, Affine(1, 0, 100, 0, -1, 200), None)
    with pytest.raises(DataError, match="nocrs.tif: no CRS"):
        build_tile_index(tmp_path / "nocrs.tif")
    Image.fromarray(arr[0]).save(tmp_path / "plain.tif")
    with pytest.raises(DataError, match="plain.tif: no geotransform"):
        build_tile_index(tmp_path / "plain.tif")


def test_window_larger_than_every_tile(tmp_path):
    make_geotiff_folder(tmp_path, n=1, size=32)
    with pytest.raises(DataError, match="64x64 px window"):
        GeoTiffDataset(tmp_path, window_size=64).make_sampler(length=4)
