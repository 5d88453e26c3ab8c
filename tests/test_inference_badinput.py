"""Bad input to the "apply a model" commands (main_embed.py, main_predict.py, tools/search_embeddings.py), as a
newcomer gives it: each case ends in ONE ``error:`` line naming the flag or file, exit status 2, no traceback, and
nothing written. Plus the fixes found on the way: the default ``--input_size`` of main_embed.py, the hits written
as a GeoPackage, the Ctrl-C line of the inference launchers. Reuses the tiny world of tests/test_inference.py."""
from __future__ import annotations

import os
import runpy
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import harness
import main_embed
import main_predict
from tests.cli import one_error_line
from tests.test_inference import SIZE, embed_args, predict_args, run_embed, segmenter, world  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def extra_files(world):
    """A text file (in the way of an output folder), a classifier (linear-probe) checkpoint, a folder with no
    raster."""
    import models_vit

    root = world["root"]
    note = root / "notes.txt"
    note.write_text("not a folder\n")
    probe = root / "probe.pth"
    torch.save({"model": models_vit.vit_tiny_patch16(num_classes=5).state_dict(),
                "args": {"model": "vit_tiny_patch16", "nb_classes": 5}}, probe)
    empty = root / "no_rasters"
    empty.mkdir()
    (empty / "readme.txt").write_text("no raster here\n")
    return {"note": note, "probe": probe, "empty": empty}


EMBED_CASES = [  # (extra flags, what the line must say); {note} / {probe}: the extra_files
    (["--gsd", "0"], "--gsd 0.0: must be > 0"),
    (["--gsd", "nan"], "--gsd nan: must be > 0"),
    (["--gsd", "-1"], "--gsd -1.0: must be > 0"),
    (["--gsd", "0,5"], "argument --gsd: invalid float value: '0,5'"),
    (["--scale", "0"], "--scale 0.0: must be > 0"),
    (["--reference_gsd", "0"], "--reference_gsd 0.0: must be > 0"),
    (["--base_resolution", "0"], "--base_resolution 0.0: must be > 0"),
    (["--std", "0", "0", "0"], "every std must be > 0"),
    (["--crs", "EPSG:99999"], "--crs EPSG:99999: not a CRS PROJ knows"),
    (["--resampling", "cubicc", "--gsd", "2"], "argument --resampling: invalid choice: 'cubicc'"),
    (["--dense", "{note}/d.tif"], "is a file, not a folder"),
    (["--checkpoint_path", "{probe}"], "a classifier checkpoint"),
    (["--stride", "0"], "--stride 0: must be > 0"),
    (["--input_size", "256"], "--input_size or a finer --gsd"),  # the reader's check, in the launcher's flags
    (["--input", "{empty}"], "a folder with no GeoTIFF (.tif, .tiff) or JPG/JPEG/PNG image file in it"),
]


@pytest.mark.parametrize("extra,expected", EMBED_CASES, ids=[" ".join(c[0])[:30] for c in EMBED_CASES])
def test_embed_bad_flags_one_line_nothing_written(world, extra_files, tmp_path, capsys, extra, expected):
    pytest.importorskip("pyarrow")
    extra = [e.format(**extra_files) for e in extra]
    line = one_error_line(capsys, main_embed.main, main_embed.get_args_parser(),
                     embed_args(world, tmp_path / "o.parquet", *extra))
    assert expected in line, line
    assert list(tmp_path.iterdir()) == []  # no output, no blocks folder


def test_embed_output_under_a_file_or_in_a_read_only_folder(world, extra_files, tmp_path, capsys, monkeypatch):
    line = one_error_line(capsys, main_embed.main, main_embed.get_args_parser(),
                     embed_args(world, extra_files["note"] / "o.parquet"))
    assert line.startswith(f"error: --output {extra_files['note']}/o.parquet") and "is a file, not a folder" in line
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real(p, mode))  # root: no EACCES
    line = one_error_line(capsys, main_embed.main, main_embed.get_args_parser(),
                     embed_args(world, locked / "sub" / "o.parquet"))
    assert f"cannot write in {locked}" in line and line.startswith("error: --output")
    assert list(locked.iterdir()) == []


