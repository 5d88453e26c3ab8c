"""The inference launchers read pixels as the model was trained: ``--scale``/``--mean``/``--std`` default to the
training data config of the checkpoint (``inference.inputs.input_scaling``), each flag given wins."""
from __future__ import annotations

import argparse
import shutil

import numpy as np
import pytest
import yaml

import main_embed
import main_predict
from inference.inputs import input_scaling
from tests.test_inference import SIZE, UTM, segmenter, world  # noqa: F401 (module fixtures)
from tests.raster_reference import fake_values, write_tile

DATA = {"type": "geotiff", "img_dir": "train", "scale": 3000.0, "mean": [0.4, 0.5, 0.45], "std": [0.2, 0.25, 0.3]}


def flags(**given) -> argparse.Namespace:
    return argparse.Namespace(scale=given.get("scale"), mean=given.get("mean"), std=given.get("std"))


def test_each_flag_wins_else_the_training_config_else_the_defaults(capsys):
    assert input_scaling(flags(), {}, DATA, 3) == (3000.0, DATA["mean"], DATA["std"])
    assert "values / 3000 (from the training data config), then mean/std from the training data config" in \
        capsys.readouterr().out
    assert input_scaling(flags(scale=255.0), {}, DATA, 3)[0] == 255.0
    assert input_scaling(flags(mean=[0, 0, 0], std=[1, 1, 1]), {}, DATA, 3) == (3000.0, [0, 0, 0], [1, 1, 1])
    images = {"type": "resisc", "mean": [0.3] * 3, "std": [0.2] * 3}  # JPEGs: decoded to 8 bits, read / 255
    assert input_scaling(flags(), {}, images, 3) == (255.0, [0.3] * 3, [0.2] * 3)
    no_data = input_scaling(flags(), {"mean": [0.1] * 3, "std": [0.9] * 3}, {}, 3)  # e.g. an exported encoder
    assert no_data == (1.0, [0.1] * 3, [0.9] * 3)
    assert "from the default (nothing recorded)" in capsys.readouterr().out


def test_predict_reads_as_trained_without_flags(world, segmenter, tmp_path, capsys):  # noqa: F811
    _, ckpt = segmenter
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(ckpt, run / "checkpoint-latest.pth")
    (run / "config.yaml").write_text(yaml.safe_dump({"args": {}, "data": DATA}))  # as main_segment.py writes it
    src = write_tile(tmp_path / "scene.tif", fake_values(3, 64, 80, seed=5), UTM, "EPSG:32610")

    def predict(out: str, *extra: str) -> bytes:
        main_predict.main(main_predict.get_args_parser().parse_args(
            ["--input", str(src), "--resume", str(run / "checkpoint-latest.pth"), "--device", "cpu",
             "--overlap", "8", "--output_dir", str(tmp_path / out), "--gsd", "1", *extra]))
        return (tmp_path / out / "scene_pred.tif").read_bytes()

    default = predict("default")
    assert "values / 3000 (from the training data config)" in capsys.readouterr().out
    explicit = predict("explicit", "--scale", "3000", "--mean", *map(str, DATA["mean"]), "--std",
                       *map(str, DATA["std"]))
    assert default == explicit
    assert predict("raw", "--scale", "1") != default  # the scale matters: the default is not a no-op


def test_embed_reads_a_pretraining_run_as_trained(world, tmp_path, capsys):  # noqa: F811
    pytest.importorskip("pyarrow")
    import geopandas as gpd

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(world["ckpt"], run / "checkpoint-latest.pth")
    (run / "config.yaml").write_text(yaml.safe_dump({"args": {}, "data": DATA}))

    def embed(out: str, *extra: str) -> np.ndarray:
        main_embed.main(main_embed.get_args_parser().parse_args(
            ["--input", str(world["utm"]), "--checkpoint_path", str(run / "checkpoint-latest.pth"),
             "--input_size", str(SIZE), "--device", "cpu", "--output", str(tmp_path / out), *extra]))
        return np.stack(gpd.read_parquet(tmp_path / out)["embedding_cls"])

    default = embed("default.parquet")
    assert "values / 3000 (from the training data config)" in capsys.readouterr().out
    explicit = embed("explicit.parquet", "--scale", "3000", "--mean", *map(str, DATA["mean"]), "--std",
                     *map(str, DATA["std"]))
    np.testing.assert_array_equal(default, explicit)


def test_bands_from_the_flag_or_the_training_config(world, segmenter, tmp_path, capsys):  # noqa: F811
    """A 4-band raster and a 3-band model: refused naming --bands; --bands 3 1 2 reads those bands (the same map as a
    3-band file holding them); a training config with ``bands: [3, 1, 2]`` makes them the default."""
    from tests.cli import one_error_line

    _, ckpt = segmenter
    arr = fake_values(4, 64, 80, seed=6)
    four = write_tile(tmp_path / "four.tif", arr, UTM, "EPSG:32610")
    three = write_tile(tmp_path / "three.tif", arr[[2, 0, 1]], UTM, "EPSG:32610")

    def argv(src, ck, out: str, *extra: str) -> list[str]:
        return ["--input", str(src), "--resume", str(ck), "--device", "cpu", "--scale", "3000", "--overlap", "8",
                "--mean", *map(str, DATA["mean"]), "--std", *map(str, DATA["std"]), "--output_dir",
                str(tmp_path / out), *extra]

    def predict(src, ck, out: str, *extra: str) -> bytes:
        main_predict.main(main_predict.get_args_parser().parse_args(argv(src, ck, out, *extra)))
        return (tmp_path / out / f"{src.stem}_pred.tif").read_bytes()

    line = one_error_line(capsys, main_predict.main, main_predict.get_args_parser(), argv(four, ckpt, "refused"))
    assert "4 band(s), but the model takes 3" in line and "--bands" in line
    predict(three, ckpt, "three")
    with_flag = predict(four, ckpt, "flag", "--bands", "3", "1", "2")
    import rasterio

    with rasterio.open(tmp_path / "three" / "three_pred.tif") as a, \
            rasterio.open(tmp_path / "flag" / "four_pred.tif") as b:
        assert (a.read() == b.read()).all() and a.transform == b.transform
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(ckpt, run / "checkpoint-latest.pth")
    (run / "config.yaml").write_text(yaml.safe_dump({"args": {}, "data": {**DATA, "bands": [3, 1, 2]}}))
    capsys.readouterr()
    default = predict(four, run / "checkpoint-latest.pth", "config")
    assert "input: bands 3 1 2 (from the training data config)" in capsys.readouterr().out
    assert default == with_flag
    line = one_error_line(capsys, main_predict.main, main_predict.get_args_parser(),
                          argv(four, ckpt, "both", "--bands", "1", "2", "3", "--band_files", "*_B1.tif"))
    assert "--bands" in line and "--band_files" in line
