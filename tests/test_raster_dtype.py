"""Training runs record the pixel dtype of their rasters (``raster_dtype``) and inference refuses rasters of another
dtype (issue 20, "dtype not matching the checkpoint's training config"): what each dataset kind reads, a real
main_pretrain.py / main_segment.py run recording it, main_embed.py refusing (one line, exit 2, nothing written),
``--ignore_dtype``, and old checkpoints without the key (no check)."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from affine import Affine

import harness
import main_embed
from tests.cli import one_error_line
from tests.raster_reference import fake_values, write_tile

REPO = Path(__file__).resolve().parents[1]
UTM = Affine(1.0, 0.0, 500000.0, 0.0, -1.0, 4200000.0)


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------ what datasets read
def test_pixel_dtypes_of_each_dataset_kind_and_mixed_rasters_record_none(tmp_path, capsys):
    from torch.utils.data import DataLoader

    from dataloaders.geotiff import GeoTiffDataset
    from dataloaders.pixel_dtype import pixel_dtypes
    from dataloaders.seeding import SeededDataset
    from dataloaders.seg_sources import MaskPairSource
    from dataloaders.synthetic import DemoScenes, make_geotiff_folder

    make_geotiff_folder(tmp_path / "u16", n=2, size=32, dtype="uint16")
    u16 = GeoTiffDataset(str(tmp_path / "u16"), window_size=16, index_cache=False)
    assert pixel_dtypes(u16) == ["uint16"]
    assert pixel_dtypes(DataLoader(SeededDataset(u16, 0))) == ["uint16"]  # through the launchers' wrappers
    assert pixel_dtypes(DemoScenes(4, 16, 2)) == ["uint8"]  # image folders: decoded to 8-bit RGB
    assert pixel_dtypes(object()) == []  # a dataset that tells nothing: nothing recorded

    pairs = tmp_path / "pairs"  # image/mask pairs: the dtype of the images as read (a float32 TIFF here)
    write_tile(pairs / "img" / "a.tif", fake_values(3, 16, 16, seed=0, dtype="float32"), UTM, "EPSG:32610")
    write_tile(pairs / "mask" / "a.tif", np.zeros((1, 16, 16), np.uint8), UTM, "EPSG:32610")
    assert pixel_dtypes(MaskPairSource(pairs / "img", pairs / "mask", num_classes=2)) == ["float32"]

    mixed = tmp_path / "mixed"
    make_geotiff_folder(mixed, n=1, size=32, dtype="uint16")
    write_tile(mixed / "tile_b.tif", fake_values(3, 32, 32, seed=1, dtype="uint8"), UTM, "EPSG:32610")
    ds = GeoTiffDataset(str(mixed), window_size=16, index_cache=False)
    assert pixel_dtypes(ds) == ["uint16", "uint8"]
    capsys.readouterr()
    args = argparse.Namespace()
    assert harness.record_raster_dtype(args, ds) is None and args.raster_dtype is None  # several: none recorded
    notes = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("NOTE:")]
    assert len(notes) == 1 and "uint16, uint8" in notes[0] and "no raster_dtype is recorded" in notes[0], notes
    assert harness.record_raster_dtype(args, u16) == "uint16" and args.raster_dtype == "uint16"


# ------------------------------------------------------------------------------------ main_segment.py records it
@pytest.fixture(scope="module")
def segmented(tmp_path_factory) -> dict:
    """A tiny main_segment.py run on uint16 GeoTIFFs (the synthetic building scenes written as uint16, 0.5 m)."""
    import rasterio

    import main_segment
    from dataloaders.seg_synthetic import make_building_scenes

    root = tmp_path_factory.mktemp("seg_dtype")
    scenes = make_building_scenes(root / "scenes", n_train=2, n_val=1, size=64, count=3)
    for tif in sorted((root / "scenes").rglob("*.tif")):  # the same scenes as 16-bit DNs
        with rasterio.open(tif) as src:
            data, profile = src.read(), src.profile
        profile.update(dtype="uint16")
        with rasterio.open(tif, "w", **profile) as dst:
            dst.write(data.astype(np.uint16) * 257)
    out = root / "seg"
    argv = ["--config", str(scenes["config"]), "--model", "vit_tiny_patch16", "--allow_random_init",
            "--input_size", "32", "--batch_size", "4", "--epochs", "1", "--head_channels", "16", "--aux_channels", "8",
            "--device", "cpu", "--num_workers", "0", "--print_freq", "100", "--output_dir", str(out),
            "--log_dir", str(out), "--data_override", "data.length=4", "data.size=32", "data.scale=65535"]
    main_segment.main(main_segment.get_args_parser().parse_args(argv))
    u8 = write_tile(root / "u8.tif", fake_values(3, 64, 64, seed=6, dtype="uint8"),
                    Affine(0.5, 0.0, 400000.0, 0.0, -0.5, 5000000.0), "EPSG:32633")  # the training grid
    return {"run": out, "ckpt": out / "checkpoint-latest.pth", "u8": u8}


def test_segment_training_on_uint16_rasters_records_uint16(segmented):
    """The checkpoint's args and config.yaml of a main_segment.py run on uint16 GeoTIFFs say
    ``raster_dtype: uint16``."""
    ckpt = torch.load(segmented["ckpt"], weights_only=True)
    assert ckpt["args"]["raster_dtype"] == "uint16"
    config = yaml.safe_load((segmented["run"] / "config.yaml").read_text())
    assert config["args"]["raster_dtype"] == "uint16"


def test_predict_refuses_a_uint8_raster_with_a_uint16_checkpoint(segmented, tmp_path, capsys):
    """main_predict.py: one line, exit 2, nothing written; with --ignore_dtype the same raster is predicted."""
    import main_predict

    def argv(out: Path, *extra: str) -> list[str]:
        return ["--input", str(segmented["u8"]), "--resume", str(segmented["ckpt"]), "--scale", "255",
                "--device", "cpu", "--overlap", "8", "--batch_size", "4", "--output_dir", str(out), *extra]

    line = one_error_line(capsys, main_predict.main, main_predict.get_args_parser(), argv(tmp_path / "refused"))
    assert "pixels of dtype uint8, but the checkpoint was trained on uint16 rasters" in line, line
    assert not (tmp_path / "refused").exists() or not any((tmp_path / "refused").iterdir())
    result = main_predict.main(main_predict.get_args_parser().parse_args(argv(tmp_path / "forced", "--ignore_dtype")))
    assert [Path(p).name for p in result["outputs"]] == ["u8_pred.tif"]


# --------------------------------------------------------------- main_pretrain.py records it; main_embed.py checks
@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> dict:
    """A tiny main_pretrain.py run on uint16 GeoTIFFs, and a uint8 / uint16 raster to embed."""
    import main_pretrain
    from dataloaders.synthetic import make_geotiff_folder

    root = tmp_path_factory.mktemp("dtype")
    make_geotiff_folder(root / "train", n=2, size=64, dtype="uint16")
    config = root / "u16.yaml"
    config.write_text("data:\n  type: geotiff\n  img_dir: train\n  scale: 3000.0\n  mean: [0.4, 0.4, 0.4]\n"
                      "  std: [0.2, 0.2, 0.2]\n  reference_gsd: 1.0\n  size: 64\n  length: 8\n  min_valid: 0.0\n")
    out = root / "run"
    argv = ["--config", str(config), "--model", "mae_vit_tiny_patch16", "--input_size", "32", "--batch_size", "4",
            "--epochs", "1", "--warmup_epochs", "1", "--device", "cpu", "--num_workers", "0", "--output_dir", str(out),
            "--log_dir", str(out), "--skip_knn_eval", "--print_freq", "100"]
    main_pretrain.main(main_pretrain.get_args_parser().parse_args(argv))
    u8 = write_tile(root / "u8.tif", fake_values(3, 64, 64, seed=5, dtype="uint8"), UTM, "EPSG:32610")
    u16 = write_tile(root / "u16.tif", fake_values(3, 64, 64, seed=5, dtype="uint16"), UTM, "EPSG:32610")
    return {"root": root, "run": out, "ckpt": out / "checkpoint-latest.pth", "u8": u8, "u16": u16}


def embed_argv(ckpt: Path, source: Path, out: Path, *extra: str) -> list[str]:
    return ["--input", str(source), "--checkpoint_path", str(ckpt), "--input_size", "32", "--scale", "3000",
            "--output", str(out), "--device", "cpu", "--batch_size", "4", "--pool", "cls", *extra]


def test_pretraining_records_the_dtype_and_embed_refuses_another(pretrained, tmp_path, capsys):
    pytest.importorskip("pyarrow", reason="GeoParquet needs pyarrow (install_requires)")
    ckpt = torch.load(pretrained["ckpt"], weights_only=True)
    assert ckpt["args"]["raster_dtype"] == "uint16"
    assert yaml.safe_load((pretrained["run"] / "config.yaml").read_text())["args"]["raster_dtype"] == "uint16"

    parser = main_embed.get_args_parser()
    line = one_error_line(capsys, main_embed.main, parser, embed_argv(pretrained["ckpt"], pretrained["u8"],
                                                              tmp_path / "u8.parquet"))
    assert "pixels of dtype uint8, but the checkpoint was trained on uint16 rasters" in line, line
    assert "--ignore_dtype" in line and str(pretrained["u8"]) in line
    assert list(tmp_path.iterdir()) == []  # nothing written: no output, no block folder

    result = main_embed.main(parser.parse_args(embed_argv(pretrained["ckpt"], pretrained["u16"],
                                                          tmp_path / "u16.parquet")))
    assert result["windows"] == 4 and "NOTE" not in capsys.readouterr().out  # the training dtype: no remark

    result = main_embed.main(parser.parse_args(embed_argv(pretrained["ckpt"], pretrained["u8"],
                                                          tmp_path / "forced.parquet", "--ignore_dtype")))
    notes = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("NOTE:")]
    assert result["windows"] == 4 and len(notes) == 1 and "--ignore_dtype" in notes[0], notes


def test_a_checkpoint_without_raster_dtype_is_not_checked(pretrained, tmp_path, capsys):
    """Checkpoints written before the key existed (and the released one) embed rasters of any dtype."""
    pytest.importorskip("pyarrow", reason="GeoParquet needs pyarrow (install_requires)")
    ckpt = torch.load(pretrained["ckpt"], weights_only=True)
    del ckpt["args"]["raster_dtype"]
    old = tmp_path / "old.pth"
    torch.save(ckpt, old)
    result = main_embed.main(main_embed.get_args_parser().parse_args(embed_argv(old, pretrained["u8"],
                                                                                tmp_path / "old.parquet")))
    assert result["windows"] == 4 and (tmp_path / "old.parquet").is_file()
    assert "NOTE" not in capsys.readouterr().out