PREDICT_CASES = [
    (["--gsd", "0"], "--gsd 0.0: must be > 0"),
    (["--gsd", "-1"], "--gsd -1.0: must be > 0"),
    (["--scale", "0"], "--scale 0.0: must be > 0"),
    (["--batch_size", "0"], "--batch_size 0: must be > 0"),
    (["--std", "0", "0", "0"], "every std must be > 0"),
    (["--crs", "EPSG:99999"], "--crs EPSG:99999: not a CRS PROJ knows"),
    (["--preview", "--preview_size", "0"], "--preview_size 0: must be > 0"),
    (["--overlap", str(SIZE)], f"--overlap {SIZE}: must be in [0, --input_size)"),
    (["--gsd", "8"], f"no raster holds a {SIZE} px window at --gsd 8 (largest read grid 12x16 px)"),
]


@pytest.mark.parametrize("extra,expected", PREDICT_CASES, ids=[" ".join(c[0])[:30] for c in PREDICT_CASES])
def test_predict_bad_flags_one_line_nothing_written(world, segmenter, tmp_path, capsys, extra, expected):
    line = one_error_line(capsys, main_predict.main, main_predict.get_args_parser(),
                     predict_args(segmenter[1], world["utm"], tmp_path / "preds", *extra))
    assert expected in line, line
    assert not (tmp_path / "preds").exists() or list((tmp_path / "preds").rglob("*")) == []


def test_predict_output_dir_under_a_file_and_a_folder_without_rasters(world, segmenter, extra_files, capsys):
    line = one_error_line(capsys, main_predict.main, main_predict.get_args_parser(),
                     predict_args(segmenter[1], world["utm"], extra_files["note"] / "preds"))
    assert line.startswith("error: --output_dir") and "is a file, not a folder" in line
    line = one_error_line(capsys, main_predict.main, main_predict.get_args_parser(),
                     predict_args(segmenter[1], extra_files["empty"], extra_files["empty"] / "preds"))
    assert line == f"error: --input {extra_files['empty']}: a folder with no GeoTIFF (.tif, .tiff) file in it; give " \
                   f"the rasters' folder, files or a quoted glob, or --glob PATTERN for other names"
    assert sorted(p.name for p in extra_files["empty"].iterdir()) == ["readme.txt"]


# ------------------------------------------------------------------------------------- default --input_size
def test_embed_default_input_size_is_the_checkpoints(world, tmp_path):
    """Without --input_size the window is the checkpoint's: its saved ``input_size``, else the side of its
    positional-embedding table (exported encoders, the released checkpoint)."""
    pytest.importorskip("pyarrow")
    import geopandas as gpd
    import models_mae

    torch.manual_seed(0)
    state = models_mae.mae_vit_tiny_patch16(img_size=SIZE).state_dict()
    saved = tmp_path / "saved.pth"
    torch.save({"model": state, "args": {"model": "mae_vit_tiny_patch16", "input_size": SIZE}}, saved)
    table = tmp_path / "table.pth"
    torch.save({"model": state}, table)
    explicit = run_embed(embed_args(world, tmp_path / "explicit.parquet", "--checkpoint_path", str(saved)))
    ref = gpd.read_parquet(explicit["output"])
    for ckpt in (saved, table):
        argv = embed_args(world, tmp_path / f"{ckpt.stem}.parquet", "--checkpoint_path", str(ckpt))
        i = argv.index("--input_size")
        got = gpd.read_parquet(run_embed(argv[:i] + argv[i + 2:])["output"])
        assert set(got["height"]) == {SIZE} and len(got) == len(ref) == 12  # 96 x 128 px in 32 px windows
        np.testing.assert_allclose(np.stack(got["embedding_cls"]), np.stack(ref["embedding_cls"]), atol=1e-6)


# ------------------------------------------------------------------------------------------------- search
@pytest.fixture(scope="module")
def embeddings(world):
    pytest.importorskip("pyarrow")
    from PIL import Image

    out = world["root"] / "bad_search.parquet"
    run_embed(embed_args(world, out, "--gsd", "1", "2"))
    photos = world["root"] / "photos"
    photos.mkdir()
    for i in range(2):
        Image.fromarray(np.full((40, 40, 3), 60 * i + 20, np.uint8)).save(photos / f"p{i}.png")
    images = world["root"] / "photos.parquet"
    run_embed(embed_args(world, images, "--gsd", "0.5", "--scale", "255", source=str(photos)))
    return {"rasters": out, "images": images}


def search_main():
    import tools.search_embeddings as tool

    return tool.main, tool.get_args_parser()


def test_search_bad_queries_and_files_one_line(world, embeddings, extra_files, tmp_path, capsys):
    import geopandas as gpd
    import pandas as pd
    import shapely

    theirs = tmp_path / "theirs.parquet"
    gpd.GeoDataFrame({"a": [1]}, geometry=[shapely.Point(0, 0)], crs=4326).to_parquet(theirs)
    plain = tmp_path / "plain.parquet"
    pd.DataFrame({"x": [1]}).to_parquet(plain)
    rasters = str(embeddings["rasters"])
    cases = [
        ([rasters, "--point", "-1", "2", "--point_crs", "EPSG:99999"], "--point_crs EPSG:99999: not a CRS"),
        ([rasters, "--point", "600000", "4200010"], "the windows cover x 500000 .. 500128"),
        ([rasters, "--point", "500010", "4199990", "--gsd", "0.7"], "--gsd 0.7: the file has windows at gsd 1, 2"),
        ([rasters, "--window", "0", "--output", str(tmp_path / "hits.txt")], "give a .geojson or .gpkg file"),
        ([str(theirs), "--window", "0"], "not an embedding file of main_embed.py"),
        ([str(plain), "--window", "0"], "not an embedding file of main_embed.py"),
        ([str(extra_files["note"]), "--window", "0"], "not an embedding file of main_embed.py"),
        ([str(embeddings["images"]), "--point", "1", "2"], "no footprint (embeddings of plain images"),
    ]
    main, parser = search_main()
    for argv, expected in cases:
        line = one_error_line(capsys, main, parser, argv)
        assert expected in line, (argv, line)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.parquet", "theirs.parquet"]


def test_search_hits_as_geopackage_and_geojson(world, embeddings, tmp_path):
    import geopandas as gpd

    main, parser = search_main()
    for name in ("hits.gpkg", "hits.geojson"):
        hits = harness.run(main, parser, [str(embeddings["rasters"]), "--window", "2", "--k", "4", "--output",
                                          str(tmp_path / name)])
        back = gpd.read_file(tmp_path / name)
        assert list(back["window"]) == list(hits["window"]) and len(back) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hits.geojson", "hits.gpkg"]  # no temporary file left


# ------------------------------------------------------------------------------------------------- Ctrl-C
def test_ctrl_c_and_sigterm_lines_name_what_the_inference_launchers_keep(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exc:
        harness.run(interrupted, main_embed.get_args_parser(), ["--input", "x", "--checkpoint_path", "y",
                                                                "--output", "z.parquet"], interrupted="KEPT HERE")
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 130 and err == "error: interrupted (Ctrl-C): stopped at once; KEPT HERE"
    def terminated(args):
        os.kill(os.getpid(), signal.SIGTERM)  # the handler raises at once; the loop never ends otherwise
        while True:
            time.sleep(0.01)

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exc:
        harness.run(terminated, main_embed.get_args_parser(), ["--input", "x", "--checkpoint_path", "y",
                                                               "--output", "z.parquet"], interrupted="KEPT HERE")
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 143 and err == "error: stopped by SIGTERM: stopped at once; KEPT HERE"
    assert signal.getsignal(signal.SIGTERM) == before  # the launcher's handler is removed when it returns
    seen: list = []  # what each launcher's __main__ passes
    monkeypatch.setattr(harness, "run", lambda main, parser, argv=None, interrupted=None: seen.append(interrupted))
    for script in ("main_embed.py", "main_predict.py"):
        runpy.run_path(str(REPO / script), run_name="__main__")
    embed, predict = seen
    assert "<--output>.blocks/" in embed and "<--output_dir>/.predict.blocks/" in predict
    assert all("rerun the same command" in s and "checkpoint" not in s for s in seen)
